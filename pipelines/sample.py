"""`python -m pipelines.sample --n 64`: new images from a trained run.

Codes come from the run's prior, images from its VQ-VAE's decoder; on the GPU when there is
one (bf16 autocast on CUDA), on every core otherwise. With no flags a class-conditional prior
draws every class equally, one grid row per class, at the guidance scale stage two measured
best (stored in the prior's config.json).
"""

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid, save_image

from stage1_vqvae.cli import parse_config
from stage1_vqvae.codes import weights_hash
from stage1_vqvae.dump_codes import load_vqvae
from stage1_vqvae.errors import UserError, run_cli
from stage1_vqvae.training import use_all_cores
from stage2_prior.priors import PARALLEL_PRIORS, load_prior
from stage2_prior.quality import generate_images


@dataclass
class SampleConfig:
    run_dir: str = field(default="runs/default", metadata={"help": "run holding vqvae/ and prior/"})
    prior_dir: str = field(default="prior", metadata={"help": "folder of the prior inside the run (stage two's --prior-dir)"})
    n: int = field(default=64, metadata={"help": "how many images"})
    batch_size: int = field(default=64, metadata={"help": "code maps sampled at once"})
    label: str | None = field(
        default=None, metadata={"help": "a class name or index, 'all' (the default for a conditional prior: one row per class), or 'none'"}
    )
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature"})
    top_k: int | None = field(default=None, metadata={"help": "sample among the k likeliest codes"})
    top_p: float | None = field(default=None, metadata={"help": "sample among the likeliest codes of total probability p"})
    guidance: float | None = field(default=None, metadata={"help": "classifier-free guidance scale (1: none; default: the prior's measured best)"})
    steps: int | None = field(default=None, metadata={"help": "MaskGIT only: sampling passes (default: the prior's own)"})
    seed: int = field(default=0, metadata={"help": "same seed, same device: same images"})
    device: str = field(default="auto", metadata={"help": "where to sample", "choices": ["auto", "cuda", "mps", "cpu"]})
    out: str | None = field(default=None, metadata={"help": "output folder (default: <run>/samples, or <run>/samples/<prior-dir>)"})
    nrow: int = field(default=8, metadata={"help": "images per grid row"})


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device auto or --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for but Apple's MPS is not available; use --device auto or --device cpu")
    return torch.device(name)


def load_run(run_dir: Path, device: torch.device, prior_dir: str = "prior"):
    """The run's VQ-VAE and prior, in eval mode on `device`, checked to belong together."""
    vqvae = load_vqvae(run_dir)
    prior = load_prior(run_dir / prior_dir)
    if prior.codes_source and prior.codes_source != weights_hash(vqvae):
        flag = "" if prior_dir == "prior" else f" --prior-dir {prior_dir}"
        raise UserError(
            f"the prior in {run_dir / prior_dir} was trained on codes of another VQ-VAE than {run_dir / 'vqvae'}; "
            f"retrain it with `accelerate launch stage2_prior/train.py --run-dir {run_dir}{flag} --overwrite`"
        )
    return vqvae.to(device).eval(), prior.to(device).eval()


def resolve_labels(label: str | None, n: int, prior) -> tuple[torch.Tensor | None, int | None]:
    """--label -> (labels for every sample or None, grid row length or None).

    No --label means 'all' for a class-conditional prior and 'none' for an unconditional one."""
    if label is None:
        label = "all" if prior.num_classes else "none"
    if label == "none":
        return None, None
    names = prior.class_names or []
    if not prior.num_classes:
        raise UserError(f"--label {label} was given but this prior is unconditional; drop --label")
    if label == "all":
        per_class = math.ceil(n / prior.num_classes)
        return torch.arange(prior.num_classes).repeat_interleave(per_class), per_class
    if label in names:
        return torch.full((n,), names.index(label)), None
    if label.lstrip("-").isdigit() and 0 <= int(label) < prior.num_classes:
        return torch.full((n,), int(label)), None
    raise UserError(
        f"--label {label} is neither a class name nor an index from 0 to {prior.num_classes - 1}; "
        f"classes: {', '.join(names) if names else prior.num_classes}; or use --label all or --label none"
    )


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """The sampling flags, refused in one sentence before any model sees them (--steps, which
    depends on the prior, in `sampling_steps`)."""
    if not temperature > 0:
        raise UserError(f"--temperature {temperature} must be above 0 (1.0 samples the prior as trained)")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k {top_k} must be at least 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top-p {top_p} must lie in (0, 1]")


def check_null_label_was_trained(prior, asked: str) -> None:
    """Guidance and unconditional samples of a class-conditional prior use its null label,
    which it only learned if training dropped labels (--label-dropout above 0)."""
    if prior.num_classes and getattr(prior, "label_dropout", None) == 0:
        raise UserError(
            f"{asked} needs the prior's null label, but it was trained with --label-dropout 0 and never learned it; "
            f"sample with a class and no guidance, or retrain stage two with --label-dropout 0.1"
        )


def resolve_guidance(guidance: float | None, labels, prior) -> float:
    """--guidance, else the prior's measured best when there are labels to guide towards."""
    if labels is None and prior.num_classes:
        check_null_label_was_trained(prior, "--label none")
    if guidance is None:
        return getattr(prior, "default_guidance", 1.0) if labels is not None else 1.0
    if guidance < 0:
        raise UserError(f"--guidance {guidance} must be at least 0 (1: no guidance)")
    if guidance != 1.0 and labels is None:
        what = "this prior is unconditional" if not prior.num_classes else "--label none asks for no class"
        raise UserError(f"--guidance {guidance} steers samples towards their class, but {what}; drop --guidance")
    if guidance != 1.0:
        check_null_label_was_trained(prior, f"--guidance {guidance:g}")
    return guidance


def sampling_steps(steps: int | None, prior) -> dict:
    """--steps as generate's keyword: only a parallel prior (MaskGIT) has passes to choose."""
    if steps is None:
        return {}
    if prior.prior not in PARALLEL_PRIORS:
        raise UserError(f"--steps {steps} sets MaskGIT's sampling passes, but this run's prior is a {prior.prior}, "
                        f"which draws one code per pass; drop --steps")
    if steps < 1:
        raise UserError(f"--steps {steps} must be at least 1 (the prior's default: {prior.default_steps})")
    return {"steps": steps}


def sample_images(vqvae, prior, labels, n, config: SampleConfig, device, guidance: float,
                  steps: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """n code maps and their decoded images (on the CPU), in batches of --batch-size; `steps`
    is `sampling_steps`' keyword."""
    return generate_images(
        prior, vqvae, labels, n, device, config.batch_size, config.seed, progress=True,
        temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, guidance=guidance, **steps,
    )


def write_samples(images: torch.Tensor, codes: torch.Tensor, out: Path, nrow: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(images, nrow=nrow, padding=2, pad_value=1.0), out / "grid.png")
    for i, image in enumerate(images):
        save_image(image, out / f"{i:04d}.png")
    np.save(out / "codes.npy", codes.numpy().astype(np.uint16))


def main(argv=None):
    config = parse_config(SampleConfig, argv, description=__doc__.splitlines()[0])
    if config.n < 1 or config.batch_size < 1:
        raise UserError("--n and --batch-size must be at least 1")
    check_sampling_args(config.temperature, config.top_k, config.top_p)
    device = pick_device(config.device)
    use_all_cores(device)
    run_dir = Path(config.run_dir)
    vqvae, prior = load_run(run_dir, device, config.prior_dir)
    steps = sampling_steps(config.steps, prior)  # a wrong --steps stops here, before any work
    labels, row = resolve_labels(config.label, config.n, prior)
    guidance = resolve_guidance(config.guidance, labels, prior)
    n = len(labels) if labels is not None else config.n
    started = time.time()
    codes, images = sample_images(vqvae, prior, labels, n, config, device, guidance, steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - started
    # a second prior's samples go beside the first's instead of over them
    out = Path(config.out) if config.out else run_dir / "samples" / ("" if config.prior_dir == "prior" else config.prior_dir)
    write_samples(images, codes, out, row or config.nrow)
    what = f"{row} per class" if row else ("unconditional" if labels is None else "one class")
    if prior.prior in PARALLEL_PRIORS:
        what += f", {config.steps or prior.default_steps} passes"
    print(f"Wrote {n} samples ({what}, guidance {guidance:g}) to {out} (grid.png, 0000.png..., codes.npy) in "
          f"{seconds:.2f}s: {n / seconds:.1f} images/s on {device}")


if __name__ == "__main__":
    run_cli(main)
