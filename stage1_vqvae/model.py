"""The VQ-VAE: a strided convolutional encoder, the vector quantizer and a mirrored decoder.

`VQVAE` inherits `PyTorchModelHubMixin`: `save_pretrained(dir)` writes `config.json` (its
constructor arguments) and `model.safetensors`; `from_pretrained(dir)` reads them back.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from foundation.errors import UserError
from stage1_vqvae.fsq import FiniteScalarQuantizer, levels_for
from stage1_vqvae.quantizer import QuantizerOutput, VectorQuantizer
from stage1_vqvae.resnet_tokenizer import ResnetDecoder, ResnetEncoder
from stage1_vqvae.size_presets import preset_downsample


@dataclass
class ModelConfig:
    """The VQ-VAE's sizes: stage one's flags and `VQVAE()`'s own defaults, one source for both."""

    architecture: str = field(default="conv", metadata={
        "help": "encoder and decoder: conv (strided convolutions and two residual blocks, small and fast) or resnet "
                "(VQGAN's: residual blocks at every resolution, GroupNorm, attention at the code map)",
        "choices": ["conv", "resnet"]})
    hidden_channels: int = field(default=128, metadata={"help": "channels at the code-map resolution"})
    res_blocks: int = field(default=2, metadata={"help": "residual blocks in encoder and decoder (resnet: at each resolution)"})
    res_channels: int = field(default=32, metadata={"help": "width inside a residual block (conv only)"})
    downsample: int | None = field(default=None, metadata={"help": "image side / code-map side, a power of two (default: from "
                                                                    "--image-size, a map of at most 16x16; 4 at 32 pixels)"})
    quantizer: str = field(default="vq", metadata={
        "help": "vq (nearest of a learned codebook) or fsq (finite scalar quantization: a few channels rounded to a few "
                "levels each, no codebook to learn, so --codebook, --decay, --beta, --l2-normalize and the --dead-code "
                "flags are refused; stage1_vqvae/fsq.py)", "choices": ["vq", "fsq"]})
    fsq_levels: str | None = field(default=None, metadata={"help": "fsq: the levels of each channel, comma-separated "
                                                                    "(default: from --codebook-size, 8,8,8 for 512)"})
    codebook_size: int = field(default=512, metadata={"help": "number of codes K"})
    code_dim: int = field(default=64, metadata={"help": "dimension of a code vector"})
    codebook: str = field(default="ema", metadata={"help": "how the codebook learns", "choices": ["ema", "loss"]})
    decay: float = field(default=0.99, metadata={"help": "EMA decay of the codebook"})
    beta: float = field(default=0.25, metadata={"help": "commitment loss weight"})
    # 10, not 50: when the discriminator starts, codes fall idle; restarted within 10 steps, the
    # colour sets' lowest codebook use after it rose from 72% to 88-93% at the same MSE (docs/stage-one-gan.md)
    dead_code_steps: int = field(default=10, metadata={"help": "restart a code unused (or, with --dead-code-share, hardly used) "
                                                                 "for this many steps in a row (0: never)"})
    l2_normalize: bool = field(default=False, metadata={"help": "look codes up by cosine similarity"})
    vq_gradient: str = field(default="straight-through", metadata={
        "help": "how vq passes the decoder's gradient to the encoder: straight-through (unchanged) or rotation (turned "
                "by the angle from the encoder's output to its code, Fifty et al. 2024)",
        "choices": ["straight-through", "rotation"]})
    dead_code_share: float = field(default=0.0, metadata={"help": "a step counts towards --dead-code-steps for a code used by at "
                                                                   "most this share of an even share of the batch's positions "
                                                                   "(0: only for a code not used at all)"})


MODEL_DEFAULTS = ModelConfig()


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, res_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, res_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(res_channels, channels, 1),
        )

    def forward(self, x):
        return x + self.body(x)


def _halvings(downsample: int) -> int:
    halvings = int(math.log2(downsample))
    if downsample < 2 or 2**halvings != downsample:
        raise ValueError(f"downsample must be a power of two >= 2, got {downsample}")
    return halvings


def _widths(hidden_channels: int, halvings: int) -> list[int]:
    """Channel counts after each strided stage: halved towards the image, full at the codes."""
    return [max(hidden_channels >> (halvings - 1 - i), 16) for i in range(halvings)]


class Encoder(nn.Sequential):
    def __init__(self, in_channels, hidden_channels, res_blocks, res_channels, downsample, code_dim):
        widths = _widths(hidden_channels, _halvings(downsample))
        layers, previous = [], in_channels
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(previous, width, 4, stride=2, padding=1)]
            if i < len(widths) - 1:
                layers += [nn.ReLU()]
            previous = width
        layers += [nn.ReLU(), nn.Conv2d(previous, hidden_channels, 3, padding=1)]
        layers += [ResidualBlock(hidden_channels, res_channels) for _ in range(res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(hidden_channels, code_dim, 1)]
        super().__init__(*layers)


class Decoder(nn.Sequential):
    def __init__(self, out_channels, hidden_channels, res_blocks, res_channels, downsample, code_dim):
        widths = _widths(hidden_channels, _halvings(downsample))[::-1]
        layers = [nn.Conv2d(code_dim, hidden_channels, 3, padding=1)]
        layers += [ResidualBlock(hidden_channels, res_channels) for _ in range(res_blocks)]
        layers += [nn.ReLU()]
        previous = hidden_channels
        for width in widths[1:]:
            layers += [nn.ConvTranspose2d(previous, width, 4, stride=2, padding=1), nn.ReLU()]
            previous = width
        layers += [nn.ConvTranspose2d(previous, out_channels, 4, stride=2, padding=1)]
        super().__init__(*layers)


@dataclass
class VQVAEOutput:
    reconstruction: torch.Tensor
    quantizer: QuantizerOutput
    reconstruction_loss: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.reconstruction_loss + self.quantizer.loss


class VQVAE(nn.Module, PyTorchModelHubMixin):
    """Images in [0, 1], [B, C, H, W] -> code maps [B, H/d, W/d] -> images."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 32,
        hidden_channels: int = MODEL_DEFAULTS.hidden_channels,
        res_blocks: int = MODEL_DEFAULTS.res_blocks,
        res_channels: int = MODEL_DEFAULTS.res_channels,
        downsample: int | None = MODEL_DEFAULTS.downsample,
        codebook_size: int = MODEL_DEFAULTS.codebook_size,
        code_dim: int = MODEL_DEFAULTS.code_dim,
        beta: float = MODEL_DEFAULTS.beta,
        ema: bool = MODEL_DEFAULTS.codebook == "ema",
        decay: float = MODEL_DEFAULTS.decay,
        dead_code_steps: int = MODEL_DEFAULTS.dead_code_steps,
        l2_normalize: bool = MODEL_DEFAULTS.l2_normalize,
        dead_code_share: float = MODEL_DEFAULTS.dead_code_share,
        architecture: str = MODEL_DEFAULTS.architecture,
        quantizer: str = MODEL_DEFAULTS.quantizer,
        fsq_levels: list[int] | None = None,
        vq_gradient: str = MODEL_DEFAULTS.vq_gradient,
    ):
        super().__init__()
        downsample = downsample or preset_downsample(image_size)
        self.in_channels, self.image_size, self.downsample = in_channels, image_size, downsample
        self.codebook_size = codebook_size
        if architecture == "resnet":
            halvings = _halvings(downsample)
            self.encoder = ResnetEncoder(in_channels, hidden_channels, res_blocks, halvings, code_dim)
            self.decoder = ResnetDecoder(in_channels, hidden_channels, res_blocks, halvings, code_dim)
        elif architecture == "conv":
            self.encoder = Encoder(in_channels, hidden_channels, res_blocks, res_channels, downsample, code_dim)
            self.decoder = Decoder(in_channels, hidden_channels, res_blocks, res_channels, downsample, code_dim)
        else:
            raise ValueError(f"architecture must be 'conv' or 'resnet', got {architecture!r}")
        if quantizer == "fsq":
            levels = fsq_levels or levels_for(codebook_size)
            if levels is None:
                raise ValueError(f"no FSQ levels for a codebook of {codebook_size}; give fsq_levels")
            self.quantizer = FiniteScalarQuantizer(levels, code_dim)
            self.codebook_size = self.quantizer.codebook_size  # the levels' product
        elif quantizer == "vq":
            self.quantizer = VectorQuantizer(
                codebook_size, code_dim, beta=beta, ema=ema, decay=decay,
                dead_code_steps=dead_code_steps, l2_normalize=l2_normalize, dead_code_share=dead_code_share,
                rotation_trick=vq_gradient == "rotation",
            )
        else:
            raise ValueError(f"quantizer must be 'vq' or 'fsq', got {quantizer!r}")

    @property
    def map_shape(self) -> tuple[int, int]:
        side = self.image_size // self.downsample
        return side, side

    def forward(self, images: torch.Tensor) -> VQVAEOutput:
        quantized = self.quantizer(self.encoder(images))
        reconstruction = self.decoder(quantized.quantized)
        loss = F.mse_loss(reconstruction.float(), images.float())
        return VQVAEOutput(reconstruction, quantized, loss)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in [0, 1] -> code maps [B, h, w] (int64)."""
        z = self.encoder(images)
        batch, _, height, width = z.shape
        indices = self.quantizer.nearest(rearrange(z, "b d h w -> (b h w) d"))
        return rearrange(indices, "(b h w) -> b h w", b=batch, h=height, w=width)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Code maps [B, h, w] -> images [B, C, H, W], clamped to [0, 1]."""
        return self.decoder(self.quantizer.lookup(codes)).clamp(0, 1)


def load_vqvae(run_dir: str | Path) -> VQVAE:
    """The VQ-VAE a run exported (`<run>/vqvae/`), or one sentence naming the command that makes it."""
    directory = Path(run_dir) / "vqvae"
    if not (directory / "model.safetensors").exists():
        raise UserError(f"no VQ-VAE in {directory}; train one with `accelerate launch stage1_vqvae/train.py --run-dir {run_dir}`")
    return VQVAE.from_pretrained(str(directory))
