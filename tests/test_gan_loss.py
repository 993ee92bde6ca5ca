"""Stage one's GAN step on its own: who gets which gradient, the adaptive weight as wired, the augmentation."""

import pytest
import torch
import torch.nn.functional as F

from stage1_vqvae import gan_loss
from stage1_vqvae.augment import augment_pairs
from stage1_vqvae.discriminator import PatchDiscriminator, hinge_discriminator_loss
from stage1_vqvae.gan_loss import GANLoss, LossConfig


def a_batch(seed=0):
    """Images, and reconstructions made by a last layer (the decoder's, in training) from features."""
    torch.manual_seed(seed)
    images = torch.rand(4, 3, 16, 16)
    last = torch.nn.Conv2d(5, 3, 3, padding=1)
    features = torch.randn(4, 5, 16, 16)
    return images, last, torch.sigmoid(last(features))


@pytest.mark.parametrize("augment", ["diffaugment", "none"])
def test_the_discriminator_learns_from_its_own_loss_alone(augment):
    images, last, reconstruction = a_batch()
    config = LossConfig(disc_start=0, disc_augment=augment)
    discriminator = PatchDiscriminator(3, 8)
    loss = GANLoss(config, discriminator)
    torch.manual_seed(1)
    total, metrics = loss(images, reconstruction, last.weight, step=5)
    assert {"feature_matching", "adversarial", "disc_loss"} <= metrics.keys()
    through_total = torch.autograd.grad(total, list(discriminator.parameters()), retain_graph=True)

    torch.manual_seed(1)  # the same augmentation draw
    real, fake = augment_pairs(images, reconstruction) if augment == "diffaugment" else (images, reconstruction)
    logits, _ = discriminator(torch.cat([real, fake.detach()]))
    own = torch.autograd.grad(hinge_discriminator_loss(*logits.chunk(2)), list(discriminator.parameters()))
    for a, b in zip(through_total, own):
        torch.testing.assert_close(a, b)  # nothing of feature matching or the adversarial term reaches it
    # and the decoder still learns from the discriminator's terms
    assert torch.autograd.grad(total, last.weight)[0].abs().sum() > 0


def test_the_adaptive_weight_as_wired_is_the_gradient_norm_ratio_at_the_decoders_last_layer(monkeypatch):
    images, last, reconstruction = a_batch()
    seen = {}
    real_adaptive_weight = gan_loss.adaptive_weight

    def spy(reconstruction_loss, adversarial_loss, last_layer):
        seen.update(reconstruction=reconstruction_loss, adversarial=adversarial_loss, layer=last_layer)
        return real_adaptive_weight(reconstruction_loss, adversarial_loss, last_layer)

    monkeypatch.setattr(gan_loss, "adaptive_weight", spy)
    config = LossConfig(disc_start=0, disc_weight=0.5, disc_augment="none", gan_ramp_steps=0)
    _, metrics = GANLoss(config, PatchDiscriminator(3, 8))(images, reconstruction, last.weight, step=0)
    # it is fed the pixel and feature-matching terms, the adversarial term, and the decoder's last weight
    assert seen["layer"] is last.weight
    assert seen["reconstruction"].item() == pytest.approx((metrics["pixel_loss"] + metrics["feature_matching"]).item(), rel=1e-6)
    assert seen["adversarial"].item() == pytest.approx(metrics["adversarial"].item())
    rec_grad = torch.autograd.grad(seen["reconstruction"], last.weight, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(seen["adversarial"], last.weight, retain_graph=True)[0]
    ratio = rec_grad.norm() / (adv_grad.norm() + 1e-4)
    assert metrics["adversarial_weight"].item() == pytest.approx(0.5 * ratio.item(), rel=1e-5)


def test_without_the_adaptive_weight_the_adversarial_term_weighs_disc_weight():
    images, last, reconstruction = a_batch()
    config = LossConfig(disc_start=0, disc_weight=0.2, adaptive_weight=False, disc_augment="none", gan_ramp_steps=0)
    _, metrics = GANLoss(config, PatchDiscriminator(3, 8))(images, reconstruction, last.weight, step=0)
    assert metrics["adversarial_weight"].item() == pytest.approx(0.2)


@pytest.mark.parametrize("step, share", [(10, 0.25), (11, 0.5), (13, 1.0), (50, 1.0)])
def test_the_decoders_gan_terms_grow_over_gan_warmup_steps(step, share):
    images, last, reconstruction = a_batch()
    config = LossConfig(disc_start=10, gan_ramp_steps=4, disc_weight=0.2, adaptive_weight=False, disc_augment="none")
    total, metrics = GANLoss(config, PatchDiscriminator(3, 8))(images, reconstruction, last.weight, step=step)
    assert metrics["adversarial_weight"].item() == pytest.approx(0.2 * share)
    decoder_terms = total - metrics["pixel_loss"] - metrics["disc_loss"] - metrics["adversarial_weight"] * metrics["adversarial"]
    assert decoder_terms.item() == pytest.approx(share * metrics["feature_matching"].item(), rel=1e-5)


def test_before_disc_start_only_the_pixel_term_counts():
    images, last, reconstruction = a_batch()
    config = LossConfig(disc_start=10, pixel_loss="l1")
    total, metrics = GANLoss(config, PatchDiscriminator(3, 8))(images, reconstruction, last.weight, step=9)
    assert total.item() == pytest.approx(F.l1_loss(reconstruction, images).item())
    assert metrics.keys() == {"pixel_loss"}


def test_during_the_head_start_the_discriminator_trains_and_the_decoder_feels_only_the_pixel_term():
    images, last, reconstruction = a_batch()
    config = LossConfig(disc_start=10, disc_head_start=3, pixel_loss="l1", disc_augment="none")
    discriminator = PatchDiscriminator(3, 8)
    loss = GANLoss(config, discriminator)
    assert not loss.active(6) and loss.active(7)
    total, metrics = loss(images, reconstruction, last.weight, step=8)
    assert metrics.keys() == {"pixel_loss", "disc_loss", "real_logit", "fake_logit"}
    decoder_grad = torch.autograd.grad(total, last.weight, retain_graph=True)[0]
    pixel_grad = torch.autograd.grad(F.l1_loss(reconstruction, images), last.weight, retain_graph=True)[0]
    torch.testing.assert_close(decoder_grad, pixel_grad)
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(total, list(discriminator.parameters())))


def test_r1_penalises_the_real_images_gradient_every_r1_every_steps():
    images, last, reconstruction = a_batch()
    config = LossConfig(disc_start=0, disc_augment="none", r1_weight=1.0, r1_every=2)
    loss = GANLoss(config, PatchDiscriminator(3, 8))
    _, with_r1 = loss(images, reconstruction, last.weight, step=4)
    _, without = loss(images, reconstruction, last.weight, step=5)
    assert with_r1["r1"].item() > 0 and "r1" not in without
    # and it reaches the discriminator's loss with its weight, scaled by r1_every (lazy regularisation)
    config = LossConfig(disc_start=0, disc_augment="none", r1_weight=3.0, r1_every=2)
    loss = GANLoss(config, PatchDiscriminator(3, 8))
    fake = reconstruction.detach()
    due_metrics = {}
    due = loss.discriminator_loss(images, fake, step=4, metrics=due_metrics)[0]
    not_due = loss.discriminator_loss(images, fake, step=5, metrics={})[0]
    penalty = due_metrics["r1"].item()
    assert penalty > 0 and (due - not_due).item() == pytest.approx(0.5 * 3.0 * 2 * penalty, rel=1e-5)


def test_the_augmentation_is_differentiable_and_the_same_for_a_real_image_and_its_reconstruction():
    torch.manual_seed(0)
    real = torch.rand(6, 3, 16, 16)
    fake = real.clone().requires_grad_(True)  # a perfect reconstruction: the pair must stay identical
    augmented_real, augmented_fake = augment_pairs(real, fake)
    torch.testing.assert_close(augmented_real, augmented_fake)
    assert not torch.allclose(augmented_real, real)  # something was done to them
    (augmented_fake * torch.randn_like(augmented_fake)).sum().backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    # each image gets its own draw
    assert not torch.allclose(augmented_real[0] - real[0], augmented_real[1] - real[1])


def test_translation_moves_the_picture_and_fills_with_grey():
    from stage1_vqvae.augment import GRAY, translate

    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 2, 3] = 1.0
    moved = translate(image, torch.tensor([1]), torch.tensor([-2]))
    assert moved[0, 0, 3, 1] == 1.0 and moved[0, 0].sum() == pytest.approx(1.0 + GRAY * (8 + 7 * 2))  # a row in at the top, two columns at the right


def test_with_probability_zero_the_augmentation_is_the_identity():
    torch.manual_seed(0)
    real, fake = torch.rand(3, 1, 12, 12), torch.rand(3, 1, 12, 12)
    augmented_real, augmented_fake = augment_pairs(real, fake, p=0.0)
    torch.testing.assert_close(augmented_real, real)
    torch.testing.assert_close(augmented_fake, fake)


def test_adas_probability_rises_while_the_discriminator_is_sure_of_real_images_and_falls_otherwise():
    from stage1_vqvae.augment import AdaptiveProbability

    ada = AdaptiveProbability(target=0.6, images_to_full=100)
    reconstructions = torch.full((10, 1, 4, 4), -1.0)
    for _ in range(30):
        ada.update(torch.full((10, 1, 4, 4), 2.0), reconstructions)  # every real patch scored above the reconstructions
    assert float(ada.p) == 1.0
    for _ in range(3):
        ada.update(torch.full((10, 1, 4, 4), -1.0), reconstructions)
    assert float(ada.p) == pytest.approx(0.7)
    torch.manual_seed(0)
    for _ in range(3):  # both scored high, nothing told apart: an offset, not a discriminator that is too sure
        ada.update(torch.randn(10, 1, 4, 4) + 3, torch.randn(10, 1, 4, 4) + 3)
    assert float(ada.p) == pytest.approx(0.4)
    restored = AdaptiveProbability()
    restored.load_state_dict(ada.state_dict())
    assert float(restored.p) == float(ada.p)
