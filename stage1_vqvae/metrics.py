"""Reconstruction metrics over a whole split, correct under several processes."""

import math

import torch
from torch.utils.data import DataLoader

from stage1_vqvae.data import collate_batches
from stage1_vqvae.quantizer import histogram_stats


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1], the range every model and metric here uses."""
    return images.float().div_(255)


def eval_loader(dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_batches)


@torch.no_grad()
def reconstruction_metrics(accelerator, model, loader) -> dict:
    """MSE and PSNR (pixels in [0, 1]), codebook usage and perplexity over a prepared loader.

    `gather_for_metrics` drops the samples accelerate repeats to even out the last batch.
    """
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    squared_error, pixels = 0.0, 0
    counts = torch.zeros(unwrapped.codebook_size, device=accelerator.device)
    for batch in loader:
        images = to_unit_range(batch["images"])
        with accelerator.autocast():
            codes = unwrapped.encode(images)
            reconstruction = unwrapped.decode(codes).float()
        per_image = (reconstruction - images).pow(2).flatten(1).sum(1)
        per_image, codes = accelerator.gather_for_metrics((per_image, codes))
        squared_error += per_image.sum().item()
        pixels += images[0].numel() * len(per_image)
        counts += torch.bincount(codes.flatten(), minlength=unwrapped.codebook_size)
    model.train()
    mse = squared_error / max(pixels, 1)
    perplexity, usage = histogram_stats(counts)
    return {
        "mse": mse,
        "psnr": 10 * math.log10(1 / mse) if mse > 0 else float("inf"),
        "codebook_usage": usage.item(),
        "perplexity": perplexity.item(),
    }
