"""Test negative log-likelihood of a prior, in bits per code and per image dimension."""

import math

import torch
import torch.nn.functional as F

LOG2 = math.log(2)


@torch.no_grad()
def test_nll(accelerator, model, loader, autocast=None) -> float:
    """Mean NLL in bits per code over a prepared loader of {"codes", "labels"?} batches, under
    the accelerator's autocast unless another context factory is given."""
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        with (autocast or accelerator.autocast)():
            logits = model(batch["codes"], batch.get("labels"))
        per_map = F.cross_entropy(logits.float(), batch["codes"], reduction="none").flatten(1).sum(1)
        per_map = accelerator.gather_for_metrics(per_map)
        total, count = total + per_map.sum().item(), count + per_map.numel() * batch["codes"][0].numel()
    return total / count / LOG2


def prior_bits_per_dim(nll_bits_per_code: float, vqvae) -> float:
    """The prior's share of the VQ-VAE bound: bits per code map spread over the image's dimensions."""
    height, width = vqvae.map_shape
    return nll_bits_per_code * height * width / (vqvae.in_channels * vqvae.image_size**2)
