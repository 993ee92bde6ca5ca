"""Stage one's adversarial phase inside the training loop: the EMA of the weights, fp16, the health check."""

import json
import shutil

import pytest
import torch
from accelerate.utils import AutocastKwargs
from safetensors.torch import load_file

from foundation import training
from foundation.errors import UserError
from stage1_vqvae import train
from tests.conftest import TINY_MODEL, reset_accelerate_state

ADVERSARIAL = ["--disc-start", "2", "--disc-channels", "8", "--eval-every", "100", "--no-dump"]


def test_the_ema_resumes_exactly_and_is_what_gets_exported(tiny_fashion, tmp_path):
    flags = [*TINY_MODEL, *ADVERSARIAL, "--ema-decay", "0.9", "--disc-augment", "ada", "--max-steps", "10",
             "--checkpoint-every", "6"]
    train.main(["--run-dir", str(tmp_path / "straight"), *flags])
    train.main(["--run-dir", str(tmp_path / "resumed"), *flags])
    checkpoints = tmp_path / "resumed" / "vqvae" / "checkpoints"
    shutil.rmtree(checkpoints / "step_0000010")  # as if killed after step 6
    train.main(["--run-dir", str(tmp_path / "resumed"), *flags, "--resume"])
    exported = {run: load_file(tmp_path / run / "vqvae" / "model.safetensors") for run in ("straight", "resumed")}
    for name in exported["straight"]:
        assert torch.equal(exported["straight"][name], exported["resumed"][name]), name
    # the exported weights are the average's, kept in the checkpoint beside the trained ones, which differ
    average = torch.load(tmp_path / "straight" / "vqvae" / "checkpoints" / "step_0000010" / "custom_checkpoint_1.pkl",
                         weights_only=True)
    trained = load_file(tmp_path / "straight" / "vqvae" / "final" / "model.safetensors")
    decoder = "decoder.0.weight"
    assert torch.equal(exported["straight"][decoder], average[f"module.{decoder}"])
    assert not torch.equal(exported["straight"][decoder], trained[decoder])
    assert average["n_averaged"].item() == 10


def fp16_on_the_cpu(monkeypatch, autocast: bool = True):
    """accelerate's fp16 path (a gradient scaler, unscaling before the optimizer steps, and
    autocast to float16 unless `autocast` is False) on the CPU, where accelerate leaves fp16 off."""
    make_accelerator = training.make_accelerator

    def with_fp16(config, project_dir):
        accelerator = make_accelerator(config, project_dir)
        accelerator.state._mixed_precision = "fp16"
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        accelerator.autocast_handler = AutocastKwargs(enabled=autocast)
        return accelerator

    monkeypatch.setattr(training, "make_accelerator", with_fp16)


def discriminator_gradients_of_the_first_step(monkeypatch):
    """Record the discriminator's gradients as the optimizer sees them at its first step (after unscaling)."""
    seen = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        if not seen:
            seen.extend(p.grad.detach().clone() for p in self.param_groups[1]["params"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


FP16_FLAGS = [*TINY_MODEL, "--disc-start", "0", "--disc-channels", "8", "--disc-lr", "2e-3", "--lr", "1e-5",
              "--disc-augment", "none", "--eval-every", "100", "--no-dump", "--log-every", "1", "--mixed-precision", "fp16"]


def test_fp16_loss_scaling_unscales_the_discriminators_gradients_once(tiny_fashion, tmp_path, monkeypatch):
    """With the arithmetic kept in fp32, the scaler alone must not change a gradient: scaling
    by 2^16 and back is exact. (Two optimizers had the second's gradients unscaled twice.)"""
    with monkeypatch.context() as patch:  # (monkeypatch.undo() would also forget the tiny data set)
        fp32 = discriminator_gradients_of_the_first_step(patch)
        train.main(["--run-dir", str(tmp_path / "fp32"), *FP16_FLAGS[:-2], "--max-steps", "1", "--mixed-precision", "no"])
    reset_accelerate_state()  # another precision in the same process
    fp16_on_the_cpu(monkeypatch, autocast=False)
    scaled = discriminator_gradients_of_the_first_step(monkeypatch)
    train.main(["--run-dir", str(tmp_path / "scaled"), *FP16_FLAGS, "--max-steps", "1"])
    assert len(scaled) == len(fp32) > 0
    for after_unscaling, plain in zip(scaled, fp32):
        torch.testing.assert_close(after_unscaling, plain, rtol=1e-5, atol=1e-9)


def test_under_fp16_the_discriminator_learns_an_easy_split(tiny_fashion, tmp_path, monkeypatch):
    fp16_on_the_cpu(monkeypatch)
    train.main(["--run-dir", str(tmp_path), *FP16_FLAGS, "--max-steps", "40"])
    # reconstructions of a VQ-VAE that barely learns (--lr 1e-5) are easy to tell from real images
    log = (tmp_path / "vqvae" / "log.jsonl").read_text().splitlines()
    losses = [row["train/disc_loss"] for row in map(json.loads, log) if "train/disc_loss" in row]
    assert losses[0] > 0.8 and sum(losses[-5:]) / 5 < 0.5 * losses[0], losses


@pytest.mark.parametrize("decay", [False, True])
def test_the_discriminators_learning_rate_decays_with_the_vqvaes_only_when_asked(tiny_fashion, tmp_path, monkeypatch, decay):
    rates = []  # (the VQ-VAE's, the discriminator's) at each optimizer step
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        rates.append((self.param_groups[0]["lr"], self.param_groups[1]["lr"]))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train.main(["--run-dir", str(tmp_path), *TINY_MODEL, *ADVERSARIAL, "--max-steps", "10", "--lr", "2e-3", "--disc-lr", "4e-4",
                "--lr-rewarm-steps", "0", *(["--disc-lr-decay"] if decay else [])])
    assert len(rates) == 10 and rates[-1][0] < 0.1 * rates[1][0]  # the cosine has nearly reached zero
    for model_rate, disc_rate in rates:
        assert disc_rate == pytest.approx(model_rate / 5 if decay else 4e-4)


def test_the_vqvaes_learning_rate_warms_up_again_when_the_decoder_first_reads_the_discriminator(tiny_fashion, tmp_path, monkeypatch):
    rates = {}  # --lr-rewarm-steps -> (the VQ-VAE's, the discriminator's) rate at each optimizer step
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        rates[warmup].append((self.param_groups[0]["lr"], self.param_groups[1]["lr"]))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    for warmup in (0, 4):
        rates[warmup] = []
        train.main(["--run-dir", str(tmp_path / str(warmup)), *TINY_MODEL, *ADVERSARIAL, "--max-steps", "12",
                    "--lr-rewarm-steps", str(warmup)])
    cosine, rewarmed = rates[0], rates[4]
    assert len(rewarmed) == 12 and all(disc == plain_disc for (_, disc), (_, plain_disc) in zip(rewarmed, cosine))
    disc_start = 2
    for step_index, ((rate, _), (plain, _)) in enumerate(zip(rewarmed, cosine)):
        if disc_start <= step_index < disc_start + 4:  # from a quarter of the cosine's rate up to all of it
            assert rate == pytest.approx(plain * (step_index - disc_start + 1) / 4)
        else:
            assert rate == pytest.approx(plain)


def test_the_summary_says_when_the_discriminator_wins_outright(tiny_fashion, tmp_path, capsys):
    """A discriminator that learns fast against a VQ-VAE that barely does: it separates them with room to spare."""
    train.main(["--run-dir", str(tmp_path), *TINY_MODEL, "--disc-start", "0", "--disc-channels", "8", "--disc-lr", "5e-3",
                "--lr", "1e-5", "--disc-augment", "none", "--max-steps", "40", "--log-every", "2", "--eval-every", "100", "--no-dump"])
    summary = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Stage one done")]
    assert len(summary) == 1 and "the discriminator won outright" in summary[0], summary
    assert "--disc-augment diffaugment" in summary[0]


def test_a_healthy_run_has_no_warning(tmp_path):
    from stage1_vqvae.gan_health import diagnose

    rows = [{"step": s, "train/real_logit": 0.3, "train/fake_logit": -0.2, "train/disc_loss": 0.9} for s in range(10, 100, 10)]
    rows += [{"step": 10, "test/codebook_usage": 0.97}, {"step": 100, "test/codebook_usage": 0.99}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert diagnose(tmp_path / "log.jsonl", disc_start=20) == []
    rows.append({"step": 60, "test/codebook_usage": 0.3})  # a collapse after the start
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    [warning] = diagnose(tmp_path / "log.jsonl", disc_start=20)
    assert "the codebook collapsed" in warning and "30%" in warning and "97%" in warning


@pytest.mark.parametrize("flags,message", [
    (["--r1-weight", "-1"], "--r1-weight -1.0 must not be negative"),
    (["--r1-every", "0"], "--r1-every 0 must be at least 1"),
    (["--ema-decay", "1"], "--ema-decay 1.0 must be at least 0"),
    (["--gan-ramp-steps", "-5"], "--gan-ramp-steps -5 must not be negative"),
    (["--lr-rewarm-steps", "-1"], "--lr-rewarm-steps -1 must not be negative"),
    (["--adam-beta2", "1"], "--adam-beta2 1.0 must be at least 0 and below 1"),
    (["--dead-code-share", "1"], "--dead-code-share 1.0 must be at least 0"),
    # renamed to say what each warms up
    (["--gan-warmup", "50"], "--gan-warmup was renamed --gan-ramp-steps"),
    (["--gan-lr-warmup", "50"], "--gan-lr-warmup was renamed --lr-rewarm-steps"),
    (["--warmup-steps", "50"], "--warmup-steps was renamed --lr-warmup-steps"),
    # accepted and ignored, before: each now says why it does nothing
    (["--lr-rewarm-steps", "100", "--disc-start", "-1"], "--lr-rewarm-steps 100 warms the learning rate up again when the "
                                                       "discriminator starts, but this run trains without one .--disc-start -1"),
    (["--dead-code-share", "0.25", "--dead-code-steps", "0"], "--dead-code-share 0.25 says which codes count as idle for "
                                                              "restarts, but --dead-code-steps 0 restarts none"),
])
def test_bad_gan_flags_are_refused_before_anything_is_written(tiny_fashion, tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        train.main(["--run-dir", str(tmp_path), *TINY_MODEL, *flags])
    assert not (tmp_path / "vqvae").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_on_cuda_unscales_the_discriminators_gradients_once(tiny_fashion, tmp_path, monkeypatch):
    """Real fp16 arithmetic moves the codes a little, so the gradients are compared in size:
    unscaled twice, they would be 2^16 times too small."""
    with monkeypatch.context() as patch:
        fp32 = discriminator_gradients_of_the_first_step(patch)
        train.main(["--run-dir", str(tmp_path / "fp32"), *FP16_FLAGS[:-2], "--max-steps", "1", "--mixed-precision", "no"])
    reset_accelerate_state()
    fp16 = discriminator_gradients_of_the_first_step(monkeypatch)
    train.main(["--run-dir", str(tmp_path / "fp16"), *FP16_FLAGS, "--max-steps", "1"])
    ratio = torch.stack([a.norm() for a in fp16]).sum() / torch.stack([b.norm() for b in fp32]).sum()
    assert 0.5 < ratio.item() < 2.0, ratio

