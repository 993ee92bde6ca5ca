"""Reconstruction metrics over a whole split, correct under several processes."""

import math

import torch
import torch.nn.functional as F

from stage1_vqvae.quantizer import histogram_stats


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1], the range every model and metric here uses."""
    return images.float().div_(255)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004): 11x11 Gaussian window, valid
    positions only, pixels in [0, 1]; images smaller than the window use a smaller one."""
    window = min(window, x.shape[-1], x.shape[-2])
    coords = torch.arange(window, dtype=torch.float32, device=x.device) - (window - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma**2))
    g = g / g.sum()
    channels = x.shape[1]
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window)
    blur = lambda t: F.conv2d(t, kernel, groups=channels)  # noqa: E731
    x, y = x.float(), y.float()
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return value.flatten(1).mean(1)


@torch.no_grad()
def reconstruction_metrics(accelerator, model, loader) -> dict:
    """MSE, PSNR and SSIM (pixels in [0, 1]), codebook usage and perplexity over a prepared loader.

    `gather_for_metrics` drops the samples accelerate repeats to even out the last batch.
    """
    was_training = model.training
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    squared_error, pixels, ssim_sum = 0.0, 0, 0.0
    counts = torch.zeros(unwrapped.codebook_size, device=accelerator.device)
    for batch in loader:
        images = to_unit_range(batch["images"])
        with accelerator.autocast():
            codes = unwrapped.encode(images)
            reconstruction = unwrapped.decode(codes).float()
        per_image = (reconstruction - images).pow(2).flatten(1).sum(1)
        per_image, per_image_ssim, codes = accelerator.gather_for_metrics((per_image, ssim(reconstruction, images), codes))
        squared_error += per_image.sum().item()
        ssim_sum += per_image_ssim.sum().item()
        pixels += images[0].numel() * len(per_image)
        counts += torch.bincount(codes.flatten(), minlength=unwrapped.codebook_size)
    model.train(was_training)
    mse = squared_error / max(pixels, 1)
    perplexity, usage = histogram_stats(counts)
    return {
        "mse": mse,
        "psnr": 10 * math.log10(1 / mse) if mse > 0 else float("inf"),
        "ssim": ssim_sum / max(pixels // images[0].numel(), 1),
        "codebook_usage": usage.item(),
        "perplexity": perplexity.item(),
    }
