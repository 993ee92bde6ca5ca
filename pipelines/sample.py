"""`python -m pipelines.sample --n 64`: new images from a trained run.

A command-line layer over `VQPipeline`: codes come from the run's prior, images from its
VQ-VAE's decoder; on the GPU when there is one (bf16 autocast on CUDA), on every core
otherwise. With no flags a class-conditional prior draws every class equally (within --n),
one grid row per class, at the guidance scale stage two measured best (stored in the prior's
config.json).
"""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torchvision.utils import save_image

from foundation.cli import parse_config
from foundation.errors import UserError, run_cli
from foundation.training import use_all_cores
from pipelines.pipeline import VQPipeline, output_of, sample_grid
from stage2_prior.priors import PARALLEL_PRIORS


@dataclass
class SampleConfig:
    RENAMED_FLAGS: ClassVar[dict] = {"--steps": "--passes"}

    run_dir: str = field(default="runs/default", metadata={"help": "run holding vqvae/ and prior/"})
    prior_dir: str = field(default="prior", metadata={"help": "folder of the prior inside the run (stage two's --prior-dir)"})
    n: int = field(default=64, metadata={"help": "how many images"})
    batch_size: int = field(default=64, metadata={"help": "code maps sampled at once"})
    label: str | None = field(
        default=None, metadata={"help": "a class name or index, 'all' (the default for a conditional prior: every class "
                                        "equally, one row per class), or 'none'"}
    )
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature"})
    top_k: int | None = field(default=None, metadata={"help": "sample among the k likeliest codes"})
    top_p: float | None = field(default=None, metadata={"help": "sample among the likeliest codes of total probability p"})
    guidance: float | None = field(default=None, metadata={"help": "classifier-free guidance scale (1: none; default: the prior's measured best)"})
    passes: int | None = field(default=None, metadata={"help": "MaskGIT only: sampling passes (default: the prior's own)"})
    transform: str = field(default="identity", metadata={"help": "draw images as one of the transforms the prior learned "
                                                                 "makes them (stage one's --map-transforms, e.g. flip)"})
    seed: int = field(default=0, metadata={"help": "same seed, same device: same images"})
    device: str = field(default="auto", metadata={"help": "where to sample", "choices": ["auto", "cuda", "mps", "cpu"]})
    out: str | None = field(default=None, metadata={"help": "output folder (default: <run>/samples; <run>/samples_<prior-dir> for another prior)"})
    nrow: int | None = field(default=None, metadata={"help": "images per grid row (default: one row per class, else 8)"})


def write_samples(images: torch.Tensor, codes: torch.Tensor, out: Path, grid: torch.Tensor) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_image(grid, out / "grid.png")
    for i, image in enumerate(images):
        save_image(image, out / f"{i:04d}.png")
    np.save(out / "codes.npy", codes.numpy().astype(np.uint16))


def main(argv=None):
    config = parse_config(SampleConfig, argv, description=__doc__.splitlines()[0])
    if config.n < 1 or config.batch_size < 1:
        raise UserError("--n and --batch-size must be at least 1")
    if config.nrow is not None and config.nrow < 1:
        raise UserError(f"--nrow {config.nrow} must be at least 1")
    pipe = VQPipeline.from_run(config.run_dir, prior=config.prior_dir, device=config.device)
    use_all_cores(pipe.device)
    started = time.time()
    samples = pipe(n=config.n, labels=config.label, guidance=config.guidance, temperature=config.temperature,
                   top_k=config.top_k, top_p=config.top_p, passes=config.passes, seed=config.seed, transform=config.transform,
                   batch_size=config.batch_size, output_type="pt", progress=True)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - started
    out = Path(config.out) if config.out else output_of(config.run_dir, "samples", config.prior_dir)
    every_class = samples.labels is not None and config.label in (None, "all")
    write_samples(samples.images, samples.codes, out, sample_grid(samples.images, samples.labels, config.nrow))
    n = len(samples.codes)
    if every_class:
        counts = torch.bincount(samples.labels)
        low, high = int(counts.min()), int(counts.max())
        what = f"{low} per class" if low == high else f"{low}-{high} per class"
    else:
        what = "unconditional" if samples.labels is None else "one class"
    if pipe.prior.prior in PARALLEL_PRIORS:
        what += f", {config.passes or pipe.prior.default_steps} passes"
    if config.transform != "identity":
        what += f", as {config.transform} makes them"
    print(f"Wrote {n} samples ({what}, guidance {samples.guidance:g}) to {out} (grid.png, 0000.png..., codes.npy) in "
          f"{seconds:.2f}s: {n / seconds:.1f} images/s on {pipe.device}")


if __name__ == "__main__":
    run_cli(main)
