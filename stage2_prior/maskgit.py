"""MaskGIT prior (Chang et al. 2022): a bidirectional transformer that fills in masked codes.

Training hides a cosine-scheduled fraction of each map behind a mask token and predicts the
hidden codes from the rest. Sampling starts from a fully masked map; each of `steps` passes
samples every masked code at once, keeps the most confident and masks the rest again, fewer
each pass along the same cosine. A map costs `steps` network passes instead of one per code,
and any subset of codes can be kept fixed, which is what completion and editing need.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from huggingface_hub import PyTorchModelHubMixin
from tqdm.auto import tqdm

from stage2_prior.prior_config import PRIOR_DEFAULTS
from stage2_prior.prior_metadata import prepare_transforms
from stage2_prior.sampling import filter_logits, guide, prepare_labels, sample_logits, with_null_labels
from stage2_prior.transformer import CodeTransformer


def masked_fraction(progress: torch.Tensor | float) -> torch.Tensor:
    """The cosine schedule: the fraction of codes still masked when `progress` (0 to 1) of the
    way is done; 1 at the start, 0 at the end."""
    return torch.cos(math.pi / 2 * torch.as_tensor(progress, dtype=torch.float64))


def random_mask(batch: int, length: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """[batch, length] bool, True = hidden: per map a fraction masked_fraction(r), r ~ U(0, 1),
    at least one code, at places drawn uniformly."""
    progress = torch.rand(batch, device=device, generator=generator)
    count = torch.ceil(masked_fraction(progress) * length).long().clamp(1, length)
    ranks = torch.rand(batch, length, device=device, generator=generator).argsort(-1).argsort(-1)
    return ranks < count[:, None].to(device)


def passes_for_map(codes_per_map: int) -> int:
    """Sampling passes for a map size. Up to 8x8 codes: 4, which judged within about 10% of 8
    and 16 on the demo's maps (docs/maskgit.md) at half the time; beyond: 8 up to 16x16 codes
    and 12 above, MaskGIT's own choices for ImageNet at 256 and 512 pixels (not measured here)."""
    return 4 if codes_per_map <= 64 else 8 if codes_per_map <= 256 else 12


def still_masked_after(step: int, steps: int, unknown: torch.Tensor, remaining: torch.Tensor) -> torch.Tensor:
    """How many codes stay masked after pass `step` (0-based) of `steps`: the cosine share of the
    codes that were unknown at the start; every pass before the last fixes at least one code and
    leaves at least one to the next, and the last leaves none."""
    if step == steps - 1:
        return torch.zeros_like(remaining)
    target = torch.floor(unknown * masked_fraction((step + 1) / steps)).long()
    return torch.minimum(target.clamp(min=1), remaining - 1).clamp(min=0)


class MaskGITPrior(CodeTransformer, PyTorchModelHubMixin):
    def __init__(
        self,
        codebook_size: int = 512,
        map_height: int = 8,
        map_width: int = 8,
        num_classes: int = 10,
        width: int = PRIOR_DEFAULTS.width,
        layers: int = PRIOR_DEFAULTS.layers,
        heads: int = PRIOR_DEFAULTS.heads,
        dropout: float = PRIOR_DEFAULTS.dropout,
        prior: str = "maskgit",
        codes_source: str = "",
        class_names: list[str] | None = None,
        default_guidance: float = 1.0,
        label_dropout: float | None = None,
        default_steps: int | None = None,
        transforms: list[str] | None = None,
    ):
        super().__init__()
        if default_steps is not None and default_steps < 1:
            raise ValueError(f"default_steps {default_steps} must be at least 1")
        self._build(codebook_size, map_height, map_width, num_classes, width, layers, heads, dropout, prior,
                    codes_source, class_names, default_guidance, label_dropout, causal=False, extra_tokens=1,
                    transforms=transforms)
        # sampling passes when none are asked for (None: the map size's, `passes_for_map`)
        self.default_steps = default_steps or passes_for_map(map_height * map_width)

    @property
    def mask_token(self) -> int:
        return self.codebook_size

    def _logits(self, codes: torch.Tensor, masked: torch.Tensor, labels: torch.Tensor, transforms: torch.Tensor | None) -> torch.Tensor:
        """codes, masked [B, h*w], labels [B], transforms [B] or None -> logits [B, h*w, K] for every position."""
        tokens = self.code_embed(torch.where(masked, self.mask_token, codes)) + self._positions()
        tokens = torch.cat([self.label_embed(labels)[:, None], tokens], dim=1) + self._transform_bias(transforms)
        x = self.dropout(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 1:]))

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                transforms: torch.Tensor | None = None) -> torch.Tensor:
        """codes [B, h, w], mask [B, h, w] (True = hidden; None: nothing hidden) -> logits [B, K, h, w].
        Training scores only the hidden positions (`masked_code_loss`). `transforms` [B]: the id of
        the transform that made each map (None: the identity)."""
        batch, height, width = codes.shape
        labels = prepare_labels(batch, labels, self.num_classes, codes.device)
        transforms = prepare_transforms(batch, transforms, self.num_transforms, codes.device)
        flat = rearrange(codes, "b h w -> b (h w)")
        masked = torch.zeros_like(flat, dtype=torch.bool) if mask is None else rearrange(mask, "b h w -> b (h w)")
        return rearrange(self._logits(flat, masked, labels, transforms), "b (h w) k -> b k h w", h=height, w=width)

    @torch.no_grad()
    def generate(self, n, labels=None, temperature=1.0, top_k=None, top_p=None, generator=None, guidance=1.0,
                 steps=None, known=None, keep=None, choice_temperature=4.5, progress=False, transform=0) -> torch.Tensor:
        """Sample n code maps [n, h, w] in `steps` passes (default: the prior's `default_steps`),
        as transform `transform` makes them (0: the images as they are).

        `known` [n, h, w] and `keep` [n, h, w] (bool) fix codes that are never changed: only the
        others are drawn, along the schedule of their own count. `choice_temperature` scales
        the Gumbel noise added to the confidences, annealed to 0 over the passes, as in MaskGIT.
        """
        steps = self.default_steps if steps is None else steps
        if steps < 1:
            raise ValueError(f"steps {steps} must be at least 1")
        device = self.code_embed.weight.device
        labels = with_null_labels(prepare_labels(n, labels, self.num_classes, device), self.null_label, guidance)
        copies = len(labels) // n  # 2 under guidance: the conditional and the unconditional half
        transforms = prepare_transforms(len(labels), transform, self.num_transforms, device)
        length = self.map_shape[0] * self.map_shape[1]
        codes = torch.zeros(n, length, dtype=torch.long, device=device)
        masked = torch.ones(n, length, dtype=torch.bool, device=device)
        if keep is not None:
            keep = rearrange(keep.to(device, torch.bool), "n h w -> n (h w)")
            codes = torch.where(keep, rearrange(known.to(device), "n h w -> n (h w)"), codes)
            masked = ~keep
        unknown = masked.sum(1)
        for step in tqdm(range(steps), desc="sampling passes", disable=not progress, leave=False):
            logits = self._logits(repeat(codes, "n l -> (c n) l", c=copies), repeat(masked, "n l -> (c n) l", c=copies), labels, transforms)
            logits = filter_logits(guide(logits, guidance).flatten(0, 1) / temperature, top_k, top_p)
            drawn = sample_logits(logits, generator=generator)
            log_probability = logits.log_softmax(-1).gather(-1, drawn[:, None]).view(n, length)
            drawn = drawn.view(n, length)
            noise = -torch.empty_like(log_probability).exponential_(generator=generator).log()  # Gumbel(0, 1)
            confidence = log_probability + choice_temperature * (1 - (step + 1) / steps) * noise
            confidence = torch.where(masked, confidence, torch.inf)  # fixed codes are never masked again
            codes = torch.where(masked, drawn, codes)
            still = still_masked_after(step, steps, unknown, masked.sum(1))
            masked = confidence.argsort(-1).argsort(-1) < still[:, None]
        return rearrange(codes, "n (h w) -> n h w", h=self.map_shape[0])


def masked_code_loss(model, codes: torch.Tensor, labels: torch.Tensor | None, generator=None,
                     label_smoothing: float = 0.1, transforms: torch.Tensor | None = None,
                     inputs: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy (nats) of the hidden codes under a random cosine-scheduled mask, one value
    per hidden code; `model` may be wrapped (DDP), so it is called, not unwrapped. Label
    smoothing 0.1, as MaskGIT trains: on the demo's maps one run's samples judged 10.7x the
    floor against 11.9x without (docs/maskgit.md). `inputs`: the codes the model reads where
    they differ from the targets `codes` (corrupted while training)."""
    mask = random_mask(len(codes), codes[0].numel(), codes.device, generator).view_as(codes)
    logits = model(codes if inputs is None else inputs, labels, mask, transforms=transforms)
    return F.cross_entropy(logits.float(), codes, reduction="none", label_smoothing=label_smoothing)[mask]
