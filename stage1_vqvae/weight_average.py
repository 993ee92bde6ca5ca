"""An exponential moving average (EMA) of the VQ-VAE's weights, kept beside the trained ones.

The discriminator shakes the weights from step to step; their average over the last few
hundred steps is steadier than any one of them (LlamaGen, MaskBit and TiTok keep one for their
tokenizers). The average covers every floating-point weight: encoder, codebook vectors and
decoder. The quantizer's usage statistics (buffers) are copied from the trained model, which is
where they are measured. torch's `AveragedModel` does the bookkeeping; its state is saved in
every checkpoint, so a resumed run keeps the average an uninterrupted one would have.
"""

import torch
from torch.optim.swa_utils import AveragedModel


def weight_average(model: torch.nn.Module, decay: float) -> AveragedModel:
    """An EMA of `model`'s parameters whose decay warms up as (1 + n) / (10 + n) until it
    reaches `decay`, so the random start is forgotten within the first few dozen steps."""

    def blend(averaged, current, n_averaged):
        rate = min(decay, (1 + float(n_averaged)) / (10 + float(n_averaged)))
        torch._foreach_lerp_(averaged, current, 1 - rate)

    return AveragedModel(model, multi_avg_fn=blend, use_buffers=False).requires_grad_(False).eval()


@torch.no_grad()
def update_average(average: AveragedModel, model: torch.nn.Module) -> None:
    """One step of the average, then the model's buffers (codebook statistics) copied over."""
    average.update_parameters(model)
    for kept, current in zip(average.module.buffers(), model.buffers()):
        kept.copy_(current)
