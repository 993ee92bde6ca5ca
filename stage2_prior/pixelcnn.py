"""Gated PixelCNN prior over code maps (van den Oord et al. 2016, "Conditional Image
Generation with PixelCNN Decoders").

A vertical stack sees the rows above, a horizontal stack the codes to the left in the
current row; joining them at every layer leaves no blind spot. Each layer is a gated unit
tanh(a) * sigmoid(b) with the class embedding (and, where the train maps hold transformed
copies of the images, the transform's) added inside the gate.

Each layer widens the view by kernel_size // 2 codes up, left and right; construction
checks that the layers see the whole map before the current code, so no code is blind to
part of its past on large maps.

Generation caches every layer's recent inputs, as Fast PixelCNN++ does (Ramachandran et
al. 2017, "Fast Generation for Convolutional Autoregressive Models"): a new code costs one
position of each layer's horizontal stack, and a finished row one row of each layer's
vertical stack, so a map costs O(h w) layer positions instead of O(h^2 w).
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from tqdm.auto import tqdm

from stage2_prior.prior_config import PRIOR_DEFAULTS
from stage2_prior.prior_metadata import PriorMetadata, prepare_transforms
from stage2_prior.sampling import guide, prepare_labels, sample_logits, with_null_labels


def gate(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def shift_down(x: torch.Tensor) -> torch.Tensor:
    """Row i receives row i-1, so whatever reads it sees only rows strictly above."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def shift_right(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (1, 0))[..., :-1]


class GatedLayer(nn.Module):
    def __init__(self, channels: int, kernel: int, num_labels: int, first: bool, num_transforms: int = 0):
        super().__init__()
        self.half, self.first = kernel // 2, first
        self.vertical_conv = nn.Conv2d(channels, 2 * channels, (self.half + 1, kernel))
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal_conv = nn.Conv2d(channels, 2 * channels, (1, self.half + 1))
        self.horizontal_out = nn.Conv2d(channels, channels, 1)
        self.skip = nn.Conv2d(channels, channels, 1)
        self.label_bias = nn.Embedding(num_labels, 4 * channels)
        if num_transforms:
            self.transform_bias = nn.Embedding(num_transforms, 4 * channels)

    def vertical(self, v, label_bias):
        """v [B, C, H, W] -> (next v, the shifted-down contribution to the horizontal stack)."""
        pre = self.vertical_conv(F.pad(v, (self.half, self.half, self.half, 0)))
        return gate(pre + label_bias[:, : pre.shape[1]]), shift_down(self.vertical_to_horizontal(pre))

    def horizontal(self, h, from_vertical, label_bias):
        """h [B, C, H, W] -> (next h, skip). The first layer does not see the current code."""
        source = shift_right(h) if self.first else h
        pre = self.horizontal_conv(F.pad(source, (self.half, 0))) + from_vertical
        gated = gate(pre + label_bias[:, pre.shape[1]:])
        out = self.horizontal_out(gated)
        return (out if self.first else h + out), self.skip(gated)


class GatedPixelCNN(PriorMetadata, PyTorchModelHubMixin):
    def __init__(
        self,
        codebook_size: int = 512,
        map_height: int = 8,
        map_width: int = 8,
        num_classes: int = 10,
        channels: int = PRIOR_DEFAULTS.pixelcnn_channels,
        layers: int = PRIOR_DEFAULTS.pixelcnn_layers,
        kernel_size: int = PRIOR_DEFAULTS.kernel_size,
        prior: str = "pixelcnn",
        codes_source: str = "",
        class_names: list[str] | None = None,
        default_guidance: float = 1.0,
        label_dropout: float | None = None,
        transforms: list[str] | None = None,
    ):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size {kernel_size} must be odd, e.g. {kernel_size + 1}")
        needed = max(map_height, map_width) - 1
        if layers * (kernel_size // 2) < needed:
            raise ValueError(
                f"{layers} layers of kernel {kernel_size} see {layers * (kernel_size // 2)} codes up and to the left, "
                f"fewer than the {needed} a {map_height}x{map_width} map needs; use at least "
                f"{-(-needed // (kernel_size // 2))} layers or a larger kernel"
            )
        self._record(codebook_size, map_height, map_width, num_classes, prior, codes_source, class_names,
                     default_guidance, label_dropout, transforms)
        self.embed = nn.Embedding(codebook_size, channels)
        self.layers = nn.ModuleList(
            GatedLayer(channels, kernel_size, num_classes + 1, first=i == 0, num_transforms=self.num_transforms) for i in range(layers)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, codebook_size, 1))

    def _condition_biases(self, labels, transforms):
        """Per layer [B, 4C, 1, 1]: the class's bias, plus the transform's where there is one."""
        biases = [layer.label_bias(labels) + (layer.transform_bias(transforms) if transforms is not None else 0) for layer in self.layers]
        return [rearrange(bias, "b c -> b c 1 1") for bias in biases]

    def vertical_stack(self, codes, biases):
        """Per layer, what the horizontal stack receives from above, for the rows in `codes`."""
        v = rearrange(self.embed(codes), "b h w c -> b c h w")
        contributions = []
        for layer, bias in zip(self.layers, biases):
            v, contribution = layer.vertical(v, bias)
            contributions.append(contribution)
        return contributions

    def horizontal_stack(self, codes, contributions, biases):
        h = rearrange(self.embed(codes), "b h w c -> b c h w")
        skip = 0
        for layer, contribution, bias in zip(self.layers, contributions, biases):
            h, layer_skip = layer.horizontal(h, contribution, bias)
            skip = skip + layer_skip
        return self.head(skip)

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None, transforms: torch.Tensor | None = None) -> torch.Tensor:
        """codes [B, h, w] -> logits [B, K, h, w]; position (i, j) sees only codes before it.
        `transforms` [B]: the id of the transform that made each map (None: the identity)."""
        labels = prepare_labels(len(codes), labels, self.num_classes, codes.device)
        biases = self._condition_biases(labels, prepare_transforms(len(codes), transforms, self.num_transforms, codes.device))
        return self.horizontal_stack(codes, self.vertical_stack(codes, biases), biases)

    @torch.no_grad()
    def generate(self, n, labels=None, temperature=1.0, top_k=None, top_p=None, generator=None,
                 guidance=1.0, decoding="auto", progress=False, known=None, keep=None, transform=0) -> torch.Tensor:
        """Sample n code maps [n, h, w], as transform `transform` makes them (0: the images as
        they are). `decoding`: "cache" ("auto") runs each layer once per
        code through per-layer caches, "naive" reruns the whole network per code.
        `known` and `keep` [n, h, w]: codes written as given instead of drawn (see the transformer)."""
        if decoding not in ("auto", "cache", "naive"):
            raise ValueError(f"the PixelCNN decodes 'cache' or 'naive', not {decoding!r}")
        cached = decoding != "naive"
        device = self.embed.weight.device
        labels = prepare_labels(n, labels, self.num_classes, device)
        labels = with_null_labels(labels, self.null_label, guidance)
        biases = self._condition_biases(labels, prepare_transforms(len(labels), transform, self.num_transforms, device))
        height, width = self.map_shape
        codes = torch.zeros(len(labels), height, width, dtype=torch.long, device=device)
        cache = LayerCache(self, len(labels), width, device) if cached else None
        bar = tqdm(total=height * width, desc="sampling codes", disable=not progress, leave=False)
        for row in range(height):
            for col in range(width):
                if cached:
                    logits = cache.next_code_logits(col, biases)
                else:
                    logits = self.horizontal_stack(codes, self.vertical_stack(codes, biases), biases)[:, :, row, col]
                sampled = sample_logits(guide(logits, guidance), temperature, top_k, top_p, generator)
                if keep is not None:
                    sampled = torch.where(keep[:, row, col].to(device).bool(), known[:, row, col].to(device), sampled)
                codes[:, row, col] = sampled.repeat(len(labels) // n)
                if cached:
                    cache.add_code(codes[:, row, col], col)
                bar.update(1)
            if cached:
                cache.finish_row(biases)
        bar.close()
        return codes[:n]


def pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A convolution applied at one position: x [B, C_in, k_h, k_w] or [B, C_in] -> [B, C_out].
    As a matrix product it skips the convolution's per-call set-up, most of its cost here."""
    return F.linear(x.flatten(1), conv.weight.flatten(1), conv.bias)


class LayerCache:
    """Each layer's last inputs during generation, so every new code runs each layer once.

    - vertical[l]: the last `half + 1` rows of layer l's vertical input, zero-padded by
      `half` columns on each side (the conv's own padding); `from_above[l]` is layer l's
      contribution to the horizontal stack of the current row (from the row above).
    - horizontal[l]: the last `half + 1` columns of layer l's horizontal input in the
      current row (layer 0 sees the codes left of the current one, the others include it).
    """

    def __init__(self, model: GatedPixelCNN, batch: int, width: int, device):
        self.model, self.half = model, model.layers[0].half
        channels, dtype = model.embed.embedding_dim, model.embed.weight.dtype
        self.vertical = [torch.zeros(batch, channels, self.half + 1, width + 2 * self.half, device=device, dtype=dtype)
                         for _ in model.layers]
        self.from_above = [torch.zeros(batch, 2 * channels, width, device=device, dtype=dtype) for _ in model.layers]
        self.embedded_row = torch.zeros(batch, channels, 1, width, device=device, dtype=dtype)
        self._start_row()

    def _start_row(self):
        batch, channels = self.embedded_row.shape[:2]
        self.horizontal = [self.embedded_row.new_zeros(batch, channels, 1, self.half + 1) for _ in self.model.layers]

    @staticmethod
    def _push(window: torch.Tensor, newest: torch.Tensor, dim: int) -> torch.Tensor:
        """Drop the oldest row or column of `window` and append `newest`."""
        return torch.cat([window.narrow(dim, 1, window.shape[dim] - 1), newest.to(window.dtype)], dim=dim)

    def next_code_logits(self, col: int, biases) -> torch.Tensor:
        """Logits [B, K] of the code at `col` of the current row, one position per layer."""
        h, skip = None, 0
        for i, (layer, bias) in enumerate(zip(self.model.layers, biases)):
            if i:  # layers after the first see the current position too: add it to the window
                self.horizontal[i] = self._push(self.horizontal[i], rearrange(h, "b c -> b c 1 1"), 3)
            pre = pointwise(layer.horizontal_conv, self.horizontal[i]) + self.from_above[i][..., col]
            gated = gate(pre + bias[:, pre.shape[1]:, 0, 0])
            out = pointwise(layer.horizontal_out, gated)
            h = out if layer.first else h + out
            skip = skip + pointwise(layer.skip, gated)
        for module in self.model.head:  # the head's own layers, its convolutions at this one position
            skip = pointwise(module, skip) if isinstance(module, nn.Conv2d) else module(skip)
        return skip

    def add_code(self, code: torch.Tensor, col: int) -> None:
        """The code just sampled at `col` becomes the newest input of the first layer."""
        embedded = rearrange(self.model.embed(code), "b c -> b c 1 1")
        self.embedded_row[..., col: col + 1] = embedded
        self.horizontal[0] = self._push(self.horizontal[0], embedded, 3)

    def finish_row(self, biases) -> None:
        """Run one row of every layer's vertical stack on the finished row."""
        v = self.embedded_row
        for i, (layer, bias) in enumerate(zip(self.model.layers, biases)):
            self.vertical[i] = self._push(self.vertical[i], F.pad(v, (self.half, self.half)), 2)
            pre = layer.vertical_conv(self.vertical[i])
            v = gate(pre + bias[:, : pre.shape[1]])
            self.from_above[i] = layer.vertical_to_horizontal(pre)[:, :, 0]
        self._start_row()
