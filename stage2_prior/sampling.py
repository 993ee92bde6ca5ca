"""Turning one step's logits into a sampled code: temperature, top-k, top-p.

Model code: it raises ValueError; the commands check their flags before they get here."""

import torch


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top k, and outside the smallest set whose
    probability reaches top_p (the most likely code always stays)."""
    logits = logits.float()
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a code when the codes before it already reach top_p
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits [B, K] -> sampled codes [B]. `uniforms` [B, 1] in [0, 1): the draws to use
    (from `draw_uniforms`) instead of drawing them here from `generator`.

    `temperature` may be a 0-dim tensor, so that a captured CUDA graph reads it."""
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    # Inverse-CDF sampling: one uniform per row, 15x faster than torch.multinomial on a CPU.
    # (1 - u) lies in (0, 1], so a code of probability zero is never chosen.
    cdf = probs.cumsum(-1)
    if uniforms is None:
        uniforms = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)
    u = 1 - uniforms.to(cdf.dtype)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def draw_uniforms(steps: int, rows: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """[steps, rows, 1]: every uniform a raster sampler will use, drawn at once. Every decoding
    path of a prior reads the same draws, so they give the same codes for a seed; on a CPU they
    are also the numbers that one draw per step gives (the generator's stream is sequential)."""
    return torch.rand(steps, rows, 1, generator=generator, device=device)


def prepare_labels(n: int, labels, num_classes: int, device) -> torch.Tensor:
    """Labels for n samples: None -> the null label (index num_classes); an int -> repeated.

    The null label is the "no class" a prior learns through conditioning dropout.
    """
    null = num_classes
    if labels is None:
        return torch.full((n,), null, dtype=torch.long, device=device)
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    if labels.numel() == 1:
        labels = labels.expand(n).clone()
    if labels.numel() != n:
        raise ValueError(f"got {labels.numel()} labels for {n} samples; give one label or one per sample")
    if labels.is_cuda and torch.cuda.is_current_stream_capturing():  # a graph cannot wait for the check; its warm-up ran it
        return labels
    bad = labels[(labels < 0) | (labels > null)]
    if bad.numel():
        raise ValueError(
            f"label {bad[0].item()} is out of range for a prior trained on {num_classes} classes; "
            f"use 0 to {num_classes - 1}" + (f", or {null} for no class" if num_classes else "")
            if num_classes else f"label {bad[0].item()} given to an unconditional prior; drop --label"
        )
    return labels


def with_null_labels(labels: torch.Tensor, null: int, guidance: float) -> torch.Tensor:
    """For classifier-free guidance, run every sample twice: with its label and with none."""
    return labels if guidance == 1.0 else torch.cat([labels, torch.full_like(labels, null)])


def guide(logits: torch.Tensor, guidance: float | torch.Tensor, guided: bool | None = None) -> torch.Tensor:
    """uncond + s * (cond - uncond), on the doubled batch from `with_null_labels`. `guidance`
    may be a 0-dim tensor (read by a captured CUDA graph); then `guided` says whether the batch
    was doubled."""
    if guided is None:
        guided = guidance != 1.0
    if not guided:
        return logits
    conditional, unconditional = logits.float().chunk(2)
    return unconditional + guidance * (conditional - unconditional)
