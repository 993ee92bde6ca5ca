"""Test negative log-likelihood of a prior, in bits per code and per image dimension.

MaskGIT has no tractable likelihood; its test figure is the cross-entropy of the codes it is
asked to fill in, under the training's random cosine masks, drawn from a fixed seed so that
every evaluation sees the same masks. It is not comparable with the raster priors' NLL.
"""

import math

import torch
import torch.nn.functional as F

from stage2_prior.maskgit import random_mask

LOG2 = math.log(2)


@torch.no_grad()
def test_nll(accelerator, model, loader, autocast=None, masked: bool = False) -> float:
    """Mean NLL in bits per code over a prepared loader of {"codes", "labels"?, "transforms"?} batches, under
    the accelerator's autocast unless another context factory is given; `masked`: MaskGIT's
    bits per hidden code instead, under seeded masks."""
    model.eval()
    generator = torch.Generator().manual_seed(0)
    total, count = 0.0, 0
    for batch in loader:
        codes = batch["codes"]
        mask = random_mask(len(codes), codes[0].numel(), "cpu", generator).view_as(codes).to(codes.device) if masked else None
        with (autocast or accelerator.autocast)():
            logits = model(codes, batch.get("labels"), mask, transforms=batch.get("transforms")) if masked \
                else model(codes, batch.get("labels"), batch.get("transforms"))
        losses = F.cross_entropy(logits.float(), codes, reduction="none")
        scored = mask if masked else torch.ones_like(codes, dtype=torch.bool)
        per_map = accelerator.gather_for_metrics(torch.stack([(losses * scored).flatten(1).sum(1), scored.flatten(1).sum(1).float()], 1))
        total, count = total + per_map[:, 0].sum().item(), count + per_map[:, 1].sum().item()
    return total / count / LOG2


def prior_bits_per_dim(nll_bits_per_code: float, vqvae) -> float:
    """The prior's share of the VQ-VAE bound: bits per code map spread over the image's dimensions."""
    height, width = vqvae.map_shape
    return nll_bits_per_code * height * width / (vqvae.in_channels * vqvae.image_size**2)
