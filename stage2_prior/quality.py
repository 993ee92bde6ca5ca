"""How good a prior's images look to the run's judge, and the guidance scale that serves it best.

Stage two's final evaluation sweeps classifier-free guidance scales with these functions and
stores the best in the prior's config.json (`default_guidance`), so that sampling with no
flags uses what the prior learned; `pipelines.evaluate` reports the same figures.
"""

import torch
from tqdm.auto import tqdm

from foundation.errors import UserError
from foundation.judge import class_accuracy, features_and_predictions, frechet_distance, frechet_gap_spreads
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
    """One row per guidance scale: {guidance, fd, gap_spread, classifier_accuracy}, on balanced
    classes; `gap_spread` is the bootstrap spread of the row's FD minus the lowest FD of the sweep."""
    labels = balanced_labels(n, prior.num_classes)
    rows, features = [], []
    for scale in scales:
        _, images = generate_images(prior, vqvae, labels, n, device, batch_size, seed, guidance=scale)
        scale_features, predictions = features_and_predictions(judge, images, device)
        features.append(scale_features)
        rows.append({"guidance": scale, "fd": frechet_distance(scale_features, reference_features),
                     "classifier_accuracy": class_accuracy(predictions, labels)})
    lowest = min(range(len(rows)), key=lambda index: rows[index]["fd"])
    for row, spread in zip(rows, frechet_gap_spreads(features, reference_features, lowest)):
        row["gap_spread"] = spread
    return rows


# On Fashion-MNIST (2000 samples against 8000 test images) the FD moves by a few percent between
# sampling seeds: scales closer than this are a tie however steady the bootstrap says they are.
FD_TIE = 0.05


def best_guidance(rows: list[dict]) -> float:
    """The scale of lowest Frechet distance (the best balance of fidelity and variety); among
    scales the FD cannot tell apart from it (within FD_TIE, or within twice the bootstrap spread
    of their difference, which on a test split of a few hundred images can be a fifth of the
    distance), the one whose samples the judge recognises as their class most often."""
    best = min(rows, key=lambda row: row["fd"])
    tied = [row for row in rows
            if row["fd"] - best["fd"] <= max(FD_TIE * best["fd"], 2 * row.get("gap_spread", 0.0))]
    return max(tied, key=lambda row: row["classifier_accuracy"])["guidance"]
