import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from foundation.errors import UserError
from stage1_vqvae import discriminator as disc
from stage1_vqvae import train
from tests.conftest import TINY_MODEL

ADVERSARIAL = ["--disc-start", "3", "--disc-channels", "8", "--eval-every", "100", "--no-dump"]


def test_the_discriminator_learns_an_easy_real_fake_split():
    torch.manual_seed(0)
    model = disc.PatchDiscriminator(in_channels=1, channels=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.5, 0.9))
    real = torch.zeros(16, 1, 16, 16)
    real[:, :, 4:12, 4:12] = 1.0  # a bright square
    losses = []
    for _ in range(40):
        fake = torch.rand(16, 1, 16, 16)  # noise
        logits, features = model(torch.cat([real, fake]))
        loss = disc.hinge_discriminator_loss(*logits.chunk(2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert logits.shape == (32, 1, 4, 4) and len(features) == 3
    assert losses[0] > 0.9 and sum(losses[-5:]) / 5 < 0.3 * losses[0], losses


def test_the_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    torch.manual_seed(0)
    last = torch.nn.Conv2d(4, 1, 3, padding=1)
    x, target = torch.randn(2, 4, 8, 8), torch.rand(2, 1, 8, 8)
    out = last(x)
    reconstruction, adversarial = F.l1_loss(out, target), -(3 * out).mean()
    weight = disc.adaptive_weight(reconstruction, adversarial, last.weight)
    rec_grad = torch.autograd.grad(F.l1_loss(last(x), target), last.weight)[0]
    adv_grad = torch.autograd.grad(-(3 * last(x)).mean(), last.weight)[0]
    by_hand = rec_grad.norm() / (adv_grad.norm() + 1e-4)
    assert weight.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert not weight.requires_grad
    tiny = disc.adaptive_weight(reconstruction, 1e-12 * out.sum(), last.weight, max_weight=50.0)
    assert tiny.item() == 50.0  # clamped when the adversarial gradient vanishes


def test_feature_matching_is_zero_for_identical_features_and_takes_no_gradient_from_the_real_side():
    real = [torch.randn(2, 3, 4, 4, requires_grad=True)]
    fake = [real[0].detach().clone().requires_grad_(True)]
    assert disc.feature_matching_loss(fake, real).item() == 0.0
    (disc.feature_matching_loss([fake[0] + 1], real)).backward()
    assert real[0].grad is None and fake[0].grad is not None


def test_resume_with_the_discriminator_on_gives_the_weights_of_an_uninterrupted_run(tiny_fashion, tmp_path):
    flags = [*TINY_MODEL, *ADVERSARIAL, "--max-steps", "10", "--checkpoint-every", "6"]
    train.main(["--run-dir", str(tmp_path / "straight"), *flags])
    train.main(["--run-dir", str(tmp_path / "resumed"), *flags])
    checkpoints = tmp_path / "resumed" / "vqvae" / "checkpoints"
    shutil.rmtree(checkpoints / "step_0000010")  # as if killed after step 6, with the discriminator running
    train.main(["--run-dir", str(tmp_path / "resumed"), *flags, "--resume"])
    for run in ("straight", "resumed"):
        log = (tmp_path / run / "vqvae" / "log.jsonl").read_text()
        assert "train/disc_loss" in log and "train/adversarial_weight" in log
    straight = load_file(tmp_path / "straight" / "vqvae" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "vqvae" / "final" / "model.safetensors")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    # the discriminator's own weights are in the checkpoint and match too
    straight_disc = load_file(tmp_path / "straight" / "vqvae" / "checkpoints" / "step_0000010" / "model_1.safetensors")
    resumed_disc = load_file(checkpoints / "step_0000010" / "model_1.safetensors")
    assert straight_disc.keys() == resumed_disc.keys() and any("to_logits" in k for k in straight_disc)
    for name in straight_disc:
        assert torch.equal(straight_disc[name], resumed_disc[name]), name


def test_lpips_without_its_weights_is_one_sentence_and_writes_nothing(tiny_fashion, tmp_path, monkeypatch):
    def unavailable(device):
        raise ValueError("the lpips package is not installed (pip install lpips)")

    monkeypatch.setattr(train, "load_lpips", unavailable)
    with pytest.raises(UserError, match=r"--lpips-weight 0.5 needs LPIPS, but the lpips package is not installed.*--lpips-weight 0"):
        train.main(["--run-dir", str(tmp_path), *TINY_MODEL, "--lpips-weight", "0.5", "--max-steps", "2"])
    assert not (tmp_path / "vqvae").exists()


@pytest.mark.parametrize("flags,message", [
    (["--disc-weight", "-1"], "must not be negative; 0 turns a term off"),
    (["--disc-channels", "0"], "--disc-channels 0 must be at least 1"),
])
def test_bad_discriminator_flags_are_refused_before_anything_is_written(tiny_fashion, tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        train.main(["--run-dir", str(tmp_path), *TINY_MODEL, *flags])
    assert not (tmp_path / "vqvae").exists()
