"""The standard FID, through torchmetrics' `FrechetInceptionDistance`.

It uses the Inception weights every paper uses (the TensorFlow 2015 graph, ported by
pytorch-fid and torch-fidelity), so its figures compare with published FIDs; torchvision's
ImageNet Inception gives distances that do not. The weights (about 100 MB) are fetched once
into the torch hub cache; where they cannot be had, `load_fid_metric` says why and evaluate
skips the FID with that note. The run's own classifier distance stays the default yardstick.
"""

import torch

FID_EXTRA = "pip install 'torchmetrics[image]'"


def load_fid_metric(device, feature=2048):
    """A `FrechetInceptionDistance` that keeps its real statistics across `reset()`;
    ValueError with the reason when torchmetrics, torch-fidelity or the weights are missing."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise ValueError(f"torchmetrics is not installed ({FID_EXTRA})") from None
    try:
        metric = FrechetInceptionDistance(feature=feature, reset_real_features=False)
    except ModuleNotFoundError as error:  # torch-fidelity, which holds the Inception network
        raise ValueError(f"{error.name or 'torch-fidelity'} is not installed ({FID_EXTRA})") from None
    except Exception as error:  # the weights are downloaded on first use
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise ValueError(f"its Inception weights could not be loaded ({reason})") from None
    return metric.to(device)


def as_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8, or floats in [0, 1] rounded as a saved PNG would be; grayscale repeated to RGB."""
    if images.dtype != torch.uint8:
        images = (images.float() * 255).round().clamp(0, 255).to(torch.uint8)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


@torch.no_grad()
def standard_fid(metric, reference: torch.Tensor, generated: torch.Tensor, held_out: torch.Tensor,
                 batch_size: int = 200) -> dict:
    """FID of `generated` and of `held_out` real images (the floor), both against `reference`."""
    device = metric.device

    def add(images, real):
        for start in range(0, len(images), batch_size):
            metric.update(as_rgb_uint8(images[start: start + batch_size]).to(device), real=real)

    add(reference, True)
    add(generated, False)
    fid = metric.compute().item()
    metric.reset()  # the reference statistics stay
    add(held_out, False)
    return {"fid": fid, "fid_floor": metric.compute().item()}
