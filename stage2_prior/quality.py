"""How good a prior's images look to the run's judge, and the guidance scale that serves it best.

Stage two's final evaluation sweeps classifier-free guidance scales with these functions and
stores the best in the prior's config.json (`default_guidance`), so that sampling with no
flags uses what the prior learned; `pipelines.evaluate` reports the same figures.
"""

import torch
from tqdm.auto import tqdm

from foundation.errors import UserError
from foundation.judge import judge_images
from foundation.training import bf16_is_fast


def parse_scales(text: str, flag: str) -> list[float]:
    """'1,1.5,2' -> [1.0, 1.5, 2.0]; '' -> []."""
    try:
        scales = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a comma-separated list of numbers, e.g. 1,1.5,2,3") from None
    if any(scale < 0 for scale in scales):
        raise UserError(f"{flag} {text!r} holds a negative scale; use scales of 0 or more (1: no guidance)")
    return scales


def autocast_for(device: torch.device):
    """bf16 autocast on a CUDA GPU with native bf16 (the decoder and prior are bandwidth-bound
    there); none elsewhere (on this project's CPU, bf16 samples measured slightly worse)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16_is_fast("cuda"))
    return torch.autocast(device.type, enabled=False)


def balanced_labels(n: int, num_classes: int) -> torch.Tensor | None:
    """0, 1, ..., K-1, 0, 1, ...: every class equally often, or None for an unconditional prior."""
    return torch.arange(n) % num_classes if num_classes else None


@torch.inference_mode()
def generate_images(prior, vqvae, labels, n: int, device, batch_size: int = 500, seed: int = 0,
                    progress: bool = False, **sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """n code maps and their decoded images (both on the CPU), in batches; `sampling` holds
    generate's temperature, top_k, top_p and guidance."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    codes, images = [], []
    batches = range(0, n, batch_size)
    for start in tqdm(batches, desc="sampling", unit="batch", disable=not progress or len(batches) == 1):
        count = min(batch_size, n - start)
        batch_labels = labels[start: start + count].to(device) if labels is not None else None
        with autocast_for(device):
            batch_codes = prior.generate(count, batch_labels, generator=generator, progress=progress and len(batches) == 1, **sampling)
            batch_images = vqvae.decode(batch_codes)
        codes.append(batch_codes.cpu())
        images.append(batch_images.float().cpu())
    return torch.cat(codes), torch.cat(images)


def guidance_sweep(prior, vqvae, judge, reference_features, n: int, device, scales,
                   batch_size: int = 500, seed: int = 0) -> list[dict]:
    """One row per guidance scale: {guidance, fd, classifier_accuracy}, on balanced classes."""
    labels = balanced_labels(n, prior.num_classes)
    rows = []
    for scale in scales:
        _, images = generate_images(prior, vqvae, labels, n, device, batch_size, seed, guidance=scale)
        rows.append({"guidance": scale, **judge_images(judge, images, reference_features, device, labels)})
    return rows


# On the icons' 197 test images, 2,000 samples a scale rather than 197 cut the bootstrap spread of
# the FD's differences between scales from 65-130 to 32-50 (on distances of 600-900). On 16x16
# maps (64 pixels) a sample costs several times as much: 500 samples a scale took the sweep 6.7
# minutes on one core, where both stages at 64 pixels took 15 of the 20 minutes allowed, with
# the sweep on as many samples as the test images.
SWEEP_MAX_CODES = 8 * 8


def sweep_samples(n: int, test_images: int, map_shape: tuple[int, int]) -> int:
    """Samples a guidance scale is judged on: all n on maps of up to 8x8 codes (the scales are
    compared with each other against one reference, so the samples need not be as few as the
    test images); on larger maps, as many as the test images, at most n."""
    height, width = map_shape
    return n if height * width <= SWEEP_MAX_CODES else min(n, test_images)


# FD on 2000 samples moves by up to 20% between sampling seeds: scales closer than this are a tie.
# A wider, measured window was tried: twice the bootstrap spread of each scale's FD difference
# from the lowest. On Fashion-MNIST that spread (0.45-0.49) matched how the gap moved between
# sampling seeds (1.5 minus 1.35: 0.91, 0.45, 0.21), and twice it tied 1.5 with 1.35, whose FD is
# lower on every seed; the window stays the fixed one, and the sweep draws its samples to suit.
FD_TIE = 0.05


def best_guidance(rows: list[dict]) -> float:
    """The scale of lowest Frechet distance (the best balance of fidelity and variety); among
    scales within FD_TIE of it, which the FD cannot tell apart, the one whose samples the judge
    recognises as their class most often."""
    lowest = min(row["fd"] for row in rows)
    tied = [row for row in rows if row["fd"] <= lowest * (1 + FD_TIE)]
    return max(tied, key=lambda row: row["classifier_accuracy"])["guidance"]
