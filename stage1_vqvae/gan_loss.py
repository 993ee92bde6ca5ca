"""Stage one's loss as one piece, like taming's `VQLPIPSWithDiscriminator`: what the decoder is
trained to match, and the discriminator's own update, testable apart from the training loop.

- The pixel term (L1, MSE or both), and LPIPS where asked.
- From `disc_start` on, the discriminator's hinge loss (plus an R1 penalty where asked) on real
  images against detached reconstructions, both augmented alike (`augment.py`).
- For the decoder, feature matching and the adversarial term, read through a copy of the
  discriminator whose weights take no gradient, so the generator's terms never change it.
- The discriminator can start `disc_head_start` steps before the decoder reads it, so that
  its features mean something when they first pull on the decoder.
- Both decoder terms can grow from nothing over `gan_ramp_steps` steps after `disc_start`.
- The adversarial term's weight: VQGAN's adaptive balance at the decoder's last layer times
  `disc_weight`, or `disc_weight` alone (`--no-adaptive-weight`).

One backward of the total trains both sides: the discriminator's loss reaches only the
discriminator (the reconstruction is detached there), the generator's terms only the generator.
"""

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel

from stage1_vqvae.augment import AdaptiveProbability, augment_pairs
from stage1_vqvae.discriminator import (
    PatchDiscriminator, adaptive_weight, feature_matching_loss, generator_adversarial_loss, hinge_discriminator_loss,
    lpips_loss, r1_penalty,
)


@dataclass
class LossConfig:
    """What the decoder is trained to match: pixels, and (after --disc-start) a discriminator."""

    pixel_loss: str = field(default="l1", metadata={"help": "pixel term", "choices": ["l1", "mse", "l1+mse"]})
    disc_start: int = field(default=400, metadata={"help": "optimizer step at which the discriminator starts (-1: never)"})
    disc_weight: float = field(default=0.5, metadata={"help": "factor on the adaptive weight of the adversarial term (0: none)"})
    adaptive_weight: bool = field(default=True, metadata={"help": "weigh the adversarial term by VQGAN's gradient-norm ratio times "
                                                                  "--disc-weight (--no-adaptive-weight: by --disc-weight alone)"})
    feature_matching_weight: float = field(default=1.0, metadata={"help": "weight of the discriminator feature-matching loss"})
    lpips_weight: float = field(default=0.0, metadata={"help": "weight of LPIPS (needs the lpips package and its weights)"})
    disc_channels: int = field(default=32, metadata={"help": "discriminator width"})
    disc_lr: float = field(default=4e-4, metadata={"help": "discriminator learning rate (Adam, betas 0.5, 0.9)"})
    disc_lr_decay: bool = field(default=False, metadata={"help": "the discriminator's learning rate decays with the VQ-VAE's "
                                                                 "cosine schedule (--no-disc-lr-decay: constant)"})
    disc_norm: str = field(default="group", metadata={"help": "the discriminator's normalisation", "choices": ["group", "spectral"]})
    disc_augment: str = field(default="ada", metadata={
        "help": "differentiable augmentation of what the discriminator sees (colour, translation, cutout): on every image "
                "(diffaugment), or on a share that grows while the discriminator is too sure of the real images (ada)",
        "choices": ["diffaugment", "ada", "none"]})
    clean_feature_matching: bool = field(default=False, metadata={"help": "feature matching compares the discriminator's "
                                                                   "features of unaugmented images (the game itself stays augmented)"})
    r1_weight: float = field(default=0.0, metadata={"help": "weight of the R1 gradient penalty on real images (0: none)"})
    r1_every: int = field(default=4, metadata={"help": "apply R1 every N steps, scaled by N (lazy regularisation)"})
    disc_head_start: int | None = field(default=None, metadata={
        "help": "the discriminator trains alone for this many steps before --disc-start, when the decoder starts to read it "
                "(default: 100 on fewer than 10,000 train images, else 0)"})
    gan_ramp_steps: int = field(default=0, metadata={"help": "the decoder's feature-matching and adversarial terms grow from 0 to "
                                                    "full over this many steps after --disc-start (0: full at once)"})

    @property
    def uses_discriminator(self) -> bool:
        return self.disc_start >= 0 and (self.disc_weight > 0 or self.feature_matching_weight > 0)


def pixel_loss(kind: str, reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    l1 = F.l1_loss(reconstruction, images) if "l1" in kind else 0.0
    mse = F.mse_loss(reconstruction, images) if "mse" in kind else 0.0
    return l1 + mse


def build_discriminator(config: LossConfig, channels: int) -> PatchDiscriminator | None:
    return PatchDiscriminator(channels, config.disc_channels, norm=config.disc_norm) if config.uses_discriminator else None


class GANLoss:
    """`loss(images, reconstruction, last_layer, step) -> (total, metrics)`, images in [0, 1].

    `discriminator` may be wrapped for several processes (DDP): its own update goes through the
    wrapper, so its gradients are synchronised; the decoder's terms read the bare module.
    """

    def __init__(self, config: LossConfig, discriminator=None, lpips_network=None, autocast=nullcontext):
        self.config, self.discriminator, self.lpips, self.autocast = config, discriminator, lpips_network, autocast
        self.adaptive = AdaptiveProbability() if config.disc_augment == "ada" else None

    def active(self, step: int) -> bool:
        """Whether the discriminator trains at `step`; the decoder reads it from `disc_start` on."""
        head_start = self.config.disc_head_start or 0  # None where no one chose (stage one's main chooses)
        return self.discriminator is not None and step >= self.config.disc_start - head_start

    def phase(self, step: int) -> tuple:
        """What a step computes at `step`, as far as Python decides it: a CUDA graph of the step
        holds for as long as this stays the same (the discriminator's start, the decoder's
        reading it, R1's steps, the ramp)."""
        config = self.config
        return (self.active(step), step >= config.disc_start, self.active(step) and self.r1_due(step),
                self.ramp(step) if step >= config.disc_start else 0.0)

    def r1_due(self, step: int) -> bool:
        """Whether the discriminator's loss takes the R1 penalty at `step` (lazily, every `r1_every`)."""
        return self.config.r1_weight > 0 and step % self.config.r1_every == 0

    def ramp(self, step: int) -> float:
        """How much of the decoder's GAN terms counts at `step`: a discriminator that has just
        started has random features, and a full-strength pull towards them jolts the codebook."""
        if self.config.gan_ramp_steps <= 0:
            return 1.0
        return min(1.0, (step - self.config.disc_start + 1) / self.config.gan_ramp_steps)

    def __call__(self, images, reconstruction, last_layer, step: int) -> tuple[torch.Tensor, dict]:
        config = self.config
        loss = pixel_loss(config.pixel_loss, reconstruction, images)
        metrics = {"pixel_loss": loss.detach()}
        if self.lpips is not None:
            loss = loss + config.lpips_weight * lpips_loss(self.lpips, reconstruction, images)
        if not self.active(step):
            return loss, metrics
        real, fake = images, reconstruction
        if config.disc_augment != "none":
            p = self.adaptive.p if self.adaptive is not None else 1.0
            real, fake = augment_pairs(images, reconstruction, p=p)
            metrics["augment_p"] = torch.as_tensor(p, dtype=torch.float32)
        disc_loss, real_features = self.discriminator_loss(real, fake.detach(), step, metrics)
        if step < config.disc_start:
            return loss + disc_loss, metrics
        logits, features = self.frozen_discriminator(fake)
        ramp = self.ramp(step)
        if config.feature_matching_weight > 0:
            if config.clean_feature_matching and config.disc_augment != "none":
                with torch.no_grad():
                    _, real_features = self.frozen_discriminator(images)
                _, features = self.frozen_discriminator(reconstruction)
            matching = feature_matching_loss(features, real_features)
            loss = loss + ramp * config.feature_matching_weight * matching
            metrics["feature_matching"] = matching.detach()
        if config.disc_weight > 0:
            adversarial = generator_adversarial_loss(logits)
            weight = ramp * config.disc_weight
            if config.adaptive_weight:
                weight = weight * adaptive_weight(loss, adversarial, last_layer)
            metrics.update(adversarial=adversarial.detach(), adversarial_weight=torch.as_tensor(weight, dtype=torch.float32))
            loss = loss + weight * adversarial
        return loss + disc_loss, metrics

    def discriminator_loss(self, real, fake, step: int, metrics: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The hinge loss of real against (detached) fake images, R1 on the real ones every
        `r1_every` steps; returns it and the real images' features, for feature matching."""
        config = self.config
        with_r1 = self.r1_due(step)
        if with_r1:
            real = real.detach().requires_grad_(True)
        with self.autocast():
            logits, features = self.discriminator(torch.cat([real, fake]))
        real_logits, fake_logits = logits.float().chunk(2)
        if self.adaptive is not None:
            self.adaptive.update(real_logits, fake_logits)
        loss = hinge_discriminator_loss(real_logits, fake_logits)
        metrics.update(disc_loss=loss.detach(), real_logit=real_logits.mean().detach(), fake_logit=fake_logits.mean().detach())
        if with_r1:
            penalty = r1_penalty(real_logits, real)
            loss = loss + 0.5 * config.r1_weight * config.r1_every * penalty
            metrics["r1"] = penalty.detach()
        return loss, [feature.chunk(2)[0] for feature in features]

    def frozen_discriminator(self, images):
        """The discriminator's logits and features with its weights detached: gradients reach
        the images (the decoder), never the discriminator."""
        bare = extract_model_from_parallel(self.discriminator)
        frozen = {name: p.detach() for name, p in bare.named_parameters()}
        with self.autocast():
            return torch.func.functional_call(bare, frozen, (images,))
