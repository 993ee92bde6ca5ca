"""`python -m pipelines.complete`: let the prior redraw part of real images.

A command-line layer over `VQPipeline.complete`. Each image is encoded to its code map; the codes under `--redraw` are drawn again by the
run's prior and the rest are kept exactly, then every map is decoded. With no flags it takes
8 images of the run's test split, keeps their top half and draws 4 completions of each. The
raster-order priors (transformer, PixelCNN) can only continue a kept top part; a MaskGIT
prior (stage two's `--prior maskgit`) fills any region: a half, the centre, or a mask image.

The grid has one row per image: original | reconstruction with the redrawn region grey |
completions. The completions are also written one PNG each, named after the image's path inside
--images (a/x.png -> a/x_0.png, a/x_1.png, ...).
"""

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from einops import rearrange
from torchvision.utils import make_grid, save_image

from foundation.cli import parse_config
from foundation.data import IMAGE_SUFFIXES, run_test_images
from foundation.errors import UserError, run_cli
from foundation.training import use_all_cores
from pipelines.pipeline import VQPipeline, output_of
from pipelines.region import REGIONS


@dataclass
class CompleteConfig:
    RENAMED_FLAGS: ClassVar[dict] = {"--steps": "--passes"}

    run_dir: str = field(default="runs/default", metadata={"help": "run holding vqvae/ and the prior"})
    prior_dir: str = field(default="prior", metadata={"help": "folder of the prior inside the run (stage two's --prior-dir)"})
    images: str | None = field(default=None, metadata={"help": "an image file or a folder of them (default: --n images of the run's test split)"})
    n: int = field(default=8, metadata={"help": "test images to complete when --images is not given"})
    redraw: str = field(default="bottom", metadata={"help": f"region to redraw: {', '.join(REGIONS)}, or a mask image (white = redraw)"})
    samples: int = field(default=4, metadata={"help": "completions per image"})
    label: str | None = field(default=None, metadata={"help": "a class name or index, 'all' (each image as every class), or 'none' "
                                                               "(default: a test image's own class; none for files)"})
    guidance: float | None = field(default=None, metadata={"help": "classifier-free guidance scale (default: the prior's measured best)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature"})
    top_k: int | None = field(default=None, metadata={"help": "sample among the k likeliest codes"})
    top_p: float | None = field(default=None, metadata={"help": "sample among the likeliest codes of total probability p"})
    passes: int | None = field(default=None, metadata={"help": "MaskGIT only: sampling passes (default: the prior's own)"})
    transform: str = field(default="identity", metadata={"help": "complete the images as one of the transforms the prior "
                                                                 "learned makes them (stage one's --map-transforms, e.g. flip)"})
    seed: int = field(default=0, metadata={"help": "same seed, batch size and device: same completions"})
    batch_size: int = field(default=64, metadata={"help": "completions drawn at a time (bounds the memory, whatever --images holds)"})
    device: str = field(default="auto", metadata={"help": "where to run", "choices": ["auto", "cuda", "mps", "cpu"]})
    out: str | None = field(default=None, metadata={"help": "output folder (default: <run>/completions; <run>/completions_<prior-dir> for another prior)"})


def image_files(spec: str) -> list[Path]:
    """--images (a file or a folder of image files) -> the files."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"--images {spec} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}); point it at a folder of images")
        return files
    if path.is_file():
        return [path]
    raise UserError(f"--images {spec} does not exist; give an image file or a folder of them")


def output_names(files: list[Path], spec: str) -> list[str]:
    """Each file's name for its completions: its path inside the --images folder without the
    suffix (a/x.png -> a/x), so that a/x.png and b/x.png do not overwrite each other; with the
    suffix where two files differ only by it (x.png, x.jpg -> x.png, x.jpg)."""
    root = Path(spec) if Path(spec).is_dir() else Path(spec).parent
    names = [file.relative_to(root).with_suffix("").as_posix() for file in files]
    return [file.relative_to(root).as_posix() if names.count(name) > 1 else name for file, name in zip(files, names)]


def main(argv=None):
    config = parse_config(CompleteConfig, argv, description=__doc__.splitlines()[0])
    if config.n < 1 or config.samples < 1 or config.batch_size < 1:
        raise UserError("--n, --samples and --batch-size must be at least 1")
    run_dir = Path(config.run_dir)
    pipe = VQPipeline.from_run(run_dir, prior=config.prior_dir, device=config.device)
    use_all_cores(pipe.device)
    if config.images:
        files = image_files(config.images)
        images, names, own_labels = pipe.prepare_images(files), output_names(files, config.images), None
    else:
        images, own_labels = run_test_images(run_dir, config.n, pipe.vqvae.in_channels)
        names = [f"test_{i:04d}" for i in range(len(images))]
    labels = config.label
    if labels is None and own_labels is not None and pipe.prior.num_classes:
        labels = own_labels
    elif labels == "none":
        labels = None
    started = time.time()
    result = pipe.complete(images, config.redraw, config.samples, labels=labels, guidance=config.guidance,
                           temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                           passes=config.passes, seed=config.seed, output_type="pt", transform=config.transform,
                           batch_size=config.batch_size)
    seconds = time.time() - started
    out = Path(config.out) if config.out else output_of(run_dir, "completions", config.prior_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_input = len(result.images) // len(images)  # --label all: each image once per class
    originals = (images.float() / 255).repeat_interleave(per_input, 0)
    rows = torch.cat([originals[:, None], result.kept[:, None], result.images], dim=1)
    save_image(make_grid(rearrange(rows, "n k c h w -> (n k) c h w"), nrow=rows.shape[1], padding=2, pad_value=1.0), out / "grid.png")
    class_names = pipe.class_names or []
    for i, row in enumerate(result.images):
        name = names[i // per_input]
        if per_input > 1:
            class_name = class_names[i % per_input] if class_names else str(i % per_input)
            name += "_" + re.sub(r"[^\w.-]+", "-", class_name)  # T-shirt/top -> T-shirt-top
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        for j, image in enumerate(row):
            save_image(image, out / f"{name}_{j}.png")
    region = result.region
    print(f"Wrote {len(result.images)} x {config.samples} completions (redrawn: {config.redraw}, {int(region.sum())} of "
          f"{region.numel()} codes, guidance {result.guidance:g}) to {out} (grid.png: original | kept | completions) in {seconds:.2f}s")


if __name__ == "__main__":
    run_cli(main)
