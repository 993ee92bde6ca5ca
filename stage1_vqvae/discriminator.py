"""The adversarial part of stage one, in the manner of VQGAN (Esser et al. 2021).

An MSE-trained decoder predicts the mean of every image its codes could stand for, which is
a blur. A patch discriminator judges small patches as real or reconstructed and pushes the
decoder towards sharp, plausible texture. Its intermediate features also give a perceptual
loss that needs no downloaded weights: feature matching (pix2pixHD, Wang et al. 2018).

- `PatchDiscriminator`: strided convolutions to a grid of real/fake logits, one per patch;
  GroupNorm rather than BatchNorm, so real and fake halves of a batch and several processes
  never share statistics (or spectral norm, an option).
- `hinge_discriminator_loss`, `generator_adversarial_loss`, `feature_matching_loss`,
  `r1_penalty`.
- `adaptive_weight`: the VQGAN balance ||grad L_rec|| / ||grad L_adv|| at the decoder's
  last layer, so the adversarial term never swamps the reconstruction.
- `lpips_loss`: the optional LPIPS term, when the `lpips` package and its weights are here.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


def _conv(norm: str, *args, **kwargs) -> nn.Module:
    layer = nn.Conv2d(*args, **kwargs)
    return spectral_norm(layer) if norm == "spectral" else layer


def _norm(norm: str, width: int) -> nn.Module:
    return nn.GroupNorm(max(1, min(32, width // 4)), width) if norm == "group" else nn.Identity()


class PatchDiscriminator(nn.Module):
    """Images in [0, 1] [B, C, H, W] -> (logits [B, 1, H/2^d, W/2^d], features of each stage).

    `norm="spectral"` bounds every convolution's spectral norm (Miyato et al. 2018) instead of
    normalising activations with GroupNorm.
    """

    def __init__(self, in_channels: int = 1, channels: int = 32, downsamplings: int = 2, norm: str = "group"):
        super().__init__()
        if norm not in ("group", "spectral"):
            raise ValueError(f"norm must be 'group' or 'spectral', got {norm!r}")
        stages, previous = [], in_channels
        for i in range(downsamplings):
            width = channels * 2**i
            stages.append(nn.Sequential(
                _conv(norm, previous, width, 4, stride=2, padding=1), _norm(norm, width) if i else nn.Identity(), nn.LeakyReLU(0.2),
            ))
            previous = width
        stages.append(nn.Sequential(_conv(norm, previous, 2 * previous, 3, padding=1), _norm(norm, 2 * previous), nn.LeakyReLU(0.2)))
        self.stages = nn.ModuleList(stages)
        self.to_logits = _conv(norm, 2 * previous, 1, 3, padding=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, features = images * 2 - 1, []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return self.to_logits(x), features


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Push real logits above +1 and fake ones below -1; nothing more is asked of either."""
    return 0.5 * (F.relu(1 - real_logits.float()).mean() + F.relu(1 + fake_logits.float()).mean())


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """Mean squared norm of the real logits' gradient with respect to the real images (Mescheder
    et al. 2018): a discriminator flat around the data cannot sharpen into a memorised set.
    `real_images` must require grad and have produced `real_logits`."""
    (gradient,) = torch.autograd.grad(real_logits.float().sum(), real_images, create_graph=True)
    return gradient.float().square().flatten(1).sum(1).mean()


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The decoder's side of the hinge game: raise the logits of its reconstructions."""
    return -fake_logits.float().mean()


def feature_matching_loss(fake_features: list[torch.Tensor], real_features: list[torch.Tensor]) -> torch.Tensor:
    """Mean L1 distance between the discriminator's features of reconstructions and of the
    real images they reconstruct, summed over stages (real features carry no gradient)."""
    return sum(F.l1_loss(fake.float(), real.detach().float()) for fake, real in zip(fake_features, real_features))


def adaptive_weight(reconstruction_loss: torch.Tensor, adversarial_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """||d L_rec / d W|| / (||d L_adv / d W|| + 1e-4) at the decoder's last weight W, detached."""
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adversarial_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0, max_weight).detach()


def load_lpips(device) -> nn.Module:
    """The LPIPS network (VGG), frozen; ValueError when the package or its weights are missing."""
    try:
        import lpips
    except ImportError:
        raise ValueError("the lpips package is not installed (pip install lpips)") from None
    try:
        model = lpips.LPIPS(net="vgg", verbose=False)
    except Exception as error:  # the VGG backbone is fetched from the internet on first use
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise ValueError(f"its VGG weights could not be loaded ({reason})") from None
    return model.to(device).eval().requires_grad_(False)


def lpips_loss(network: nn.Module, reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """LPIPS between images in [0, 1]; grayscale is repeated to the three channels it expects."""
    if images.shape[1] == 1:
        reconstruction, images = reconstruction.expand(-1, 3, -1, -1), images.expand(-1, 3, -1, -1)
    return network(reconstruction * 2 - 1, images * 2 - 1).mean()
