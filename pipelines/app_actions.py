"""What the page's buttons do, as plain functions of a `VQPipeline`: testable without a browser
or Gradio, and the same calls a notebook would make, so the page shows what Python gives.

Each returns PIL images and one line of text; bad input raises `UserError` with one sentence,
which the page shows in place of a traceback.
"""

import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.utils import make_grid

from foundation.data import run_test_images
from foundation.errors import UserError
from pipelines.pipeline import VQPipeline, as_output, sample_grid
from pipelines.region import REGIONS, check_region, code_region
from stage2_prior.priors import PARALLEL_PRIORS

EVERY_CLASS = "every class (a row each)"
NO_CLASS = "no class"
PAINTED = "what I paint"
MAX_UPLOAD_PIXELS = 40_000_000  # about 6300x6300: beyond this decoding alone takes seconds and gigabytes
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # and no other reader of PIL's (EPS would start Ghostscript)
UPLOAD_SUFFIXES = [".png", ".jpg", ".jpeg", ".webp", ".gif"]
# What one request may ask, held here and not only in the sliders: a client can send any value
# to Gradio's API, and one request holds the model for every other visitor.
MOST_IMAGES = 128
MOST_COMPLETIONS = 8
MOST_PASSES = 32


def draw_labels(pipe: VQPipeline) -> list[str]:
    """The class choices of the Draw tab: every class, each class by name, or none."""
    if not pipe.class_names:
        return []
    no_class = [NO_CLASS] if getattr(pipe.prior, "label_dropout", 0) > 0 else []
    return [EVERY_CLASS, *pipe.class_names, *no_class]


def complete_labels(pipe: VQPipeline) -> list[str]:
    """A completion is steered by one class, or by none."""
    return [label for label in draw_labels(pipe) if label != EVERY_CLASS]


def as_label(choice: str | None):
    """A choice of the page -> `VQPipeline`'s `labels` argument."""
    return {None: None, EVERY_CLASS: "all", NO_CLASS: "none"}.get(choice, choice)


def redraw_choices(pipe: VQPipeline) -> tuple[list[str], str]:
    """The named regions this prior can redraw (as `check_region` rules), "what I paint", and a
    sentence on the others: a raster-order prior draws each code from the codes before it only,
    so it can redraw a tail of the map."""
    height, width = pipe.vqvae.map_shape

    def allowed(name: str) -> bool:
        try:
            check_region(code_region(name, height, width), pipe.prior, name)
        except UserError:
            return False
        return True

    regions = [name for name in REGIONS if allowed(name)]
    if len(regions) == len(REGIONS):
        return [*regions, PAINTED], f"The {pipe.prior.prior} prior can redraw any region, or what you paint."
    return [*regions, PAINTED], (
        f"Only the bottom (or a painted tail: whole rows at the bottom, and the right end of the row above) can be "
        f"redrawn: the {pipe.prior.prior} prior draws codes in reading order, each from the codes before it, so it cannot "
        f"fit new codes before kept ones. Top, left, right and center need a MaskGIT prior (stage two's "
        f"`--prior maskgit --prior-dir maskgit`, then `--prior-dir maskgit` here).")


def to_pil(grid: torch.Tensor) -> Image.Image:
    """A grid [C, H, W] in [0, 1] -> PIL, rounded as the pipeline rounds its images."""
    return as_output(grid[None], "pil")[0]


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def draw(pipe: VQPipeline, label: str | None, n: int, guidance: float | None, temperature: float, top_k: int | None,
         seed: int, passes: int | None = None, transform: str = "identity") -> tuple[Image.Image, str]:
    """New images, as `pipelines.sample --n N --seed S` draws them (same seed, same grid)."""
    check_at_most(n, MOST_IMAGES, "images", "draw them in several clicks, or with `python -m pipelines.sample`")
    if passes is not None:
        check_at_most(passes, MOST_PASSES, "MaskGIT passes", "more passes change little beyond a dozen")
    passes = passes if pipe.prior.prior in PARALLEL_PRIORS else None
    if not pipe.class_names or label == NO_CLASS:
        guidance = None  # guidance steers towards a class; without one it has nothing to do
    samples, seconds = timed(pipe, n=int(n), labels=as_label(label), guidance=guidance, temperature=temperature,
                             top_k=int(top_k) if top_k else None, passes=int(passes) if passes else None, seed=int(seed),
                             output_type="pt", transform=transform or "identity")
    what = "unconditional" if samples.labels is None else f"guidance {samples.guidance:g}"
    if transform and transform != "identity":
        what += f", as {transform} makes them"
    return to_pil(sample_grid(samples.images, samples.labels)), f"{len(samples.codes)} images ({what}, seed {int(seed)}) in {seconds:.2f} s on {pipe.device}"


def check_at_most(value, most: int, what: str, instead: str) -> None:
    """A request's count, refused outside 1..most with the page's own limit in the sentence."""
    if not isinstance(value, (int, float)) or not 1 <= value <= most:
        raise UserError(f"{value!r} {what} were asked; the page takes 1 to {most} at a time ({instead})")


def read_upload(pipe: VQPipeline, path: str | Path) -> torch.Tensor:
    """An uploaded file -> uint8 [C, S, S] at the run's size, resized as training resized."""
    name = Path(path).name
    try:
        with Image.open(path, formats=UPLOAD_FORMATS) as image:
            width, height = image.size
    except Image.DecompressionBombError:  # PIL refuses to open it at all
        raise UserError(f"{name} is too large to read here; upload a copy of at most a few thousand pixels a side") from None
    except (OSError, ValueError):
        raise UserError(f"{name} is not an image this page can read; upload a PNG, JPEG, WebP or GIF file") from None
    if width * height > MAX_UPLOAD_PIXELS:
        raise UserError(f"{name} is too large to read here ({width}x{height} pixels); upload a copy of at most a few "
                        f"thousand pixels a side (the run works at {pipe.vqvae.image_size}x{pipe.vqvae.image_size})")
    return pipe.prepare_images([Path(path)])[0]


def complete(pipe: VQPipeline, image: torch.Tensor | None, redraw: str, painted: Image.Image | None, samples: int,
             label: str | None, seed: int, guidance: float | None = None) -> tuple[Image.Image, str]:
    """Completions of one image: original | kept (the redrawn part grey) | the completions, in a row."""
    if image is None:
        raise UserError("no image yet: pick one of the test images or upload one first")
    check_at_most(samples, MOST_COMPLETIONS, "completions", "ask again with another seed for more")
    if painted is not None and painted.width * painted.height > MAX_UPLOAD_PIXELS:
        raise UserError(f"the painted layer is {painted.width}x{painted.height} pixels, more than the page reads; "
                        f"paint on the page's canvas")
    mask = redraw
    if redraw == PAINTED:
        if painted is None or not painted.getchannel("A").getbbox():
            raise UserError("nothing is painted yet: paint over the part to redraw, or choose a region")
        mask = painted.getchannel("A").point(lambda alpha: 255 if alpha else 0)
    result, seconds = timed(pipe.complete, image[None], mask, int(samples), labels=as_label(label) if label else None,
                            guidance=guidance, seed=int(seed), output_type="pt")
    row = torch.cat([image[None].float() / 255, result.kept, result.images[0]])
    region = result.region
    return (to_pil(make_grid(row, nrow=len(row), padding=2, pad_value=1.0)),
            f"{int(samples)} completions, {int(region.sum())} of {region.numel()} codes redrawn, in {seconds:.2f} s on {pipe.device}")


def test_images(pipe: VQPipeline, run_dir: Path | None, n: int = 16) -> list[tuple[torch.Tensor, str]]:
    """The first `n` test images of the run (with their class names), for the Complete tab to
    offer; none where the run's data cannot be read here (a Hub model, a moved data set)."""
    if run_dir is None:
        return []
    try:
        images, labels = run_test_images(run_dir, n, pipe.vqvae.in_channels)
    except (UserError, OSError):
        return []
    names = pipe.class_names or []
    labels = labels.tolist() if labels is not None else [None] * len(images)
    return [(image, names[label] if names and label is not None else "") for image, label in zip(images, labels)]


# The figures a newcomer needs, in words; the rest of metrics.json is shown as it is written.
FIGURES = {
    "stage1.mse": "Reconstruction error on test images (MSE; lower is better)",
    "stage1.ssim": "Reconstructions' structural similarity (1 is perfect)",
    "stage1.codebook_usage": "Share of the codebook the test images use",
    "stage1.rfd_ratio": "Reconstructions: Frechet distance, as a multiple of real images' own (1 is perfect)",
    "stage2.nll_bits_per_code": "Prior's test loss, bits per code (lower is better)",
    "stage2.masked_nll_bits_per_code": "MaskGIT's test loss on masked codes, bits per code (lower is better)",
    "samples.fd_ratio": "New images: Frechet distance, as a multiple of real images' own (1 is perfect)",
    "samples.classifier_accuracy": "New images a classifier puts in the class they were drawn for",
    "samples.guidance": "Guidance they were drawn at",
    "samples.fid_ratio": "New images: Inception FID, as a multiple of real images' own",
    "samples.memorisation.features.near_copy_share": "New images that are near-copies of a train image (about 0.05 for unseen real images)",
    "samples.memorisation.features.nearest_train_ratio": "New images' distance to their nearest train image, as a multiple of "
                                                         "real test images' (1: as near; above: blends; below: copies)",
    "samples.memorisation.pixels.nearest_train_ratio": "The same distance in pixels",
}


def overview(pipe: VQPipeline, run_dir: Path | None) -> tuple[str, str]:
    """The run at a glance, as Markdown: data, models and device; then its figures in words,
    and every figure of metrics.json as written (the second string)."""
    sizes = {name: sum(p.numel() for p in model.parameters()) / 1e6 for name, model in (("VQ-VAE", pipe.vqvae), ("prior", pipe.prior))}
    height, width = pipe.vqvae.map_shape
    lines = [
        f"**Data set:** {pipe.dataset or (str(run_dir) if run_dir else 'not recorded')}  ",
        f"**Images:** {pipe.vqvae.image_size}x{pipe.vqvae.image_size} pixels, {pipe.vqvae.in_channels} channel(s); each is "
        f"stored as a {height}x{width} map of codes from a codebook of {pipe.vqvae.codebook_size}  ",
        f"**Models:** a VQ-VAE of {sizes['VQ-VAE']:.2f}M parameters (image to codes and back) and a {pipe.prior.prior} "
        f"prior of {sizes['prior']:.2f}M (which code maps are likely)  ",
        f"**Classes:** {', '.join(pipe.class_names) if pipe.class_names else 'none (unconditional)'}  ",
        f"**Runs on:** {pipe.device}",
    ]
    every = flat(pipe.metrics)
    if not every:
        missing = f"Not evaluated: {pipe.metrics_note}." if pipe.metrics_note else \
            "No figures yet: `python -m pipelines.evaluate` measures the run."
        return "\n".join([*lines, "", missing]), ""
    lines += ["", "| what was measured | value |", "| --- | --- |"]
    lines += [f"| {words} | {format_value(every[key])} |" for key, words in FIGURES.items() if key in every]
    raw = "\n".join(["| metrics.json | value |", "| --- | --- |", *(f"| `{key}` | {format_value(value)} |" for key, value in every.items())])
    return "\n".join(lines), raw


def flat(metrics: dict, prefix: str = "") -> dict:
    """{"stage1": {"mse": ...}} -> {"stage1.mse": ...}; lists (per-scale sweeps) are left out."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        elif not isinstance(value, list):
            out[prefix + key] = value
    return out


def format_value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def reconstruction_grid(run_dir: Path | None) -> Path | None:
    """Stage one's last grid of test images over their reconstructions, where the run has one."""
    grids = sorted((Path(run_dir) / "vqvae" / "reconstructions").glob("step_*.png")) if run_dir else []
    return grids[-1] if grids else None


def training_curves(run_dir: Path | None, prior_dir: str = "prior") -> list[tuple[Path, str]]:
    """Each stage's curves.png (training and test curves, drawn at every evaluation), where the
    run has them, with a caption."""
    if run_dir is None:
        return []
    found = [(Path(run_dir) / "vqvae" / "curves.png", "Stage one: reconstruction error, codebook in use, discriminator"),
             (Path(run_dir) / prior_dir / "curves.png", "Stage two: the prior's loss, on train batches and on the test split")]
    return [(path, caption) for path, caption in found if path.exists()]


def to_pil_images(images: list[torch.Tensor]) -> list[Image.Image]:
    """uint8 [C, S, S] images -> PIL, for a gallery."""
    return [v2.functional.to_pil_image(image) for image in images]
