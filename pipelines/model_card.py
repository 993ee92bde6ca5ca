"""The model card (`README.md`) that `VQPipeline.save_pretrained` writes beside the weights:
the Hub's YAML metadata, what the models are, the run's measured figures, the sample grid and
the lines that load it."""

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

# (section of metrics.json, key (dotted where nested), what it is, format)
FIGURES = [
    ("stage1", "mse", "stage one: test MSE of the reconstructions", "{:.5f}"),
    ("stage1", "ssim", "stage one: test SSIM", "{:.3f}"),
    ("stage1", "codebook_usage", "stage one: share of the codebook the test split uses", "{:.1%}"),
    ("stage1", "rfd_ratio", "stage one: Frechet distance of reconstructions / real-vs-real floor", "{:.2f}x"),
    ("stage2", "nll_bits_per_code", "stage two: test NLL (bits per code)", "{:.3f}"),
    ("samples", "fd_ratio", "samples: Frechet distance / real-vs-real floor", "{:.2f}x"),
    ("samples", "classifier_accuracy", "samples: share the run's judge recognises as their class", "{:.3f}"),
    ("samples", "memorisation.features.near_copy_share",
     "samples: near-copies of a train image (nearer it than 95% of real test images are to theirs)", "{:.1%}"),
    ("samples", "memorisation.features.nearest_train_ratio",
     "samples: distance to the nearest train image / real test images' (1: as near; above: blends; below: copies)", "{:.2f}x"),
    ("samples", "memorisation.pixels.nearest_train_ratio", "samples: the same distance in pixels", "{:.2f}x"),
]


def figure(metrics: dict, section: str, key: str):
    """metrics[section][k1][k2]... for key "k1.k2", or None where it was not measured."""
    value = metrics.get(section, {})
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def figures_table(metrics: dict, note: str | None = None) -> str:
    """`note`: why there are no figures to show (they describe other weights)."""
    rows = [f"| {what} | {form.format(figure(metrics, section, key))} |" for section, key, what, form in FIGURES
            if isinstance(figure(metrics, section, key), (int, float))]
    if not rows and note:
        return f"Not evaluated: {note}."
    if not rows:
        return "No figures were measured for this run (`python -m pipelines.evaluate` writes them)."
    return "\n".join(["| figure | value |", "| --- | --- |", *rows,
                      "", "The Frechet distances are measured in the features of a small classifier trained on the run's "
                      "own train split (`pipelines.evaluate`), as a ratio to the distance between two sets of real test "
                      "images: 1x is perfect. They compare runs on the same data, not across data sets."])


def write_model_card(path: Path, pipeline, grid_name: str | None, name: str) -> None:
    """`name`: what `from_pretrained` is given in the card's example (the Hub repo id, or the folder)."""
    prior = pipeline.prior
    conditional = bool(prior.num_classes)
    data = ModelCardData(
        library_name="pytorch",
        pipeline_tag="unconditional-image-generation",
        tags=["vq-vae", "vqgan", "image-generation", f"{prior.prior}-prior",
              "class-conditional" if conditional else "unconditional"],
        datasets=[pipeline.dataset] if pipeline.dataset else None,
    )
    height, width = pipeline.vqvae.map_shape
    size = pipeline.vqvae.image_size
    classes = f"class-conditional on {prior.num_classes} classes ({', '.join(prior.class_names or [])})" if conditional \
        else "unconditional"
    grid = f"![samples]({grid_name})\n\n64 samples drawn with the defaults (seed 0)." if grid_name else ""
    guidance = f" at guidance {prior.default_guidance:g}, the scale stage two measured best" if conditional else ""
    body = f"""
# A two-stage VQ image generator

A VQ-VAE that turns {size}x{size} images into {height}x{width} maps of codes out of
{pipeline.vqvae.codebook_size}, and a {prior.prior} prior over those maps, {classes}. Trained with
vq-two-stage (`stage1_vqvae/train.py`, then `stage2_prior/train.py`)
{f"on `{pipeline.dataset}`" if pipeline.dataset else "on the author's own images"}.

## Use

```python
from pipelines import VQPipeline
pipe = VQPipeline.from_pretrained("{name}")
images = pipe(n=64).images  # 64 PIL images{guidance}
```

## Figures

{figures_table(pipeline.metrics, pipeline.metrics_note)}

{grid}
"""
    ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").save(path)
