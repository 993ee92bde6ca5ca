"""Differentiable augmentation of what the discriminator sees (DiffAugment, Zhao et al. 2020).

A discriminator shown a few thousand images learns them by heart within a few hundred steps:
it then wins outright, and its features, which feature matching uses as a perceptual loss,
describe one small set instead of images. Shifting, recolouring and cutting out parts of every
image it sees, real or reconstructed, keeps it from memorising; the transforms are
differentiable, so the decoder still learns through them.

A real image and its reconstruction get the same draw: feature matching compares the
discriminator's features of the two, and must not be asked to match a picture shifted one way
with one shifted another. Each transform is applied to an image with probability `p` (1 in
DiffAugment; ADA, Karras et al. 2020, adapts it), else that image passes unchanged.
"""

import torch
import torch.nn.functional as F
from einops import rearrange

from stage1_vqvae.distributed import all_reduce_sum

POLICIES = ("color", "translation", "cutout")
GRAY = 0.5  # what translation and cutout fill with: zero in the discriminator's [-1, 1] range


def augment_pairs(real: torch.Tensor, fake: torch.Tensor, policy=POLICIES, p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1], [B, C, H, W] each, the i-th fake paired with the i-th real image ->
    both augmented, each pair alike. Draws from the global RNG, which checkpoints restore."""
    batch, _, height, width = real.shape
    device = real.device
    both = torch.cat([real, fake])
    paired = lambda draws: [draw.repeat(2) for draw in draws]  # noqa: E731  (the i-th real and fake alike)
    chosen = lambda: (torch.rand(batch, device=device) < p).float().repeat(2)  # noqa: E731
    if "color" in policy:
        both = recolour(both, *paired(colour_draws(batch, device)), chosen())
    if "translation" in policy:
        keep = chosen().long()
        both = translate(both, *[shift * keep for shift in paired(shift_draws(batch, height, width, device))],
                         pad=max(largest_shift(height), largest_shift(width)))
    if "cutout" in policy:
        both = cut_out(both, *paired(corner_draws(batch, height, width, device)), chosen())
    return both.chunk(2)


def colour_draws(batch: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DiffAugment's ranges: brightness +-0.5 in [-1, 1] (+-0.25 here), saturation x [0, 2], contrast x [0.5, 1.5]."""
    return (torch.rand(batch, device=device) - 0.5) / 2, torch.rand(batch, device=device) * 2, torch.rand(batch, device=device) + 0.5


def recolour(images, brightness, saturation, contrast, chosen):
    """Brightness, then saturation about each pixel's grey, then contrast about the image's mean;
    images not `chosen` get the identity (shift 0, factors 1)."""
    per_image = lambda draw, identity: rearrange(chosen * draw + (1 - chosen) * identity, "b -> b 1 1 1")  # noqa: E731
    images = images + per_image(brightness, 0.0)
    grey = images.mean(dim=1, keepdim=True)
    images = (images - grey) * per_image(saturation, 1.0) + grey
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - mean) * per_image(contrast, 1.0) + mean


def largest_shift(side: int) -> int:
    """An eighth of the side, the same range as DiffAugment's."""
    return max(1, int(side * 0.125 + 0.5))


def shift_draws(batch: int, height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-pixel shifts of up to `largest_shift` of each side."""
    dy, dx = largest_shift(height), largest_shift(width)
    return torch.randint(-dy, dy + 1, (batch,), device=device), torch.randint(-dx, dx + 1, (batch,), device=device)


def translate(images, dy, dx, pad: int | None = None):
    """Shift each image by (dy, dx) whole pixels, filling what comes in with grey. `pad`: at
    least the largest shift; given, nothing waits to read the shifts back from the GPU."""
    batch, _, height, width = images.shape
    if pad is None:
        pad = int(max(dy.abs().max(), dx.abs().max()))
    if pad == 0:
        return images
    padded = F.pad(images, [pad, pad, pad, pad], value=GRAY)
    rows = torch.arange(height, device=images.device) + pad - dy[:, None]  # [B, H]
    cols = torch.arange(width, device=images.device) + pad - dx[:, None]  # [B, W]
    picked = padded[torch.arange(batch, device=images.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return rearrange(picked, "b h w c -> b c h w")


def corner_draws(batch: int, height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-left corner of a half-side square, which may hang over the border, as DiffAugment's."""
    return (torch.randint(0, height + 1, (batch,), device=device) - height // 4,
            torch.randint(0, width + 1, (batch,), device=device) - width // 4)


def cut_out(images, top, left, chosen):
    """Grey out a square of half each side at (top, left) in the `chosen` images."""
    _, _, height, width = images.shape
    rows = torch.arange(height, device=images.device)[None, :]
    cols = torch.arange(width, device=images.device)[None, :]
    inside_rows = (rows >= top[:, None]) & (rows < top[:, None] + height // 2)
    inside_cols = (cols >= left[:, None]) & (cols < left[:, None] + width // 2)
    hole = (inside_rows[:, :, None] & inside_cols[:, None, :]).float() * rearrange(chosen, "b -> b 1 1")
    hole = rearrange(hole, "b h w -> b 1 h w")
    return images * (1 - hole) + GRAY * hole


class AdaptiveProbability:
    """ADA's augmentation probability (Karras et al. 2020): raised while more than `target` of
    the real images' patches score above the reconstructions' mean logit (the discriminator is
    too sure of them), lowered otherwise, by at most 1 per `images_to_full` images seen. Saved
    in checkpoints.

    ADA counts the real logits above zero, but a hinge discriminator's logits have no fixed
    zero: one that cannot yet tell real from reconstructed often scores both above it, and on
    Fashion-MNIST that alone pushed p to 1 for hundreds of steps on half the seeds. Measured
    against the reconstructions' mean, a discriminator that tells nothing apart scores about
    half the real patches above it, whatever its offset."""

    def __init__(self, target: float = 0.6, images_to_full: int = 20_000):
        # p is a tensor on the logits' device, updated there: reading it back every step would
        # make the host wait for the GPU (and a CUDA graph cannot hold such a read). Kept in
        # float64, the arithmetic is the one Python floats did.
        self.target, self.images_to_full, self.p = target, images_to_full, torch.zeros((), dtype=torch.float64)

    def update(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> None:
        real, fake = real_logits.detach().float(), fake_logits.detach().float()
        count = lambda x: x.new_full((), float(x.numel()))  # noqa: E731  (a fill on the device, not a copy from the host)
        # summed over every process, so that every process moves p alike
        fake_sum, fake_count = all_reduce_sum(torch.stack([fake.sum(), count(fake)])).double()
        above, patches, images = all_reduce_sum(torch.stack([
            (real > fake_sum / fake_count).sum().float(), count(real), real.new_full((), float(len(real)))])).double()
        step = images / self.images_to_full
        self.p = self.p.to(real.device)  # once; from then on p changes in place, where a CUDA graph reads it
        self.p.copy_((self.p + torch.where(above / patches > self.target, step, -step)).clamp(0.0, 1.0))

    def state_dict(self) -> dict:
        return {"p": float(self.p)}

    def load_state_dict(self, state: dict) -> None:
        self.p = torch.tensor(float(state["p"]), dtype=torch.float64)
