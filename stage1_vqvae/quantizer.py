"""Vector quantizer: nearest code, straight-through (or rotated) gradients, commitment loss.

The codebook learns by exponential moving averages (van den Oord et al. 2017, appendix;
Laplace-smoothed counts) by default, or by the loss-based rule as an option. Codes that the
training batches have hardly used for `dead_code_steps` optimizer steps in a row (at most
`dead_code_share` of an even share of the batch's positions each step; 0: not at all) are
restarted from the current batch's encoder outputs; under gradient accumulation the codebook
learns once per optimizer step, from all its micro-batches, as it would from one batch of them
all. Under DDP every statistic is all-reduced and every restart is broadcast from rank 0, so all
processes keep the same codebook without DDP having to sync it.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from stage1_vqvae.distributed import all_reduce_sum, is_distributed

# Where a host that waits for the device costs time. On a CPU the restart draws only for the dead
# codes, as it always has, so runs there keep their random stream.
RESTART_WITHOUT_A_STALL = {"cuda"}


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # [B, D, h, w], straight-through: gradients flow to the encoder
    indices: torch.Tensor  # [B, h, w] int64
    loss: torch.Tensor  # commitment (+ codebook, when not EMA) loss
    commitment: torch.Tensor  # beta-free ||z - sg(e)||^2, for logging
    perplexity: torch.Tensor  # exp(entropy) of this step's code histogram
    usage: torch.Tensor  # fraction of codes used in this step


def histogram_stats(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Perplexity and fraction used of a code histogram (counts per code)."""
    probs = counts / counts.sum().clamp(min=1)
    perplexity = torch.exp(-(probs * torch.log(probs.clamp(min=1e-10))).sum())
    return perplexity, (counts > 0).float().mean()


def rotated_onto(z: torch.Tensor, code: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The code's value, with the gradient of a rotation and scaling that carry z onto it (Fifty
    et al. 2024, "Restructuring Vector Quantization with the Rotation Trick").

    Straight-through hands the decoder's gradient to z unchanged, whatever the angle between z
    and its code; here it is rotated by the angle between them (two Householder reflections,
    treated as constants), so that how far z lies from its code shapes the encoder's update.
    Rows [N, D]; the forward value is `code` exactly."""
    z_norm = z.detach().norm(dim=-1, keepdim=True).clamp(min=eps)
    code_norm = code.norm(dim=-1, keepdim=True)
    z_unit, code_unit = z.detach() / z_norm, code / code_norm.clamp(min=eps)
    mirror = F.normalize(z_unit + code_unit, dim=-1)
    rotated = z - 2 * (z * mirror).sum(-1, keepdim=True) * mirror + 2 * (z * z_unit).sum(-1, keepdim=True) * code_unit
    rotated = rotated * (code_norm / z_norm)
    return rotated + (code - rotated).detach()


class VectorQuantizer(nn.Module):
    def __init__(
        self,
        codebook_size: int = 512,
        dim: int = 64,
        beta: float = 0.25,
        ema: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_steps: int = 50,
        l2_normalize: bool = False,
        dead_code_share: float = 0.0,
        rotation_trick: bool = False,
    ):
        super().__init__()
        self.rotation_trick = rotation_trick
        self.codebook_size, self.dim, self.beta = codebook_size, dim, beta
        self.ema, self.decay, self.eps = ema, decay, eps
        self.dead_code_steps, self.l2_normalize, self.dead_code_share = dead_code_steps, l2_normalize, dead_code_share
        initial = torch.randn(codebook_size, dim)
        if l2_normalize:
            initial = F.normalize(initial, dim=-1)
        # Under EMA the codebook is a buffer-like parameter that no optimizer touches.
        self.codebook = nn.Parameter(initial, requires_grad=not ema)
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_avg", initial.clone())
        # Starting every code as long unused makes the first training step seed the whole
        # codebook from encoder outputs, so no code starts far from the data.
        self.register_buffer("steps_unused", torch.full((codebook_size,), dead_code_steps, dtype=torch.long))
        # Under gradient accumulation the training loop sets `defer_updates` on every micro-batch
        # but the last: their counts and sums wait here, and the EMA and the dead-code counters
        # advance once per optimizer step, as with one batch of all the micro-batches.
        self.defer_updates = False
        self.register_buffer("pending_counts", torch.zeros(codebook_size), persistent=False)
        self.register_buffer("pending_sums", torch.zeros(codebook_size, dim), persistent=False)

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.l2_normalize else x

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of `flat` [N, D], computed in fp32."""
        with torch.autocast(flat.device.type, enabled=False):
            flat = self._normalized(flat.float())
            codebook = self._normalized(self.codebook.float())
            # ||z||^2 is the same for every code, so argmin needs only ||e||^2 - 2 z.e
            distances = torch.addmm(codebook.pow(2).sum(1), flat, codebook.t(), alpha=-2.0)
            return distances.argmin(dim=1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> vectors [B, D, h, w]."""
        vectors = self._normalized(self.codebook)[indices]
        return rearrange(vectors, "b h w d -> b d h w")

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        batch, _, height, width = z.shape
        flat = rearrange(z, "b d h w -> (b h w) d").float()
        indices = self.nearest(flat)
        # (bincount on CUDA reads the largest index back to the host: a stall every step)
        counts = torch.zeros(self.codebook_size, device=flat.device).index_add_(0, indices, torch.ones_like(flat[:, 0]))
        if self.training:  # the EMA and restarts need every rank's counts; evaluation never waits on other ranks
            counts = all_reduce_sum(counts)

        if self.training:
            self._add_pending(flat.detach(), indices, counts)
            if not self.defer_updates:
                self._apply_pending(flat.detach())

        flat_target = self._normalized(flat)
        quantized = self._normalized(self.codebook)[indices]
        commitment = F.mse_loss(flat_target, quantized.detach())
        loss = self.beta * commitment
        if not self.ema:
            loss = loss + F.mse_loss(quantized, flat_target.detach())
        if self.rotation_trick:
            quantized = rotated_onto(flat_target, quantized.detach())
        else:  # straight-through: the forward value is the code, the gradient is the identity
            quantized = flat_target + (quantized - flat_target).detach()
        perplexity, usage = histogram_stats(counts)
        return QuantizerOutput(
            quantized=rearrange(quantized, "(b h w) d -> b d h w", b=batch, h=height, w=width).to(z.dtype),
            indices=rearrange(indices, "(b h w) -> b h w", b=batch, h=height, w=width),
            loss=loss,
            commitment=commitment.detach(),
            perplexity=perplexity,
            usage=usage,
        )

    @torch.no_grad()
    def _add_pending(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        """Counts (already summed over processes) and sums of assigned vectors, summed over
        processes too, so the buffers stay identical on every rank (DDP broadcasts buffers)."""
        self.pending_counts.add_(counts)
        if self.ema:
            embed_sum = torch.zeros_like(self.pending_sums).index_add_(0, indices, self._normalized(flat))
            self.pending_sums.add_(all_reduce_sum(embed_sum))

    @torch.no_grad()
    def _apply_pending(self, flat: torch.Tensor) -> None:
        """One optimizer step's worth of codebook learning, then the pending sums start again."""
        if self.ema:
            self._ema_update(self.pending_counts, self.pending_sums)
        self._restart_dead_codes(flat, self.pending_counts)
        self.pending_counts.zero_()
        self.pending_sums.zero_()

    @torch.no_grad()
    def _ema_update(self, counts: torch.Tensor, embed_sum: torch.Tensor) -> None:
        """cluster_size and embed_avg follow EMAs of the counts and sums of assigned vectors."""
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(embed_sum, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        self.codebook.data.copy_(self.embed_avg / smoothed.unsqueeze(1))

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, counts: torch.Tensor) -> None:
        """Re-seed codes hardly used for `dead_code_steps` steps with random encoder outputs.

        A code that the moving encoder is leaving keeps a stray vector or two per batch for many
        steps: never quite unused, yet too rare for a test split to meet it. `steps_unused`
        counts the steps in a row in which a code had at most `dead_code_share` of an even share."""
        idle = counts <= self.dead_code_share * counts.sum() / self.codebook_size
        self.steps_unused.add_(1).masked_fill_(~idle, 0)
        if self.dead_code_steps <= 0:
            return
        if flat.device.type in RESTART_WITHOUT_A_STALL:
            return self._restart_without_a_stall(flat)
        dead = (self.steps_unused >= self.dead_code_steps).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        # Rank 0 chooses the replacements and broadcasts them, so codebooks stay identical.
        choice = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
        replacements = self._normalized(flat[choice]).contiguous()
        if is_distributed():
            dist.broadcast(replacements, src=0)
        self.codebook.data[dead] = replacements
        self.embed_avg[dead] = replacements
        self.cluster_size[dead] = 1.0
        self.steps_unused[dead] = 0

    @torch.no_grad()
    def _restart_without_a_stall(self, flat: torch.Tensor) -> None:
        """The same restart with no step that waits for the GPU: finding which codes are dead
        (`nonzero`) reads back to the host, and the host then idles until the GPU has caught up,
        every step. Here every code draws a candidate and only the dead ones take it."""
        dead = (self.steps_unused >= self.dead_code_steps)[:, None]
        choice = torch.randint(0, flat.shape[0], (self.codebook_size,), device=flat.device)
        replacements = self._normalized(flat[choice]).contiguous()
        if is_distributed():
            dist.broadcast(replacements, src=0)
        self.codebook.data.copy_(torch.where(dead, replacements, self.codebook.data))
        self.embed_avg.copy_(torch.where(dead, replacements, self.embed_avg))
        self.cluster_size.masked_fill_(dead[:, 0], 1.0)
        self.steps_unused.masked_fill_(dead[:, 0], 0)
