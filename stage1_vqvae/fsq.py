"""Finite scalar quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made
Simple"): `--quantizer fsq`, beside the vector quantizer.

The encoder's vector is projected to a few channels, each bounded and rounded to one of a small
number of levels; the code is the tuple of levels (levels 8,8,8: 512 codes). There is no
codebook to learn, so no codebook or commitment loss, no restarts and no code that can fall idle
for want of a nearest encoder output. Rounding passes the decoder's gradient straight through.
A code's vector, what stage two reads with `--codebook-inputs`, is its tuple of levels scaled
to [-1, 1].
"""

import math

import torch
from einops import rearrange
from torch import nn

from stage1_vqvae.quantizer import QuantizerOutput, histogram_stats

# The paper's levels for about 2^8 ... 2^16 codes (its table 1), and 8,8,8 for the VQ-VAE's 512:
# each level count at least 5, the product near the size asked for.
LEVELS_FOR_CODEBOOK = {256: [8, 6, 5], 512: [8, 8, 8], 1024: [8, 5, 5, 5], 4096: [7, 5, 5, 5, 5],
                       16384: [8, 8, 8, 6, 5], 65536: [8, 8, 8, 5, 5, 5]}


def levels_for(codebook_size: int) -> list[int] | None:
    """The levels for a codebook of this size, or None where the table has none."""
    return LEVELS_FOR_CODEBOOK.get(codebook_size)


class FiniteScalarQuantizer(nn.Module):
    """The vector quantizer's interface (forward, nearest, lookup, codebook) over level tuples."""

    def __init__(self, levels: list[int], dim: int = 64):
        super().__init__()
        self.codebook_size, self.dim = math.prod(levels), dim
        self.register_buffer("levels", torch.tensor(levels), persistent=False)
        self.register_buffer("basis", torch.cumprod(torch.tensor([1, *levels[:-1]]), 0), persistent=False)
        self.project_in = nn.Linear(dim, len(levels))
        self.project_out = nn.Linear(len(levels), dim)
        self.defer_updates = False  # set by the training loop for the vector quantizer; nothing learns here

    def bounded(self, channels: torch.Tensor) -> torch.Tensor:
        """Each channel squashed into its levels' range, so that rounding gives one of them:
        [-(L-1)/2, (L-1)/2], shifted by half a level where L is even."""
        half = (self.levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(channels + shift) * half - offset

    def quantize(self, channels: torch.Tensor) -> torch.Tensor:
        """[..., d] -> the rounded levels scaled to [-1, 1], rounding's gradient passed straight through."""
        bounded = self.bounded(channels)
        rounded = bounded + (bounded.round() - bounded).detach()
        return rounded / (self.levels // 2)

    def to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        digits = (codes * (self.levels // 2) + self.levels // 2).round().long()
        return (digits * self.basis).sum(-1)

    def to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        digits = (indices[..., None] // self.basis) % self.levels
        return (digits - self.levels // 2) / (self.levels // 2)

    @property
    def codebook(self) -> torch.Tensor:
        """[K, d]: every code's tuple of levels, scaled to [-1, 1] (stage two's code vectors)."""
        return self.to_codes(torch.arange(self.codebook_size, device=self.levels.device))

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """The code of each row of `flat` [N, D], in fp32."""
        with torch.autocast(flat.device.type, enabled=False):
            return self.to_indices(self.quantize(self.project_in(flat.float())))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> vectors [B, D, h, w]."""
        return rearrange(self.project_out(self.to_codes(indices).to(self.project_out.weight.dtype)), "b h w d -> b d h w")

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        batch, _, height, width = z.shape
        flat = rearrange(z, "b d h w -> (b h w) d").float()
        with torch.autocast(flat.device.type, enabled=False):
            codes = self.quantize(self.project_in(flat))
            quantized = self.project_out(codes)
        indices = self.to_indices(codes.detach())
        counts = torch.zeros(self.codebook_size, device=flat.device).index_add_(0, indices, torch.ones_like(flat[:, 0]))
        perplexity, usage = histogram_stats(counts)
        nothing = torch.zeros((), device=flat.device)
        return QuantizerOutput(
            quantized=rearrange(quantized, "(b h w) d -> b d h w", b=batch, h=height, w=width).to(z.dtype),
            indices=rearrange(indices, "(b h w) -> b h w", b=batch, h=height, w=width),
            loss=nothing, commitment=nothing, perplexity=perplexity, usage=usage,
        )
