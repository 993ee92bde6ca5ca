"""Inception-v3 pool features for the Frechet distance, when torchvision's weights are
already on this machine (they cannot be fetched everywhere, so nothing is downloaded)."""

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def cached_inception(device) -> nn.Module | None:
    """torchvision's Inception v3 with its classifier removed, or None if its weights are not cached."""
    from torchvision.models import Inception_V3_Weights, inception_v3

    weights = Inception_V3_Weights.IMAGENET1K_V1
    if not (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)).exists():
        return None
    model = inception_v3(weights=weights)
    model.fc = nn.Identity()
    return model.to(device).eval()


@torch.no_grad()
def inception_features(model: nn.Module, images: torch.Tensor, device, batch_size: int = 100) -> torch.Tensor:
    """Images (uint8, or float in [0, 1]) -> 2048-d pool features, float64, on the CPU."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    features = []
    for start in range(0, len(images), batch_size):
        batch = images[start: start + batch_size].to(device)
        batch = batch.float() / 255 if batch.dtype == torch.uint8 else batch.float()
        batch = batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch
        batch = F.interpolate(batch, size=(299, 299), mode="bilinear", align_corners=False)
        features.append(model((batch - mean) / std).double().cpu())
    return torch.cat(features)
