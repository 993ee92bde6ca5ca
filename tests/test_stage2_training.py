import json
import re
import shutil

import pytest
import torch

from foundation.errors import UserError
from stage1_vqvae import train as stage_one
from stage1_vqvae.codes import read_metadata
from stage1_vqvae.model import load_vqvae
from stage2_prior import train as stage_two
from stage2_prior.priors import load_prior
from stage2_prior.quality import best_guidance
from tests.conftest import TINY_MODEL, reset_accelerate_state

TINY_PRIOR = ["--width", "32", "--layers", "2", "--heads", "2",
              "--batch-size", "16", "--lr-warmup-steps", "2", "--grid-samples", "4", "--guidance-scales", ""]
TINY_PIXELCNN = ["--prior", "pixelcnn", "--pixelcnn-channels", "16", "--pixelcnn-layers", "4", *TINY_PRIOR[6:]]


@pytest.fixture(scope="module")
def stage_one_run(tmp_path_factory, tiny_fashion_dir):
    run_dir = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VQ_DATA_DIR", str(tiny_fashion_dir))
        stage_one.main(["--run-dir", str(run_dir), *TINY_MODEL, "--max-steps", "20", "--map-transforms", "none"])
    reset_accelerate_state()
    return run_dir


def copy_run(stage_one_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(stage_one_run, run_dir)
    return run_dir


@pytest.mark.parametrize("prior", ["transformer", "pixelcnn"])
def test_each_prior_trains_and_saves_the_best_weights_and_sample_grids(stage_one_run, tmp_path, prior, capsys):
    run_dir = copy_run(stage_one_run, tmp_path)
    tiny = TINY_PIXELCNN if prior == "pixelcnn" else TINY_PRIOR
    stage_two.main(["--run-dir", str(run_dir), *tiny, "--max-steps", "30", "--eval-every", "15", "--log-every", "5"])
    said = capsys.readouterr()
    assert ("left for steps 26-30" in said.out + said.err
            and "--max-steps 15 halves it; sooner if the test NLL stops improving (--patience)" in said.out + said.err)
    loaded = load_prior(run_dir / "prior")
    assert loaded.prior == prior and loaded.num_classes == 10 and loaded.codebook_size == 16
    assert json.loads((run_dir / "prior" / "config.json").read_text())["codes_source"] == read_metadata(run_dir / "codes").vqvae_sha256
    log = [json.loads(line) for line in (run_dir / "prior" / "log.jsonl").read_text().splitlines()]
    nll = [row["train/nll_bits_per_code"] for row in log if "train/nll_bits_per_code" in row]
    assert nll[-1] < nll[0]
    tests = [row for row in log if "test/nll_bits_per_code" in row]
    assert len(tests) == 2 and all(row["test/prior_bits_per_dim"] > 0 for row in tests)
    assert sorted(p.name for p in (run_dir / "prior" / "samples").iterdir()) == ["step_0000015.png", "step_0000030.png"]
    if prior == "transformer":  # its inputs carry the VQ-VAE's codebook, standardised
        codebook = load_vqvae(run_dir).quantizer.codebook.detach()
        assert torch.allclose(loaded.code_vectors, (codebook - codebook.mean(0)) / codebook.std(0), atol=1e-5)


def test_stage_two_chooses_its_batch_from_the_maps_and_a_flag_overrides_it(stage_one_run, tmp_path, capsys):
    run_dir = copy_run(stage_one_run, tmp_path)
    without_batch = list(TINY_PRIOR)
    at = without_batch.index("--batch-size")
    del without_batch[at:at + 2]  # the flag and its value
    stage_two.main(["--run-dir", str(run_dir), *without_batch, "--max-steps", "1"])
    assert "of 32 maps; chosen for these maps: --batch-size 32 (maps of 8x8 codes" in capsys.readouterr().out
    assert json.loads((run_dir / "prior" / "train_config.json").read_text())["batch_size"] == 32
    stage_two.main(["--run-dir", str(run_dir), *without_batch, "--max-steps", "1", "--overwrite", "--batch-size", "4"])
    out = capsys.readouterr().out
    assert "of 4 maps" in out and "--batch-size" not in out
    with pytest.raises(UserError, match=r"--batch-size 0 must be at least 1 \(leave it out for the map size's default\)"):
        stage_two.main(["--run-dir", str(run_dir), *without_batch, "--max-steps", "1", "--overwrite", "--batch-size", "0"])
    assert (run_dir / "prior" / "model.safetensors").exists()  # the refused run wrote nothing over the last one



def test_stage_two_chooses_dropout_from_its_passes_over_the_maps_and_a_flag_overrides_it(stage_one_run, tmp_path, capsys):
    """64 train maps, 16 a step: 60 steps pass over them 15 times, enough for a prior to learn them by heart."""
    run_dir = copy_run(stage_one_run, tmp_path)
    stage_two.main(["--run-dir", str(run_dir), *TINY_PRIOR, "--max-steps", "60", "--eval-every", "60"])
    assert "--dropout 0.1 (15 passes over the same maps" in capsys.readouterr().out
    assert json.loads((run_dir / "prior" / "train_config.json").read_text())["dropout"] == 0.1
    assert load_prior(run_dir / "prior").dropout.p == 0.1
    stage_two.main(["--run-dir", str(run_dir), *TINY_PRIOR, "--max-steps", "8", "--overwrite"])
    out = capsys.readouterr().out
    assert "chosen for these maps: --eval-every 100 (about every 2 passes" in out
    assert "--dropout 0 (2 passes over the maps: too few" in out
    with pytest.raises(UserError, match=r"--eval-every 0 must be at least 1 \(leave it out"):
        stage_two.main(["--run-dir", str(run_dir), *TINY_PRIOR, "--max-steps", "8", "--overwrite", "--eval-every", "0"])
    stage_two.main(["--run-dir", str(run_dir), *TINY_PRIOR, "--max-steps", "40", "--eval-every", "40", "--overwrite", "--dropout", "0"])
    assert "--dropout" not in capsys.readouterr().out
    assert json.loads((run_dir / "prior" / "train_config.json").read_text())["dropout"] == 0.0
    stage_two.main(["--run-dir", str(run_dir), *TINY_PIXELCNN, "--max-steps", "40", "--eval-every", "40", "--overwrite"])
    assert "--dropout" not in capsys.readouterr().out  # a PixelCNN has none, and is not refused for the preset


def test_stage_two_trains_from_memory_mapped_maps_exactly_as_from_maps_in_memory(stage_one_run, tmp_path, monkeypatch):
    """Maps over the in-memory budget are read from Arrow a batch at a time: the same batches,
    so the same weights, bit for bit."""
    from safetensors.torch import load_file

    from stage1_vqvae import codes

    weights, default_budget = {}, codes.IN_MEMORY_MAX_BYTES
    for budget in (default_budget, 0):
        monkeypatch.setattr(codes, "IN_MEMORY_MAX_BYTES", budget)
        opened = []
        monkeypatch.setattr(stage_two, "open_codes", lambda *args, _open=codes.open_codes, **kwargs: opened.append(_open(*args, **kwargs)) or opened[-1])
        run_dir = copy_run(stage_one_run, tmp_path / str(budget))
        stage_two.main(["--run-dir", str(run_dir), *TINY_PRIOR, "--max-steps", "6", "--eval-every", "6"])
        reset_accelerate_state()
        assert all(split.in_memory == (budget > 0) for split in opened)
        weights[budget] = load_file(run_dir / "prior" / "model.safetensors")
    assert default_budget > 0 and weights[0].keys() == weights[default_budget].keys()
    assert all(torch.equal(weights[0][name], weights[default_budget][name]) for name in weights[0])


def test_unconditional_flag_ignores_labels(stage_one_run, tmp_path):
    run_dir = copy_run(stage_one_run, tmp_path)
    stage_two.main(["--run-dir", str(run_dir), "--unconditional", *TINY_PRIOR, "--max-steps", "2"])
    assert load_prior(run_dir / "prior").num_classes == 0
    from pipelines import evaluate

    with pytest.raises(UserError, match="--guidance 1,2 does nothing for an unconditional prior"):
        evaluate.main(["--run-dir", str(run_dir), "--guidance", "1,2"])
    assert not (run_dir / "metrics.json").exists()


def test_missing_maps_name_the_command_that_makes_them(stage_one_run, tmp_path):
    run_dir = copy_run(stage_one_run, tmp_path)
    shutil.rmtree(run_dir / "codes")
    with pytest.raises(UserError, match=r"no code maps in .*codes; .*stage1_vqvae/train.py.*dump_codes"):
        stage_two.main(["--run-dir", str(run_dir), *TINY_PRIOR])


def test_missing_vqvae_names_the_command_that_makes_it(tmp_path):
    with pytest.raises(UserError, match=r"no VQ-VAE in .*; train one with `accelerate launch stage1_vqvae/train.py"):
        stage_two.main(["--run-dir", str(tmp_path / "empty"), *TINY_PRIOR])


def test_maps_with_another_codebook_size_are_refused_naming_both_numbers(stage_one_run, tmp_path):
    run_dir = copy_run(stage_one_run, tmp_path)
    path = run_dir / "codes" / "metadata.json"
    metadata = json.loads(path.read_text())
    metadata["codebook_size"] = 512
    path.write_text(json.dumps(metadata))
    with pytest.raises(UserError, match=r"codebook size 512 but the VQ-VAE has 16; re-encode them with `python -m stage1_vqvae.dump_codes"):
        stage_two.main(["--run-dir", str(run_dir), *TINY_PRIOR])


def test_maps_from_other_weights_are_refused(stage_one_run, tmp_path):
    run_dir = copy_run(stage_one_run, tmp_path)
    from safetensors.torch import load_file, save_file

    weights = load_file(run_dir / "vqvae" / "model.safetensors")
    weights["decoder.0.bias"] += 1.0
    save_file(weights, run_dir / "vqvae" / "model.safetensors")
    with pytest.raises(UserError, match="came from VQ-VAE weights .* not from the VQ-VAE beside them"):
        stage_two.main(["--run-dir", str(run_dir), *TINY_PRIOR])


@pytest.mark.parametrize("accumulation", ["1", "2"])
def test_resume_of_stage_two_matches_an_uninterrupted_run(stage_one_run, tmp_path, accumulation):
    """Killed after step 5, mid-epoch (4 or 2 steps per epoch), and resumed there."""
    flags = [*TINY_PRIOR, "--max-steps", "9", "--checkpoint-every", "5", "--eval-every", "100",
             "--gradient-accumulation-steps", accumulation]
    straight, resumed = copy_run(stage_one_run, tmp_path / "a"), copy_run(stage_one_run, tmp_path / "b")
    stage_two.main(["--run-dir", str(straight), *flags])
    stage_two.main(["--run-dir", str(resumed), *flags])
    shutil.rmtree(resumed / "prior" / "checkpoints" / "step_0000009")
    stage_two.main(["--run-dir", str(resumed), *flags, "--resume"])
    a = load_prior(straight / "prior" / "final").state_dict()
    b = load_prior(resumed / "prior" / "final").state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)


def scripted_test_nll(monkeypatch, values):
    """Stage two's evaluations read these test NLLs in turn, so that when it stops is known."""
    scores = iter(values)
    monkeypatch.setattr(stage_two, "test_nll", lambda *args, **kwargs: next(scores))


def test_stage_two_stops_once_the_test_nll_has_not_improved_for_patience_evaluations(stage_one_run, tmp_path, monkeypatch, capsys):
    """Best at the second evaluation (step 4), then three worse: it stops at step 10 of 40 and
    keeps the prior of step 4; resumed, it stays stopped."""
    run_dir = copy_run(stage_one_run, tmp_path)
    flags = [*TINY_PRIOR, "--max-steps", "40", "--eval-every", "2", "--checkpoint-every", "100", "--patience", "3"]
    scripted_test_nll(monkeypatch, [3.0, 2.5, 2.6, 2.7, 2.8])
    stage_two.main(["--run-dir", str(run_dir), *flags])
    out = capsys.readouterr().out
    assert "stage two stops at step 10 of 40: the test NLL has not improved for 3 evaluations" in out
    assert "best test nll 2.5000 bits/code (stopped at step 10 of 40:" in out
    assert [p.name for p in (run_dir / "prior" / "checkpoints").iterdir()] == ["step_0000010"]
    assert sorted(p.name for p in (run_dir / "prior" / "samples").iterdir())[-1] == "step_0000010.png"
    stage_two.main(["--run-dir", str(run_dir), *flags, "--resume"])  # no evaluation left to read: it must not train
    assert [p.name for p in (run_dir / "prior" / "checkpoints").iterdir()] == ["step_0000010"]


def test_a_stopped_stage_two_resumed_with_more_patience_ends_as_a_run_that_never_stopped(stage_one_run, tmp_path, monkeypatch):
    nlls = [3.0, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0]
    flags = [*TINY_PRIOR, "--max-steps", "14", "--eval-every", "2", "--checkpoint-every", "100"]
    straight, resumed = copy_run(stage_one_run, tmp_path / "a"), copy_run(stage_one_run, tmp_path / "b")
    scripted_test_nll(monkeypatch, nlls)
    stage_two.main(["--run-dir", str(straight), *flags, "--patience", "0"])
    scripted_test_nll(monkeypatch, nlls)
    stage_two.main(["--run-dir", str(resumed), *flags, "--patience", "3"])
    assert [p.name for p in (resumed / "prior" / "checkpoints").iterdir()] == ["step_0000010"]
    scripted_test_nll(monkeypatch, nlls[5:])
    stage_two.main(["--run-dir", str(resumed), *flags, "--patience", "0", "--resume"])
    a = load_prior(straight / "prior" / "final").state_dict()
    b = load_prior(resumed / "prior" / "final").state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_negative_patience_is_refused_in_one_sentence(tmp_path):
    with pytest.raises(UserError, match="--patience -1 must not be negative"):
        stage_two.main(["--run-dir", str(tmp_path), "--patience", "-1"])


@pytest.mark.parametrize("flag,attribute", [("label-every-code", "label_every_code"), ("codebook-inputs", "code_vector_dim")])
def test_resuming_a_run_from_before_a_new_default_names_the_flag(stage_one_run, tmp_path, flag, attribute):
    """Its train_config.json lacks the flag: it trained without, so --resume must say so
    rather than fail on weights the new default would expect."""
    run_dir = copy_run(stage_one_run, tmp_path)
    flags = [*TINY_PRIOR, "--max-steps", "4", "--checkpoint-every", "2", "--eval-every", "100"]
    stage_two.main(["--run-dir", str(run_dir), *flags, f"--no-{flag}"])
    saved = run_dir / "prior" / "train_config.json"
    config = json.loads(saved.read_text())
    del config[flag.replace("-", "_")]
    saved.write_text(json.dumps(config))
    shutil.rmtree(run_dir / "prior" / "checkpoints" / "step_0000004")
    with pytest.raises(UserError, match=rf"other flags than it was trained with: --{flag} True \(was False\)"):
        stage_two.main(["--run-dir", str(run_dir), *flags, "--resume"])
    stage_two.main(["--run-dir", str(run_dir), *flags, "--resume", f"--no-{flag}"])
    assert not getattr(load_prior(run_dir / "prior" / "final"), attribute)


def test_the_final_evaluation_stores_the_guidance_scale_the_sweep_chose(stage_one_run, tiny_fashion, tmp_path, capsys):
    """The scale stored is the one the sweep's rule (unit-tested in test_pipeline) picks from the rows it logged."""
    run_dir = copy_run(stage_one_run, tmp_path)
    stage_two.main(["--run-dir", str(run_dir), *TINY_PRIOR, "--max-steps", "4", "--guidance-scales", "1,3", "--guidance-samples", "12"])
    log = [json.loads(line) for line in (run_dir / "prior" / "log.jsonl").read_text().splitlines()]
    rows = [row for row in log if "guidance/guidance" in row]
    assert [row["guidance/guidance"] for row in rows] == [1.0, 3.0]
    best = best_guidance([{key.removeprefix("guidance/"): value for key, value in row.items()} for row in rows])
    assert json.loads((run_dir / "prior" / "config.json").read_text())["default_guidance"] == best
    assert load_prior(run_dir / "prior").default_guidance == best
    assert f"guidance {best:g} became the default" in capsys.readouterr().out
    assert (run_dir / "eval_classifier" / "model.safetensors").exists()  # the judge, cached for evaluate


def test_bad_guidance_scales_are_one_sentence(stage_one_run, tmp_path):
    with pytest.raises(UserError, match="--guidance-scales '1,x' is not a comma-separated list of numbers"):
        stage_two.main(["--run-dir", str(tmp_path), *TINY_PRIOR, "--guidance-scales", "1,x"])


def test_without_its_images_the_sweep_is_skipped_and_the_prior_kept(stage_one_run, tmp_path, monkeypatch, capsys):
    run_dir = copy_run(stage_one_run, tmp_path)
    monkeypatch.setenv("VQ_DATA_DIR", str(tmp_path / "moved"))
    monkeypatch.setattr("foundation.data.DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "moved"))
    monkeypatch.setattr("foundation.data._load_hub", lambda *a, **k: (_ for _ in ()).throw(UserError("Fashion-MNIST is gone")))
    stage_two.main(["--run-dir", str(run_dir), *TINY_PRIOR, "--max-steps", "2", "--guidance-scales", "1,2"])
    assert "guidance not measured: Fashion-MNIST is gone" in capsys.readouterr().out
    assert load_prior(run_dir / "prior").default_guidance == 1.0


def test_flags_of_the_other_prior_are_refused_in_one_sentence(tmp_path):
    with pytest.raises(UserError, match="--pixelcnn-channels 64 only apply to --prior pixelcnn, not transformer; drop it"):
        stage_two.main(["--run-dir", str(tmp_path), "--pixelcnn-channels", "64"])
    with pytest.raises(UserError, match="--width 64, --heads 4 only apply to --prior transformer, not pixelcnn; drop them"):
        stage_two.main(["--run-dir", str(tmp_path), "--prior", "pixelcnn", "--width", "64", "--heads", "4"])
    assert not any(tmp_path.iterdir())


def test_a_pixelcnn_too_shallow_for_the_maps_is_refused_in_one_sentence(stage_one_run, tmp_path):
    run_dir = copy_run(stage_one_run, tmp_path / "run")
    with pytest.raises(UserError, match=r"^--pixelcnn-channels 16 --pixelcnn-layers 2 --kernel-size 3: 2 layers of kernel 3 see 2 codes .* 8x8 map needs; use at least 7 layers"):
        stage_two.main(["--run-dir", str(run_dir), *TINY_PIXELCNN[:4], "--pixelcnn-layers", "2", "--kernel-size", "3", *TINY_PRIOR[6:]])
    assert not (run_dir / "prior").exists()


def test_a_width_that_the_heads_do_not_divide_is_refused_in_one_sentence(stage_one_run, tmp_path):
    run_dir = copy_run(stage_one_run, tmp_path / "run")
    with pytest.raises(UserError, match=r"^--width 100 --layers 2 --heads 3: width 100 must be a multiple of heads 3$"):
        stage_two.main(["--run-dir", str(run_dir), "--width", "100", "--layers", "2", "--heads", "3", *TINY_PRIOR[6:]])


def test_an_even_pixelcnn_kernel_is_refused_in_one_sentence():
    config = stage_two.TrainConfig(prior="pixelcnn", kernel_size=4)
    with pytest.raises(UserError, match=r"^--pixelcnn-channels 128 --pixelcnn-layers 8 --kernel-size 4: kernel_size 4 must be odd, e.g. 5$"):
        stage_two.build_prior(config, 16, (8, 8), None, "")


def test_a_run_saved_under_a_renamed_flag_resumes_under_the_new_name():
    from foundation.training import changed_flags

    config = stage_two.TrainConfig(prior="pixelcnn", pixelcnn_channels=128)
    saved = {"prior": "pixelcnn", "label_every_code": True, "codebook_inputs": True}
    assert changed_flags({**saved, "channels": 128}, config) == {}
    assert changed_flags({**saved, "channels": 64}, config) == {"pixelcnn_channels": (64, 128)}
    assert changed_flags({**saved, "steps": 8}, config) == {"passes": (8, None)}
    assert changed_flags({**saved, "warmup_steps": 100}, config) == {}  # the loop's own renamed flag, on either stage
    assert changed_flags({**saved, "warmup_steps": 50}, config) == {"lr_warmup_steps": (50, 100)}


def test_a_judge_that_cannot_tell_the_classes_apart_chooses_no_guidance(stage_one_run, tmp_path, capsys):
    """A judge no better than chance would rank the scales at random: the sweep is skipped, saying why."""
    from foundation.data import data_config_of_run, load_image_data
    from foundation.judge import JUDGE_DIR, FeatureClassifier, judge_key

    run_dir = copy_run(stage_one_run, tmp_path)
    data = load_image_data(data_config_of_run(run_dir))
    blind = FeatureClassifier(in_channels=data.channels, num_classes=data.num_classes, source=data.source,
                              trained_on=judge_key(data, 3))
    with torch.no_grad():  # it answers class 0 whatever it sees
        blind.head.weight.zero_()
        blind.head.bias.copy_(torch.arange(data.num_classes, 0, -1).float())
    blind.save_pretrained(run_dir / JUDGE_DIR)
    stage_two.main(["--run-dir", str(run_dir), *TINY_PRIOR, "--max-steps", "2", "--guidance-scales", "1,3", "--guidance-samples", "12"])
    assert re.search(r"guidance not measured: the judge recognises only \d+% of the real test images \(\d+ classes, chance \d+%\)",
                     capsys.readouterr().out)
    assert load_prior(run_dir / "prior").default_guidance == 1.0
