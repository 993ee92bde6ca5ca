"""`VQPipeline`: a trained run as one Python object, the way to use it from a notebook.

    from pipelines import VQPipeline
    pipe = VQPipeline.from_pretrained("runs/default")        # a run folder, a saved folder or a Hub repo id
    images = pipe(n=64, labels="Dress").images               # PIL images, at the run's measured guidance
    pipe.save_pretrained("my_model")                         # weights, configs, a model card; no checkpoints

`pipelines.sample` and `pipelines.complete` are command-line layers over it, so the same seed
gives the same images from Python and from the shell. Bad arguments raise `UserError` (a
`ValueError`) with one sentence that names the argument and the fix.
"""

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange, repeat
from PIL import Image
from torchvision.transforms import v2
from torchvision.utils import make_grid

from foundation.data import to_uint8_tensor
from foundation.errors import UserError
from pipelines.model_card import write_model_card
from pipelines.region import check_region, code_region
from stage1_vqvae.codes import weights_hash
from stage1_vqvae.map_transforms import IDENTITY, apply_transform
from stage1_vqvae.model import VQVAE, load_vqvae
from stage2_prior.priors import PARALLEL_PRIORS, load_prior
from stage2_prior.quality import autocast_for, generate_images

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
PIPELINE_FILE = "pipeline.json"  # what a saved folder holds, as diffusers' model_index.json


@dataclass
class Samples:
    """What a call draws: `images` in the asked `output_type`, `codes` [n, h, w] (CPU),
    `labels` [n] (None when unconditional) and the guidance scale used."""

    images: list | torch.Tensor | np.ndarray
    codes: torch.Tensor
    labels: torch.Tensor | None
    guidance: float


@dataclass
class Completions:
    """`images[i][j]`: completion j of input i (`output_type` "pt"/"np": [N, samples, ...]);
    `kept`: each input's reconstruction with the redrawn region grey; `codes` [N, samples, h, w]."""

    images: list | torch.Tensor | np.ndarray
    kept: list | torch.Tensor | np.ndarray
    codes: torch.Tensor
    region: torch.Tensor
    labels: torch.Tensor | None
    guidance: float


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    """"auto" (or None): a CUDA GPU, else Apple's MPS, else the CPU."""
    name = "auto" if name is None else str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name} was asked for but no CUDA GPU is visible; use device auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("device mps was asked for but Apple's MPS is not available; use device auto or cpu")
    return torch.device(name)


def load_run(run_dir: Path, device: torch.device, prior_dir: str = "prior"):
    """The run's VQ-VAE and prior, in eval mode on `device`, checked to belong together."""
    run_dir = Path(run_dir)
    vqvae = load_vqvae(run_dir)
    prior = load_prior(run_dir / prior_dir)
    if prior.codes_source and prior.codes_source != weights_hash(vqvae):
        flag = "" if prior_dir == "prior" else f" --prior-dir {prior_dir}"
        raise UserError(
            f"the prior in {run_dir / prior_dir} was trained on codes of another VQ-VAE than {run_dir / 'vqvae'}; "
            f"retrain it with `accelerate launch stage2_prior/train.py --run-dir {run_dir}{flag} --overwrite`"
        )
    return vqvae.to(device).eval(), prior.to(device).eval()


def download_from_hub(repo_id: str, prior_dir: str, revision: str | None, token: str | None) -> Path:
    """A Hub repo in the saved layout -> the local folder of its files (cached by huggingface_hub)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token,
                                      allow_patterns=["vqvae/*", f"{prior_dir}/*", PIPELINE_FILE, "metrics.json"]))
    except Exception as error:  # offline, unknown repo, no access: all end the same way for a user
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"{repo_id} is not a folder here, and fetching it from the Hugging Face Hub failed ({type(error).__name__}: "
            f"{reason}); give the path of a run folder, or check the repo id and that this machine is online"
        ) from None


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature > 0:
        raise UserError(f"temperature {temperature} must be above 0 (1.0 samples the prior as trained)")
    if top_k is not None and top_k < 1:
        raise UserError(f"top-k {top_k} must be at least 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top-p {top_p} must lie in (0, 1]")


def balanced_by_class(n: int, num_classes: int) -> torch.Tensor:
    """n labels sorted by class, every class n // K or n // K + 1 times (the first ones get the extra)."""
    counts = torch.full((num_classes,), n // num_classes)
    counts[: n % num_classes] += 1
    return torch.arange(num_classes).repeat_interleave(counts)


def class_index(label, prior) -> int:
    """A class name or index (int, or digits in a string) -> its index, or a one-sentence error."""
    names = prior.class_names or []
    if isinstance(label, (torch.Tensor, np.generic)):
        label = label.item()
    if isinstance(label, str) and label in names:
        return names.index(label)
    text = str(label)
    if text.lstrip("-").isdigit() and 0 <= int(text) < prior.num_classes:
        return int(text)
    raise UserError(
        f"label {label!r} is neither a class name nor an index from 0 to {prior.num_classes - 1}; "
        f"classes: {', '.join(names) if names else prior.num_classes}; or use 'all' or 'none'"
    )


def resolve_labels(labels, n: int | None, prior) -> torch.Tensor | None:
    """labels -> one class index per image, or None for unconditional samples.

    None or "all": every class, balanced within n (a conditional prior), else unconditional;
    "none": no class; a name or an index: n of that class; a list: one per image."""
    if labels is None:
        labels = "all" if prior.num_classes else "none"
    if isinstance(labels, str) and labels == "none":
        return None
    if not prior.num_classes:
        raise UserError(f"label {labels!r} was given but this prior is unconditional; drop the label")
    if isinstance(labels, (list, tuple, torch.Tensor, np.ndarray)):
        indices = torch.tensor([class_index(label, prior) for label in list(labels)], dtype=torch.long)
        if n is not None and n != len(indices):
            raise UserError(f"{len(indices)} labels were given for n={n} images; give one label per image, or one class name")
        if not len(indices):
            raise UserError("an empty list of labels was given; give one label per image, or one class name")
        return indices
    n = 64 if n is None else n
    if labels == "all":
        return balanced_by_class(n, prior.num_classes)
    return torch.full((n,), class_index(labels, prior), dtype=torch.long)


def check_null_label_was_trained(prior, asked: str) -> None:
    """Guidance and unconditional samples of a class-conditional prior use its null label,
    which it only learned if training dropped labels (--label-dropout above 0)."""
    if prior.num_classes and getattr(prior, "label_dropout", None) == 0:
        raise UserError(
            f"{asked} needs the prior's null label, but it was trained with --label-dropout 0 and never learned it; "
            f"sample with a class and no guidance, or retrain stage two with --label-dropout 0.1"
        )


def resolve_guidance(guidance: float | None, labels, prior) -> float:
    """The asked scale, else the prior's measured best when there are labels to guide towards."""
    if labels is None and prior.num_classes:
        check_null_label_was_trained(prior, "label 'none'")
    if guidance is None:
        return getattr(prior, "default_guidance", 1.0) if labels is not None else 1.0
    if guidance < 0:
        raise UserError(f"guidance {guidance} must be at least 0 (1: no guidance)")
    if guidance != 1.0 and labels is None:
        what = "this prior is unconditional" if not prior.num_classes else "label 'none' asks for no class"
        raise UserError(f"guidance {guidance:g} steers samples towards their class, but {what}; drop the guidance")
    if guidance != 1.0:
        check_null_label_was_trained(prior, f"guidance {guidance:g}")
    return guidance


def resolve_transform(transform: int | str | None, prior) -> int:
    """A transform's name or id among those the prior learned (stage one's --map-transforms) -> its
    id; None or "identity": 0, the images as they are."""
    names = prior.transforms or [IDENTITY]
    if transform is None or transform == IDENTITY:
        return 0
    if isinstance(transform, str) and transform in names:
        return names.index(transform)
    if str(transform).isdigit() and int(transform) < len(names):
        return int(transform)
    learned = f"it learned {', '.join(names)}" if prior.transforms else \
        "it learned the images as they are only (stage one's --map-transforms gives it more)"
    raise UserError(f"transform {transform!r} is not one this prior learned; {learned}")


def sampling_passes(passes: int | None, prior) -> dict:
    """`passes` as generate's keyword: only a parallel prior (MaskGIT) has passes to choose."""
    if passes is None:
        return {}
    if prior.prior not in PARALLEL_PRIORS:
        raise UserError(f"passes {passes} sets MaskGIT's sampling passes, but this run's prior is a {prior.prior}, "
                        f"which draws one code per pass; drop the passes")
    if passes < 1:
        raise UserError(f"passes {passes} must be at least 1 (the prior's default: {prior.default_steps})")
    return {"steps": passes}


def as_output(images: torch.Tensor, output_type: str):
    """Float images [..., C, H, W] in [0, 1] -> "pt" (as given), "np" ([..., H, W, C] float32)
    or "pil" (a list of PIL images, nested as the leading dimensions are)."""
    if output_type == "pt":
        return images
    if output_type == "np":
        return rearrange(images, "... c h w -> ... h w c").numpy()
    if images.dim() > 4:
        return [as_output(group, output_type) for group in images]
    pixels = (images * 255).round().clamp(0, 255).to(torch.uint8)
    return [v2.functional.to_pil_image(image) for image in pixels]


def sample_grid(images: torch.Tensor, labels: torch.Tensor | None, nrow: int | None = None) -> torch.Tensor:
    """The grid of drawn images [N, C, S, S] -> [C, H, W]: `nrow` images a row, or, when the
    images are every class sorted by class and no `nrow` is given, one row per class with blank
    cells after the shorter classes; else 8 a row. `pipelines.sample`, the page and the model
    card all draw it this way."""
    by_class = labels is not None and len(labels.unique()) > 1 and bool((labels.diff() >= 0).all())
    if nrow is None and by_class:
        counts = torch.bincount(labels)
        counts = counts[counts > 0]
        nrow = int(counts.max())
        blank = torch.ones_like(images[:1])
        images = torch.cat([torch.cat([group, blank.expand(nrow - len(group), -1, -1, -1)])
                            for group in images.split(counts.tolist())])
    return make_grid(images, nrow=nrow or 8, padding=2, pad_value=1.0)


def check_output_type(output_type: str) -> None:
    if output_type not in ("pil", "pt", "np"):
        raise UserError(f"output_type {output_type!r} is not one of 'pil', 'pt' (a tensor), 'np' (a numpy array)")


class VQPipeline:
    """A trained VQ-VAE and a prior over its codes: draw new images, or complete real ones."""

    def __init__(self, vqvae: VQVAE, prior, metrics: dict | None = None, dataset: str | None = None,
                 metrics_note: str | None = None):
        """`metrics_note`: why the run's figures are not shown (they describe other weights)."""
        self.vqvae, self.prior, self.metrics, self.dataset = vqvae.eval(), prior.eval(), metrics or {}, dataset
        self.metrics_note = metrics_note

    @classmethod
    def from_pretrained(cls, source: str | Path, prior: str = "prior", device: str | torch.device | None = None,
                        revision: str | None = None, token: str | None = None) -> "VQPipeline":
        """A run folder (`runs/default`), a folder `save_pretrained` wrote, or a Hub repo id
        holding one (`user/name`); `prior` names the prior's folder in it (stage two's
        --prior-dir); `device`: "auto" (None), "cuda", "mps" or "cpu"."""
        folder = Path(source)
        if not folder.is_dir():
            if not HUB_ID.match(str(source)):
                raise UserError(f"no run at {source}: it is neither a folder nor a Hub repo id like user/name; "
                                f"train one with `accelerate launch stage1_vqvae/train.py --run-dir {source}`")
            folder = download_from_hub(str(source), prior, revision, token)
        return cls.from_run(folder, prior, device)

    @classmethod
    def from_run(cls, run_dir: str | Path, prior: str = "prior", device: str | torch.device | None = None) -> "VQPipeline":
        """A local run folder only (what the commands' --run-dir names): a missing one is an
        error naming the command that makes it, never a Hub download."""
        folder = Path(run_dir)
        vqvae, prior_model = load_run(folder, pick_device(device), prior)
        metrics_file = output_of(folder, "metrics.json", prior)
        metrics, note = figures_of_these_weights(metrics_file, vqvae, prior_model)
        return cls(vqvae, prior_model, metrics, dataset_of(folder), note)

    @property
    def device(self) -> torch.device:
        return next(self.vqvae.parameters()).device

    @property
    def class_names(self) -> list[str] | None:
        return self.prior.class_names if self.prior.num_classes else None

    def to(self, device) -> "VQPipeline":
        device = pick_device(device)
        self.vqvae.to(device)
        self.prior.to(device)
        return self

    def __call__(self, n: int | None = None, labels=None, guidance: float | None = None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, passes: int | None = None, seed: int = 0,
                 batch_size: int = 64, output_type: str = "pil", progress: bool = False,
                 transform: int | str = IDENTITY) -> Samples:
        """Draw `n` new images (default 64, or one per label of a list).

        labels: None or "all" (every class, balanced within n, sorted by class), "none", a class
        name or index, or a list of them (one per image). guidance: None uses the scale stage two
        measured best and stored with the prior. passes: MaskGIT's sampling passes. transform:
        draw images as one of the transforms the prior learned makes them (`pipe.prior.transforms`;
        default: the images as they are). The same seed, batch size and device give the same images."""
        if n is not None and n < 1 or batch_size < 1:
            raise UserError(f"n ({n}) and batch_size ({batch_size}) must be at least 1")
        check_sampling_args(temperature, top_k, top_p)
        check_output_type(output_type)
        steps = sampling_passes(passes, self.prior)
        transform_id = resolve_transform(transform, self.prior)
        label_indices = resolve_labels(labels, n, self.prior)
        guidance = resolve_guidance(guidance, label_indices, self.prior)
        count = len(label_indices) if label_indices is not None else (64 if n is None else n)
        codes, images = generate_images(
            self.prior, self.vqvae, label_indices, count, self.device, batch_size, seed, progress=progress,
            temperature=temperature, top_k=top_k, top_p=top_p, guidance=guidance, transform=transform_id, **steps,
        )
        return Samples(as_output(images, output_type), codes, label_indices, guidance)

    def prepare_images(self, images) -> torch.Tensor:
        """PIL images, paths, or a tensor [N, C, S, S] (uint8, or float in [0, 1]) -> uint8 [N, C, S, S]
        at the VQ-VAE's size and channels, resized and cropped as training resized them."""
        size, channels = self.vqvae.image_size, self.vqvae.in_channels
        if isinstance(images, torch.Tensor):
            batch = images[None] if images.dim() == 3 else images
            if batch.dim() != 4 or tuple(batch.shape[1:]) != (channels, size, size):
                raise UserError(f"a tensor of shape {tuple(images.shape)} was given; give [N, {channels}, {size}, {size}] "
                                f"images of this run's size, or PIL images (they are resized)")
            return batch if batch.dtype == torch.uint8 else (batch.float().clamp(0, 1) * 255).round().to(torch.uint8)
        if isinstance(images, (Image.Image, str, Path)):
            images = [images]
        if not len(images):
            raise UserError("no images were given to complete; give a PIL image, a path, or a list of them")
        cells = [image if isinstance(image, Image.Image) else {"path": str(image)} for image in images]
        for cell in cells:
            if isinstance(cell, dict) and not Path(cell["path"]).is_file():
                raise UserError(f"image {cell['path']} does not exist; give an image file, a PIL image or a tensor")
        return torch.stack([to_uint8_tensor(cell, size, channels, f"image {i}") for i, cell in enumerate(cells)])

    @torch.inference_mode()
    def complete(self, images, mask="bottom", samples: int = 4, labels=None, guidance: float | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 passes: int | None = None, seed: int = 0, output_type: str = "pil",
                 transform: int | str = IDENTITY, batch_size: int = 64) -> Completions:
        """Keep part of each image's code map and let the prior redraw the rest.

        mask: "bottom", "top", "left", "right", "center", or a mask (a PIL image, a path, or a
        tensor [H, W] over pixels or [h, w] over codes) whose white/True part is redrawn. The
        transformer and PixelCNN can redraw only a raster-order tail (e.g. "bottom"); MaskGIT
        any region. labels: None (no class), a class name or index, one per image, or "all":
        every image completed as every class (inputs then repeat, image by image). transform:
        one the prior learned (default: the identity); the images are first transformed by it.
        The completions are drawn `batch_size` at a time (memory stays bounded however many
        images come); the same seed, batch size and device give the same completions."""
        if samples < 1 or batch_size < 1:
            raise UserError(f"samples ({samples}, completions per image) and batch_size ({batch_size}) must be at least 1")
        check_sampling_args(temperature, top_k, top_p)
        check_output_type(output_type)
        steps = sampling_passes(passes, self.prior)
        transform_id = resolve_transform(transform, self.prior)
        region = code_region(mask, *self.vqvae.map_shape)
        check_region(region, self.prior, mask)
        pixels = self.prepare_images(images)
        copies = 1  # rows per input image
        if isinstance(labels, str) and labels == "all" and self.prior.num_classes:
            copies = self.prior.num_classes
            label_indices = torch.arange(copies).repeat(len(pixels))
        else:  # None: no class (as "none"), not every class as when drawing new images
            label_indices = None if labels is None else resolve_labels(labels, len(pixels), self.prior)
        guidance = resolve_guidance(guidance, label_indices, self.prior)
        device = self.device
        generator = torch.Generator(device=device).manual_seed(seed)
        sampling = dict(transform=transform_id, temperature=temperature, top_k=top_k, top_p=top_p, guidance=guidance, **steps)
        codes, reconstructions = [], []
        with autocast_for(device):
            for batch in pixels.split(batch_size):  # each input encoded once, however many rows it gets
                inputs = batch.to(device).float() / 255
                if transform_id:
                    inputs = apply_transform(self.prior.transforms[transform_id], inputs)
                codes.append(self.vqvae.encode(inputs))
                reconstructions.append(self.vqvae.decode(codes[-1]).float().cpu())
            reconstructions = torch.cat(reconstructions).repeat_interleave(copies, 0)
            known = repeat(torch.cat(codes).repeat_interleave(copies, 0), "n h w -> (n s) h w", s=samples)
            sample_labels = repeat(label_indices, "n -> (n s)", s=samples) if label_indices is not None else None
            completed, decoded = [], []
            for start in range(0, len(known), batch_size):
                rows = known[start: start + batch_size]
                keep = repeat(~region.to(device), "h w -> m h w", m=len(rows))
                labels_part = sample_labels[start: start + batch_size].to(device) if sample_labels is not None else None
                completed.append(self.prior.generate(len(rows), labels_part, generator=generator, known=rows, keep=keep, **sampling))
                decoded.append(self.vqvae.decode(completed[-1]).float().cpu())
            completed, decoded = torch.cat(completed), torch.cat(decoded)
        completions = rearrange(decoded, "(n s) c h w -> n s c h w", s=samples)
        return Completions(as_output(completions, output_type), as_output(grey_out(reconstructions, region), output_type),
                           rearrange(completed.cpu(), "(n s) h w -> n s h w", s=samples), region, label_indices, guidance)

    def save_pretrained(self, directory: str | Path, grid: bool = True, repo_id: str | None = None) -> Path:
        """Write what sampling needs and nothing else: each model's config.json and
        model.safetensors, pipeline.json (which classes to build), the run's metrics, a sample
        grid (`grid=False` skips drawing it) and a model card (README.md) for the Hub, whose example
        loads `repo_id` (default: the folder)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, model in (("vqvae", self.vqvae), ("prior", self.prior)):
            model.save_pretrained(directory / name)
            (directory / name / "README.md").unlink(missing_ok=True)  # the mixin's generic card; ours is one level up
        description = {"pipeline": type(self).__name__, "vqvae": type(self.vqvae).__name__,
                       "prior": type(self.prior).__name__, "prior_kind": self.prior.prior, "dataset": self.dataset}
        (directory / PIPELINE_FILE).write_text(json.dumps(description, indent=2) + "\n")
        if self.metrics:
            (directory / "metrics.json").write_text(json.dumps(self.metrics, indent=2) + "\n")
        grid_name = None
        if grid:
            samples = self(n=64, output_type="pt")
            grid_name = "samples.png"
            v2.functional.to_pil_image(sample_grid(samples.images, samples.labels)).save(directory / grid_name)
        write_model_card(directory / "README.md", self, grid_name, repo_id or str(directory))
        return directory

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload a VQ-VAE and its prior") -> str:
        """Upload what `save_pretrained` writes (and only that) to the Hub repo `repo_id`,
        creating it if needed; returns the commit's URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, repo_id=repo_id)
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, repo_type="model")
        return str(getattr(commit, "commit_url", commit))


def output_of(run_dir: str | Path, name: str, prior_dir: str) -> Path:
    """Where sample, complete and evaluate write for the run's prior (`samples`, `completions`,
    `metrics.json`), and for a second prior beside it (stage two's --prior-dir), with its name
    after an underscore (`samples_maskgit`, `metrics_maskgit.json`), so that neither overwrites
    the other's."""
    stem, dot, suffix = name.partition(".")
    return Path(run_dir) / (name if prior_dir == "prior" else f"{stem}_{prior_dir}{dot}{suffix}")


def figures_of_these_weights(path: Path, vqvae, prior) -> tuple[dict | None, str | None]:
    """The figures `pipelines.evaluate` wrote, where they describe these weights; else none, and
    a sentence saying why (a stage retrained since, without evaluating it again)."""
    if not path.exists():
        return None, None
    metrics = json.loads(path.read_text())
    measured = metrics.get("weights")
    if measured is None:  # written before evaluate recorded the weights: nothing to check them against
        return metrics, None
    retrained = [stage for stage, key, model in (("stage one", "vqvae", vqvae), ("stage two", "prior", prior))
                 if measured.get(key) != weights_hash(model)]
    if not retrained:
        return metrics, None
    return None, (f"the figures in {path.name} were measured on other weights ({' and '.join(retrained)} trained again "
                  f"since); `python -m pipelines.evaluate` measures these")


def dataset_of(folder: Path) -> str | None:
    """The data set a run trained on, where it has a public name (a Hub id, or Fashion-MNIST):
    a local folder's path would say nothing to another user and may say too much."""
    saved = folder / PIPELINE_FILE
    if saved.exists():
        return json.loads(saved.read_text()).get("dataset")
    config = folder / "vqvae" / "train_config.json"
    if not config.exists():
        return None
    dataset = json.loads(config.read_text()).get("dataset")
    if dataset == "fashion_mnist":
        return "zalando-datasets/fashion_mnist"
    return dataset if isinstance(dataset, str) and HUB_ID.match(dataset) and not Path(dataset).exists() else None


def grey_out(images: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Images [N, C, S, S] with the pixels under the redrawn codes set to grey."""
    scale = images.shape[-1] // region.shape[-1]
    pixels = region.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return images.masked_fill(pixels, 0.5)
