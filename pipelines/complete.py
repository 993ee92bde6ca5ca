"""`python -m pipelines.complete`: let the prior redraw part of real images.

Each image is encoded to its code map; the codes under `--redraw` are drawn again by the
run's prior and the rest are kept exactly, then every map is decoded. With no flags it takes
8 images of the run's test split, keeps their top half and draws 4 completions of each. The
raster-order priors (transformer, PixelCNN) can only continue a kept top part; a MaskGIT
prior (stage two's `--prior maskgit`) fills any region: a half, the centre, or a mask image.

The grid has one row per image: original | reconstruction with the redrawn region grey |
completions. The completions are also written one PNG each.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torchvision.utils import make_grid, save_image

from pipelines.sample import (
    check_sampling_args, load_run, pick_device, resolve_guidance, resolve_labels, sampling_steps,
)
from stage1_vqvae.cli import parse_config
from stage1_vqvae.data import IMAGE_SUFFIXES, held_in_memory, load_image_data, load_image_file
from stage1_vqvae.dump_codes import data_config_of_run
from stage1_vqvae.errors import UserError, run_cli
from stage1_vqvae.training import use_all_cores
from stage2_prior.priors import PARALLEL_PRIORS
from stage2_prior.quality import autocast_for

REGIONS = ("bottom", "top", "left", "right", "center")


@dataclass
class CompleteConfig:
    run_dir: str = field(default="runs/default", metadata={"help": "run holding vqvae/ and the prior"})
    prior_dir: str = field(default="prior", metadata={"help": "folder of the prior inside the run (stage two's --prior-dir)"})
    images: str | None = field(default=None, metadata={"help": "an image file or a folder of them (default: --n images of the run's test split)"})
    n: int = field(default=8, metadata={"help": "test images to complete when --images is not given"})
    redraw: str = field(default="bottom", metadata={"help": f"region to redraw: {', '.join(REGIONS)}, or a mask image (white = redraw)"})
    samples: int = field(default=4, metadata={"help": "completions per image"})
    label: str | None = field(default=None, metadata={"help": "a class name or index, or 'none' (default: a test image's own class; none for files)"})
    guidance: float | None = field(default=None, metadata={"help": "classifier-free guidance scale (default: the prior's measured best)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature"})
    top_k: int | None = field(default=None, metadata={"help": "sample among the k likeliest codes"})
    top_p: float | None = field(default=None, metadata={"help": "sample among the likeliest codes of total probability p"})
    steps: int | None = field(default=None, metadata={"help": "MaskGIT only: sampling passes (default: the prior's own)"})
    seed: int = field(default=0, metadata={"help": "same seed, same device: same completions"})
    device: str = field(default="auto", metadata={"help": "where to run", "choices": ["auto", "cuda", "mps", "cpu"]})
    out: str | None = field(default=None, metadata={"help": "output folder (default: <run>/completions)"})


def redraw_region(spec: str, height: int, width: int) -> torch.Tensor:
    """--redraw -> bool [height, width] over the code map, True = redraw. A mask image is
    scaled to the map by area; a code is redrawn where its patch is mostly white."""
    rows, cols = torch.arange(height)[:, None], torch.arange(width)[None]
    halves = {
        "bottom": rows >= height // 2, "top": rows < height // 2,
        "left": cols < width // 2, "right": cols >= width // 2,
        "center": ((rows >= height // 4) & (rows < height - height // 4)) & ((cols >= width // 4) & (cols < width - width // 4)),
    }
    if spec in halves:
        return halves[spec].expand(height, width).clone()
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--redraw {spec!r} is neither a region ({', '.join(REGIONS)}) nor an image file; give one of those")
    mask = load_image_file(path, max(height, width) * 8, 1).float()[None] / 255
    return F.adaptive_avg_pool2d(mask, (height, width))[0, 0] > 0.5


def check_region(region: torch.Tensor, prior, spec: str) -> None:
    """A raster-order prior draws a code from the codes before it only, so it can redraw a
    raster-order tail of the map and nothing else."""
    if not region.any():
        raise UserError(f"--redraw {spec} covers no code of the {region.shape[0]}x{region.shape[1]} map; use a larger region")
    tail = region.flatten().int()
    if prior.prior not in PARALLEL_PRIORS and (tail.diff() < 0).any():
        raise UserError(
            f"--redraw {spec} keeps codes after redrawn ones in raster order, which the {prior.prior} prior cannot "
            f"condition on; use --redraw bottom, or a MaskGIT prior (stage two's --prior maskgit --prior-dir NAME, then --prior-dir NAME)"
        )


def user_images(spec: str, image_size: int, channels: int) -> tuple[torch.Tensor, list[str]]:
    """--images (a file or a folder of image files) -> uint8 [N, C, S, S] and their names."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"--images {spec} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}); point it at a folder of images")
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"--images {spec} does not exist; give an image file or a folder of them")
    return torch.stack([load_image_file(file, image_size, channels) for file in files]), [file.name for file in files]


def test_images(run_dir: Path, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    test = held_in_memory(load_image_data(data_config_of_run(run_dir)).test, n)
    return test.images[:n], test.labels[:n] if test.labels is not None else None


@torch.inference_mode()
def complete(vqvae, prior, images: torch.Tensor, region: torch.Tensor, samples: int, labels, device, seed: int = 0,
             **sampling) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 images [N, C, S, S] -> (their code maps [N, h, w], completed maps [N, samples, h, w],
    decoded completions [N, samples, C, S, S] in [0, 1] on the CPU)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    with autocast_for(device):
        codes = vqvae.encode(images.to(device).float() / 255)
        known = repeat(codes, "n h w -> (n s) h w", s=samples)
        keep = repeat(~region.to(device), "h w -> m h w", m=len(known))
        if labels is not None:
            labels = repeat(labels.to(device), "n -> (n s)", s=samples)
        completed = prior.generate(len(known), labels, generator=generator, known=known, keep=keep, **sampling)
        decoded = vqvae.decode(completed).float().cpu()
    return (codes.cpu(), rearrange(completed.cpu(), "(n s) h w -> n s h w", s=samples),
            rearrange(decoded, "(n s) c h w -> n s c h w", s=samples))


def grey_out(images: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Images [N, C, S, S] with the pixels under the redrawn codes set to grey."""
    scale = images.shape[-1] // region.shape[-1]
    pixels = region.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return images.masked_fill(pixels, 0.5)


def main(argv=None):
    config = parse_config(CompleteConfig, argv, description=__doc__.splitlines()[0])
    if config.n < 1 or config.samples < 1:
        raise UserError("--n and --samples must be at least 1")
    check_sampling_args(config.temperature, config.top_k, config.top_p)
    device = pick_device(config.device)
    use_all_cores(device)
    run_dir = Path(config.run_dir)
    vqvae, prior = load_run(run_dir, device, config.prior_dir)
    steps = sampling_steps(config.steps, prior)
    region = redraw_region(config.redraw, *vqvae.map_shape)
    check_region(region, prior, config.redraw)
    if config.images:
        images, names = user_images(config.images, vqvae.image_size, vqvae.in_channels)
        own_labels = None
    else:
        images, own_labels = test_images(run_dir, config.n)
        names = [f"test_{i:04d}" for i in range(len(images))]
    if config.label is None and own_labels is not None and prior.num_classes:
        labels = own_labels
    elif config.label is None:
        labels = None
    else:
        labels, _ = resolve_labels(config.label, len(images), prior)
    guidance = resolve_guidance(config.guidance, labels, prior)
    started = time.time()
    codes, _, completions = complete(
        vqvae, prior, images, region, config.samples, labels, device, config.seed, guidance=guidance,
        temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, **steps,
    )
    seconds = time.time() - started
    with torch.inference_mode():
        reconstructions = vqvae.decode(codes.to(device)).float().cpu()
    out = Path(config.out) if config.out else run_dir / "completions"
    out.mkdir(parents=True, exist_ok=True)
    originals = images.float() / 255
    rows = torch.cat([originals[:, None], grey_out(reconstructions, region)[:, None], completions], dim=1)
    save_image(make_grid(rearrange(rows, "n k c h w -> (n k) c h w"), nrow=rows.shape[1], padding=2, pad_value=1.0), out / "grid.png")
    for name, row in zip(names, completions):
        for j, image in enumerate(row):
            save_image(image, out / f"{Path(name).stem}_{j}.png")
    print(f"Wrote {len(images)} x {config.samples} completions (redrawn: {config.redraw}, {int(region.sum())} of "
          f"{region.numel()} codes, guidance {guidance:g}) to {out} (grid.png: original | kept | completions) in {seconds:.2f}s")


if __name__ == "__main__":
    run_cli(main)
