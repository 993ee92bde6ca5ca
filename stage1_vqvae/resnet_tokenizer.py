"""The encoder and decoder for larger images (`--architecture resnet`), built as VQGAN's are.

At 32x32 two strided convolutions and two residual blocks see enough of the image. At 64 to
256 pixels a code stands for a larger patch, and the network needs depth where the pixels are:
residual blocks at every resolution, GroupNorm and SiLU (steadier than bare ReLU stacks as
they grow deeper), self-attention where the map is smallest (so a code can see the whole
image), and upsampling by nearest-neighbour copies followed by a convolution, which does not
leave the checkerboard that a transposed convolution with stride 2 tends to print.
"""

import math

import torch.nn.functional as F
from einops import rearrange
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            group_norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1),
            group_norm(out_channels), nn.SiLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.body(x)


class AttentionBlock(nn.Module):
    """One head of self-attention over the positions of a feature map, with a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        height, width = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b 1 (h w) c", three=3)
        attended = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(rearrange(attended, "b 1 (h w) c -> b c h w", h=height, w=width))


class Upsample(nn.Sequential):
    def __init__(self, channels: int):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, channels, 3, padding=1))


def level_widths(hidden_channels: int, halvings: int) -> list[int]:
    """Channels at each resolution, the image's first: halved towards the image, at least 32."""
    return [max(hidden_channels >> (halvings - level), 32) for level in range(halvings + 1)]


def middle(channels: int) -> list[nn.Module]:
    return [ResnetBlock(channels, channels), AttentionBlock(channels), ResnetBlock(channels, channels)]


class ResnetEncoder(nn.Sequential):
    def __init__(self, in_channels, hidden_channels, res_blocks, halvings, code_dim):
        widths = level_widths(hidden_channels, halvings)
        layers, previous = [nn.Conv2d(in_channels, widths[0], 3, padding=1)], widths[0]
        for level, width in enumerate(widths):
            for _ in range(res_blocks):
                layers.append(ResnetBlock(previous, width))
                previous = width
            if level < halvings:
                layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        layers += [*middle(previous), group_norm(previous), nn.SiLU(), nn.Conv2d(previous, code_dim, 1)]
        super().__init__(*layers)


class ResnetDecoder(nn.Sequential):
    """Mirrors the encoder; its last module is the output convolution, whose weight the
    adaptive GAN weight reads."""

    def __init__(self, out_channels, hidden_channels, res_blocks, halvings, code_dim):
        widths = level_widths(hidden_channels, halvings)[::-1]
        layers, previous = [nn.Conv2d(code_dim, widths[0], 3, padding=1), *middle(widths[0])], widths[0]
        for level, width in enumerate(widths):
            if level > 0:
                layers.append(Upsample(previous))
            for _ in range(res_blocks):
                layers.append(ResnetBlock(previous, width))
                previous = width
        layers += [group_norm(previous), nn.SiLU(), nn.Conv2d(previous, out_channels, 3, padding=1)]
        super().__init__(*layers)
