"""Stage one's sizes chosen from --image-size, and every flag overriding them."""

import json
import shutil

import pytest

from foundation.errors import UserError
from stage1_vqvae import size_presets
from stage1_vqvae.model import VQVAE
from stage1_vqvae.size_presets import (
    apply_data_presets,
    apply_size_presets,
    preset_dead_code_share,
    preset_disc_head_start,
    preset_lr_rewarm_steps,
    preset_map_transforms,
    preset_min_steps,
    preset_lr_warmup_steps,
)
from stage1_vqvae.train import TrainConfig


@pytest.mark.parametrize("size, downsample, side, batch", [(32, 4, 8, 128), (64, 4, 16, 128), (128, 8, 16, 32), (256, 16, 16, 16)])
def test_the_presets_keep_the_map_at_most_16_a_side_and_a_steps_pixels_bounded(size, downsample, side, batch):
    config, reasons = apply_size_presets(TrainConfig(image_size=size))
    assert (config.downsample, config.batch_size) == (downsample, batch)
    assert VQVAE(image_size=size, downsample=config.downsample).map_shape == (side, side)
    assert reasons[0].startswith(f"--downsample {downsample} (code maps of {side}x{side}")
    assert any(r.startswith(f"--batch-size {batch}") for r in reasons) == (batch != 128)


def test_a_flag_overrides_each_preset_and_is_not_explained():
    config, reasons = apply_size_presets(TrainConfig(image_size=256, downsample=8, batch_size=4))
    assert (config.downsample, config.batch_size, reasons) == (8, 4, [])


def test_the_data_presets_fill_what_was_left_out_and_leave_a_discriminators_alone_without_one():
    config, reasons = apply_data_presets(TrainConfig(lr_warmup_steps=50), 1_429)
    assert (config.lr_warmup_steps, config.disc_head_start, config.min_steps, config.map_transforms) == (50, 100, 1404, "flip")
    assert not any(reason.startswith("--lr-warmup-steps") for reason in reasons)  # given, so not explained
    without, reasons = apply_data_presets(TrainConfig(disc_start=-1, dead_code_steps=0), 1_429)
    assert (without.disc_head_start, without.lr_rewarm_steps, without.dead_code_share) == (None, None, 0.0)
    assert not any(reason.startswith(("--disc-head-start", "--lr-rewarm-steps", "--dead-code-share")) for reason in reasons)
    assert set(TrainConfig.CHOSEN_FROM_DATA) == set(size_presets.DATA_PRESETS)


def test_a_model_built_in_python_takes_the_same_rule():
    assert VQVAE(image_size=128).downsample == 8 and VQVAE().downsample == 4


def test_stage_one_prints_its_size_choices(tiny_fashion, tmp_path, capsys):
    from stage1_vqvae import train as stage_one
    from tests.conftest import TINY_MODEL

    stage_one.main(["--run-dir", str(tmp_path / "run"), *TINY_MODEL, "--image-size", "64", "--max-steps", "1", "--no-dump",
                    "--disc-start", "-1"])
    out = capsys.readouterr().out
    assert "chosen for this data: --downsample 4 (code maps of 16x16: the prior's cost grows with the map" in out


@pytest.mark.parametrize("images, steps", [(1_429, 100), (9_999, 100), (10_000, 0), (60_000, 0), (None, 0)])
def test_the_discriminator_gets_a_head_start_on_small_sets_only(images, steps):
    chosen, why = preset_disc_head_start(images, disc_start=400)
    assert chosen == steps and why.startswith(f"--disc-head-start {steps} (")
    assert preset_disc_head_start(images, disc_start=30)[0] == min(steps, 30)  # never before step 0


@pytest.mark.parametrize("images, size, steps", [(1_429, 32, 100), (9_999, 28, 100), (1_429, 64, 0), (10_000, 32, 0),
                                                  (60_000, 32, 0), (None, 32, 0)])
def test_the_learning_rate_warms_up_again_for_the_discriminator_on_small_sets_of_small_images_only(images, size, steps):
    chosen, why = preset_lr_rewarm_steps(images, size)
    assert chosen == steps and why.startswith(f"--lr-rewarm-steps {steps} (")


@pytest.mark.parametrize("images, size, share", [(1_429, 32, 0.25), (9_999, 28, 0.25), (1_429, 64, 0.0), (10_000, 32, 0.0),
                                                  (60_000, 32, 0.0), (None, 32, 0.0)])
def test_rarely_used_codes_are_restarted_on_small_sets_of_small_images_only(images, size, share):
    chosen, why = preset_dead_code_share(images, size)
    assert chosen == share and why.startswith(f"--dead-code-share {share:g} (")


@pytest.mark.parametrize("images, transforms", [(1_429, "flip"), (9_999, "flip"), (10_000, "none"), (60_000, "none"), (None, "none")])
def test_the_dump_writes_mirror_images_of_small_sets_only(images, transforms):
    chosen, why = preset_map_transforms(images)
    assert chosen == transforms and why.startswith(f"--map-transforms {transforms} (")


def test_stage_one_gives_the_discriminator_a_head_start_on_a_small_set_and_says_so(tiny_fashion, tmp_path, capsys):
    from stage1_vqvae import train as stage_one
    from tests.conftest import TINY_MODEL

    flags = ["--run-dir", str(tmp_path / "run"), *TINY_MODEL, "--max-steps", "4", "--no-dump", "--disc-start", "2",
             "--disc-channels", "8", "--log-every", "1"]
    stage_one.main(flags)
    out = capsys.readouterr().out
    assert "--disc-head-start 2 (fewer than 10,000 train images" in out and "--lr-rewarm-steps 100 (fewer than" in out
    assert "--dead-code-share 0.25 (fewer than" in out
    recorded = json.loads((tmp_path / "run" / "vqvae" / "train_config.json").read_text())
    assert recorded["lr_rewarm_steps"] == 100 and recorded["dead_code_share"] == 0.25
    assert json.loads((tmp_path / "run" / "vqvae" / "config.json").read_text())["dead_code_share"] == 0.25  # the model's own
    logged = [json.loads(line) for line in (tmp_path / "run" / "vqvae" / "log.jsonl").read_text().splitlines()]
    assert any("train/disc_loss" in row and row["step"] == 1 for row in logged)  # it trained from step 0
    stage_one.main([*flags, "--overwrite", "--disc-head-start", "1"])
    assert "--disc-head-start" not in capsys.readouterr().out  # a flag given is not explained
    assert json.loads((tmp_path / "run" / "vqvae" / "train_config.json").read_text())["disc_head_start"] == 1
    with pytest.raises(UserError, match=r"--disc-head-start 2 \(was 1\)"):  # left out now, the data would choose another
        stage_one.main([*flags, "--resume"])


@pytest.mark.parametrize("side, batch", [(4, 32), (8, 32), (16, 8), (32, 8)])
def test_stage_two_keeps_the_codes_of_a_step_near_the_demos(side, batch):
    from stage2_prior.size_presets import preset_prior_batch

    assert preset_prior_batch(side, side) == batch


@pytest.mark.parametrize("epochs, dropout", [(2.25, 0.0), (10.3, 0.0), (12, 0.0), (13.5, 0.1), (41.4, 0.1), (95.9, 0.1)])
def test_a_prior_that_passes_over_its_maps_many_times_gets_dropout(epochs, dropout):
    """Fashion-MNIST's 2.25 epochs keep the demo's prior, and the emoji's 10.3 at 64 pixels were still
    learning without it; a small set's 41 or 96 would be learnt by heart."""
    from stage2_prior.size_presets import preset_prior_dropout

    assert preset_prior_dropout(epochs) == dropout


@pytest.mark.parametrize("epochs, corruption", [(2.25, 0.0), (10.3, 0.0), (41.4, 0.2), (95.9, 0.2)])
def test_a_prior_that_passes_over_its_maps_many_times_reads_some_random_codes(epochs, corruption, monkeypatch):
    """Fashion-MNIST's 2.25 passes read the true codes; the small sets' 41 or 96 read a fifth at random."""
    from stage2_prior.size_presets import apply_prior_presets, preset_token_corruption
    from stage2_prior.train import TrainConfig

    monkeypatch.delenv("WORLD_SIZE", raising=False)  # one process, as a plain launch has

    assert preset_token_corruption(epochs) == corruption
    # and stage two's presets hand it on, and keep a flag as given: 1,429 maps, 44 full batches of 32, 4,219 steps
    config, choices = apply_prior_presets(TrainConfig(), 8, 8, 1429)
    assert config.token_corruption == 0.2 and any(choice.startswith("--token-corruption 0.2 (95.9 passes") for choice in choices)
    config, choices = apply_prior_presets(TrainConfig(token_corruption=0.0), 8, 8, 1429)
    assert config.token_corruption == 0.0 and not any("corruption" in choice for choice in choices)


@pytest.mark.parametrize("steps_per_pass, eval_every", [(1875, 2000), (103, 206), (45, 100), (1, 100)])
def test_a_prior_is_evaluated_about_every_two_passes_over_its_maps(steps_per_pass, eval_every):
    """Fashion-MNIST keeps the demo's 2,000 steps; the emoji (103 steps a pass) and icons (45) are evaluated
    before the prior learns them by heart, so that the best evaluation kept is near the best."""
    from stage2_prior.size_presets import preset_prior_eval_every

    assert preset_prior_eval_every(steps_per_pass) == eval_every


@pytest.mark.parametrize("images, size, steps, why", [
    (1_429, 32, 1404, "--min-steps 1404 (fewer than 10,000 train images"), (9_999, 28, 1404, "--min-steps 1404 ("),
    (1_429, 64, 936, "--min-steps 936 (at 64 pixels a step is costly"), (10_000, 32, 936, None), (60_000, 32, 936, None),
    (None, 32, 936, None),
])
def test_a_small_set_of_small_images_trains_longer(images, size, steps, why):
    chosen, reason = preset_min_steps(images, size)
    assert chosen == steps and (reason == why if why is None else reason.startswith(why))


def test_stage_one_takes_the_small_sets_floor_says_so_and_resumes_with_it(tiny_fashion, tmp_path, capsys, monkeypatch):
    from stage1_vqvae import train as stage_one
    from tests.conftest import TINY_MODEL

    monkeypatch.setattr(size_presets, "SMALL_SET_MIN_STEPS", 12)  # the tiny set's 8 steps an epoch, raised to 12
    flags = ["--run-dir", str(tmp_path / "run"), *TINY_MODEL, "--epochs", "1", "--no-dump", "--disc-start", "-1",
             "--eval-every", "100", "--checkpoint-every", "6"]
    stage_one.main(flags)
    assert "--min-steps 12 (fewer than 10,000 train images" in capsys.readouterr().out
    saved = tmp_path / "run" / "vqvae"
    assert json.loads((saved / "train_config.json").read_text())["min_steps"] == 12
    assert max(json.loads(line)["step"] for line in (saved / "log.jsonl").read_text().splitlines()) == 12
    stage_one.main([*flags, "--resume"])  # the choice made from the data is not taken for a changed flag
    capsys.readouterr()
    stage_one.main([*flags, "--overwrite", "--min-steps", "9"])
    assert "a small set is still improving" not in capsys.readouterr().out  # a flag given is not explained
    assert json.loads((saved / "train_config.json").read_text())["min_steps"] == 9


@pytest.mark.parametrize("images, steps", [(1_429, 100), (9_999, 100), (10_000, 200), (60_000, 200), (None, 200)])
def test_a_large_set_warms_the_learning_rate_up_for_longer(images, steps):
    chosen, why = preset_lr_warmup_steps(images)
    assert chosen == steps and why.startswith(f"--lr-warmup-steps {steps} (")


def test_stage_one_chooses_its_warm_up_from_the_data_records_it_and_resumes_with_it(tiny_fashion, tmp_path, capsys):
    from stage1_vqvae import train as stage_one
    from tests.conftest import TINY_MODEL

    at = TINY_MODEL.index("--lr-warmup-steps")
    flags = ["--run-dir", str(tmp_path / "run"), *TINY_MODEL[:at], *TINY_MODEL[at + 2:], "--max-steps", "4", "--no-dump",
             "--disc-start", "-1", "--eval-every", "100", "--checkpoint-every", "2"]
    stage_one.main(flags)
    assert "--lr-warmup-steps 100 (fewer than 10,000 train images)" in capsys.readouterr().out
    saved = tmp_path / "run" / "vqvae"
    assert json.loads((saved / "train_config.json").read_text())["lr_warmup_steps"] == 100
    shutil.rmtree(saved / "checkpoints" / "step_0000004")
    stage_one.main([*flags, "--resume"])  # the choice made from the data is not taken for a changed flag
    with pytest.raises(UserError, match=r"--lr-warmup-steps 200 \(was 100\)"):
        stage_one.main([*flags, "--resume", "--lr-warmup-steps", "200"])
