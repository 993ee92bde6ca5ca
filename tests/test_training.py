import json
import os
import re
import shutil
import subprocess

import datasets
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from foundation.data import DataConfig, load_image_data
from foundation.errors import UserError
from stage1_vqvae import train
from stage1_vqvae.codes import read_codes
from stage1_vqvae.model import VQVAE
from tests.conftest import REPO, TINY_MODEL, accelerate_command, cpu_env, reset_accelerate_state, write_image_folder


def run_stage_one(run_dir, *extra):
    train.main(["--run-dir", str(run_dir), *TINY_MODEL, *extra])


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "vqvae" / "log.jsonl").read_text().splitlines()]


def test_a_tiny_run_lowers_the_loss_and_writes_its_artifacts(tiny_fashion, tmp_path):
    run_stage_one(tmp_path, "--max-steps", "150", "--log-every", "5", "--eval-every", "75", "--lr", "3e-3")
    train_loss = [row["train/pixel_loss"] for row in read_log(tmp_path) if "train/pixel_loss" in row]
    assert sum(train_loss[-3:]) / 3 < 0.6 * train_loss[0], train_loss
    for name in ("config.json", "model.safetensors", "train_config.json", "final/model.safetensors"):
        assert (tmp_path / "vqvae" / name).exists(), name
    assert sorted(p.name for p in (tmp_path / "vqvae" / "reconstructions").iterdir()) == [
        "step_0000075.png", "step_0000150.png"]
    assert (tmp_path / "codes" / "metadata.json").exists()


@pytest.mark.parametrize("extra", [[], ["--gradient-accumulation-steps", "2", "--disc-start", "4", "--disc-channels", "8"],
                                   ["--architecture", "resnet", "--image-size", "64", "--disc-start", "4", "--disc-channels", "8"]],
                         ids=["plain", "accumulation-and-discriminator", "resnet-at-64"])
def test_resumed_run_ends_with_exactly_the_weights_of_an_uninterrupted_run(tiny_fashion, tmp_path, extra):
    """Killed after step 10, mid-epoch (8 or 4 steps per epoch), and resumed there."""
    flags = ["--max-steps", "12", "--checkpoint-every", "5", "--eval-every", "100", "--no-dump", "--log-every", "2", *extra]
    run_stage_one(tmp_path / "straight", *flags)
    run_stage_one(tmp_path / "resumed", *flags)
    checkpoints = tmp_path / "resumed" / "vqvae" / "checkpoints"
    # Forget everything after step 10, as if the run had been killed there.
    shutil.rmtree(checkpoints / "step_0000012")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_0000010"]
    with open(tmp_path / "resumed" / "vqvae" / "log.jsonl", "a") as log:
        log.write('{"step": 12, "time": 17.5, "train/pixel_lo')  # the kill came mid-line
    run_stage_one(tmp_path / "resumed", *flags, "--resume")
    straight = load_file(tmp_path / "straight" / "vqvae" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "vqvae" / "final" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    # the log holds each step once, as the uninterrupted run's does
    assert [row["step"] for row in read_log(tmp_path / "resumed")] == [row["step"] for row in read_log(tmp_path / "straight")]


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_loadable(tiny_fashion, tmp_path, monkeypatch, capsys):
    flags = ["--max-steps", "6", "--checkpoint-every", "3", "--eval-every", "100", "--no-dump"]
    real_save_state = Accelerator.save_state
    calls = []

    def save_state_then_die(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:  # the second checkpoint: write part of it, then "get killed"
            os.makedirs(output_dir, exist_ok=True)
            with open(f"{output_dir}/model.safetensors", "wb") as half_written:
                half_written.write(b"\0" * 10)
            raise KeyboardInterrupt
        return real_save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_stage_one(tmp_path, *flags)
    monkeypatch.setattr(Accelerator, "save_state", real_save_state)
    checkpoints = tmp_path / "vqvae" / "checkpoints"
    assert (checkpoints / "step_0000003").exists() and (checkpoints / ".tmp-step_0000006").exists()
    run_stage_one(tmp_path, *flags, "--resume")
    assert "Resuming stage one from step 3" in capsys.readouterr().out
    assert (checkpoints / "step_0000006").exists()
    assert not list(checkpoints.glob(".tmp-*"))  # the unfinished write was cleaned up


def test_keeping_no_checkpoint_is_refused_in_one_sentence(tmp_path):
    with pytest.raises(UserError, match="--keep-checkpoints 0 would leave nothing to --resume from; use 1 or more"):
        run_stage_one(tmp_path, "--keep-checkpoints", "0")
    assert not (tmp_path / "vqvae").exists()


def test_refuses_to_train_over_an_existing_run_or_to_resume_nothing(tiny_fashion, tmp_path):
    with pytest.raises(UserError, match="found no checkpoint"):
        run_stage_one(tmp_path, "--max-steps", "2", "--resume")
    run_stage_one(tmp_path, "--max-steps", "2", "--no-dump")
    weights = (tmp_path / "vqvae" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="--resume to continue it, --overwrite"):
        run_stage_one(tmp_path, "--max-steps", "2")
    assert (tmp_path / "vqvae" / "model.safetensors").read_bytes() == weights


def test_overwrite_removes_everything_the_stage_wrote(tiny_fashion, tmp_path):
    """Nothing of the old run is left to be mistaken for the new one: its final weights, grids,
    code maps and judge go; another run's prior beside it stays."""
    run_stage_one(tmp_path, "--max-steps", "2")
    for stale in ("vqvae/final/stale.txt", "vqvae/reconstructions/step_9999999.png", "codes/stale.txt",
                  "eval_classifier/config.json", "prior/keep.txt"):
        (tmp_path / stale).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / stale).write_text("old")
    run_stage_one(tmp_path, "--max-steps", "2", "--no-dump", "--overwrite")
    assert not any((tmp_path / stale).exists() for stale in (
        "vqvae/final/stale.txt", "vqvae/reconstructions/step_9999999.png", "codes", "eval_classifier"))
    assert (tmp_path / "vqvae" / "model.safetensors").exists() and (tmp_path / "prior" / "keep.txt").exists()


def test_decoding_the_stored_codes_equals_the_models_reconstruction(tiny_fashion, tmp_path):
    run_stage_one(tmp_path, "--max-steps", "4")
    model = VQVAE.from_pretrained(str(tmp_path / "vqvae")).eval()
    data = load_image_data(DataConfig())
    images = data.test.images.float() / 255
    stored = read_codes(tmp_path / "codes", "test", vqvae=model)
    assert stored.codes.dtype == torch.int64 and stored.codes.shape == (37, 8, 8)
    assert torch.equal(stored.labels, data.test.labels)
    assert stored.metadata.class_names[0] == "T-shirt/top"
    assert torch.equal(model.decode(stored.codes), model.decode(model.encode(images)))


def test_two_process_training_with_the_discriminator_and_dump_write_every_image_exactly_once(tiny_fashion, tmp_path):
    command = accelerate_command(2) + [
        str(REPO / "stage1_vqvae" / "train.py"), "--run-dir", str(tmp_path), *TINY_MODEL, "--map-transforms", "rot90",
        "--max-steps", "4", "--batch-size", "5", "--disc-start", "2", "--disc-channels", "8", "--log-every", "1",
    ]
    completed = subprocess.run(command, env=cpu_env(VQ_DATA_DIR=str(tiny_fashion)), capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert any("train/disc_loss" in row for row in read_log(tmp_path))
    model = VQVAE.from_pretrained(str(tmp_path / "vqvae")).eval()
    data = load_image_data(DataConfig())
    for split, dataset in (("train", data.train), ("test", data.test)):
        stored = read_codes(tmp_path / "codes", split, vqvae=model)
        images = dataset.images.float() / 255
        if split == "train":  # each image as it is and a quarter turned, each once
            assert len(stored.codes) == 2 * len(dataset) and torch.equal(stored.transforms.bincount(), torch.tensor([64, 64]))
            turned = stored.transforms == 1
            assert torch.equal(stored.codes[turned], model.encode(images.rot90(1, (-2, -1))))
            assert torch.equal(stored.labels[turned], dataset.labels)
            stored = read_codes(tmp_path / "codes", split, vqvae=model, transforms=False)
        assert len(stored.codes) == len(dataset)  # 64 and 37: none lost, none repeated
        assert torch.equal(stored.codes, model.encode(images))
        assert torch.equal(stored.labels, dataset.labels)


def test_the_dump_writes_batch_by_batch_and_two_processes_write_every_map_once_in_order(tiny_fashion, tmp_path, monkeypatch):
    """No process holds a split's maps: each batch goes to its shard as it is encoded. On two
    processes, many batches each, the joined maps are the splits' own, in order."""
    from stage1_vqvae import codes, dump_codes

    run_stage_one(tmp_path, "--max-steps", "2", "--no-dump", "--map-transforms", "none")
    written = []
    write = codes.ShardWriter.write
    monkeypatch.setattr(codes.ShardWriter, "write", lambda self, maps, labels, transform=0: written.append(len(maps)) or write(self, maps, labels))
    dump_codes.main(["--run-dir", str(tmp_path), "--batch-size", "5"])
    assert written == [5] * 12 + [4] + [5] * 7 + [2]  # 64 train and 37 test images, in batches of 5
    reset_accelerate_state()
    shutil.rmtree(tmp_path / "codes")
    command = accelerate_command(2) + ["-m", "stage1_vqvae.dump_codes", "--run-dir", str(tmp_path), "--batch-size", "5"]
    completed = subprocess.run(command, env=cpu_env(VQ_DATA_DIR=str(tiny_fashion)), capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert not (tmp_path / "codes.shards").exists()
    model = VQVAE.from_pretrained(str(tmp_path / "vqvae")).eval()
    data = load_image_data(DataConfig())
    for split, dataset in (("train", data.train), ("test", data.test)):
        stored = read_codes(tmp_path / "codes", split, vqvae=model)
        assert torch.equal(stored.codes, model.encode(dataset.images.float() / 255))
        assert torch.equal(stored.labels, dataset.labels)


def test_a_data_set_smaller_than_a_batch_per_process_still_trains_on_two_processes(tiny_fashion, tmp_path):
    """64 images in batches of 40 are one full batch: dropping the rest left both processes none."""
    command = accelerate_command(2) + [
        str(REPO / "stage1_vqvae" / "train.py"), "--run-dir", str(tmp_path), *TINY_MODEL,
        "--max-steps", "2", "--batch-size", "40", "--disc-start", "-1", "--no-dump", "--log-every", "1",
    ]
    completed = subprocess.run(command, env=cpu_env(VQ_DATA_DIR=str(tiny_fashion)), capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert max(row["step"] for row in read_log(tmp_path)) == 2


def test_resuming_with_a_different_model_names_the_changed_flag(tiny_fashion, tmp_path):
    run_stage_one(tmp_path, "--max-steps", "2", "--no-dump")
    weights = (tmp_path / "vqvae" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match=r"does not fit the model these flags build \(--codebook-size 32 \(was 16\).*--overwrite"):
        run_stage_one(tmp_path, "--max-steps", "2", "--resume", "--allow-changes", "--codebook-size", "32")
    assert (tmp_path / "vqvae" / "model.safetensors").read_bytes() == weights


def test_resume_refuses_changed_flags_unless_allowed_and_keeps_a_history(tiny_fashion, tmp_path):
    run_stage_one(tmp_path, "--max-steps", "4", "--checkpoint-every", "2", "--no-dump")
    config_path = tmp_path / "vqvae" / "train_config.json"
    shutil.rmtree(tmp_path / "vqvae" / "checkpoints" / "step_0000004")  # as if killed after step 2
    before = config_path.read_text()
    for flags, named in ((["--lr", "0.003"], "--lr 0.003 (was 0.002)"), (["--batch-size", "4"], "--batch-size 4 (was 8)"),
                         (["--max-steps", "6"], "--max-steps 6 (was 4)")):
        with pytest.raises(UserError, match=rf"--resume would continue stage one with other flags than it was trained with: {re.escape(named)}; .*--allow-changes"):
            run_stage_one(tmp_path, "--max-steps", "4", "--checkpoint-every", "2", "--no-dump", "--resume", *flags)
    assert config_path.read_text() == before
    # bookkeeping flags may differ, the folder too (a run moved elsewhere); --allow-changes continues and records what changed
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "vqvae", moved / "vqvae")
    config_path = moved / "vqvae" / "train_config.json"
    run_stage_one(moved, "--max-steps", "6", "--checkpoint-every", "2", "--no-dump", "--resume", "--allow-changes", "--log-every", "1")
    config = json.loads(config_path.read_text())
    assert config["max_steps"] == 6
    assert config["resumes"] == [{"step": 2, "changed": {"max_steps": {"was": 4, "now": 6}}}]


def test_auto_mixed_precision_takes_native_bf16_only(monkeypatch):
    """A T4 or V100 reports bf16 only when emulation counts; emulated bf16 is slower than fp32."""
    from foundation.training import bf16_is_fast

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert not bf16_is_fast("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100, an H100
    assert bf16_is_fast("cuda")
    assert not bf16_is_fast("mps")


def test_a_small_data_set_gets_the_step_floor_and_the_summary_line_says_why(tiny_fashion, tmp_path, capsys):
    """64 train images in batches of 8 are 8 steps an epoch: 1 epoch would be 8 steps, the floor is 12."""
    run_stage_one(tmp_path, "--epochs", "1", "--min-steps", "12", "--no-dump", "--eval-every", "100")
    assert "12 steps (1.5 epochs: --epochs 1 would give fewer than --min-steps 12) of 8 images" in capsys.readouterr().out
    assert max(row["step"] for row in read_log(tmp_path)) == 12
    run_stage_one(tmp_path / "b", "--epochs", "2", "--min-steps", "12", "--no-dump", "--eval-every", "100")
    assert "16 steps (2 epochs) of 8 images" in capsys.readouterr().out


def test_loader_workers_decode_the_same_batches_so_the_weights_are_the_same(tmp_path):
    """Images decoded as they are read (a split over --max-memory-gb) by 2 worker processes train
    exactly what the training process decoding them itself trains."""
    from tests.conftest import write_image_folder

    folder = write_image_folder(tmp_path / "images", per_class=10)
    common = [*TINY_MODEL, "--dataset", str(folder), "--image-size", "16", "--max-memory-gb", "0", "--max-steps", "3",
              "--no-dump", "--disc-start", "-1"]
    train.main(["--run-dir", str(tmp_path / "a"), *common, "--num-workers", "0"])
    train.main(["--run-dir", str(tmp_path / "b"), *common, "--num-workers", "2"])
    a, b = (load_file(tmp_path / run / "vqvae" / "final" / "model.safetensors") for run in ("a", "b"))
    assert all(torch.equal(a[key], b[key]) for key in a)
    with pytest.raises(UserError, match="--num-workers -1 must be 0"):
        train.main(["--run-dir", str(tmp_path / "c"), *common, "--num-workers", "-1"])


def stream_flags(folder):
    return ["--dataset", str(folder), "--streaming", "--image-size", "16", "--test-fraction", "0.25", "--shuffle-buffer", "8"]


def test_a_streamed_folder_trains_resumes_exactly_and_needs_max_steps(tmp_path):
    """Epochs of a stream (15 train images, batches of 8: one step each); killed after step 4
    and resumed, the run reads the batches it had trained on again and ends with the same weights."""
    folder = write_image_folder(tmp_path / "images", per_class=10, mode="RGB")
    with pytest.raises(UserError, match=r"--streaming reads a stream whose length is unknown; give --max-steps \(e.g. 936,"):
        run_stage_one(tmp_path / "endless", *stream_flags(folder), "--num-workers", "0")
    flags = [*stream_flags(folder), "--max-steps", "6", "--checkpoint-every", "4", "--eval-every", "100", "--no-dump",
             "--num-workers", "0", "--disc-start", "3", "--disc-channels", "8"]
    run_stage_one(tmp_path / "straight", *flags)
    run_stage_one(tmp_path / "resumed", *flags)
    shutil.rmtree(tmp_path / "resumed" / "vqvae" / "checkpoints" / "step_0000006")
    run_stage_one(tmp_path / "resumed", *flags, "--resume")
    straight = load_file(tmp_path / "straight" / "vqvae" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "vqvae" / "final" / "model.safetensors")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    assert max(row.get("epoch", 0) for row in read_log(tmp_path / "straight")) == 5  # 6 passes over the stream


def test_two_processes_stream_a_folder_with_workers_and_dump_every_image_once_in_order(tmp_path):
    folder = write_image_folder(tmp_path / "images", per_class=10, mode="RGB")
    command = accelerate_command(2) + [
        str(REPO / "stage1_vqvae" / "train.py"), "--run-dir", str(tmp_path / "run"), *TINY_MODEL, *stream_flags(folder),
        "--max-steps", "3", "--batch-size", "4", "--num-workers", "1", "--log-every", "1",
    ]
    completed = subprocess.run(command, env=cpu_env(), capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    model = VQVAE.from_pretrained(str(tmp_path / "run" / "vqvae")).eval()
    data = load_image_data(DataConfig(dataset=str(folder), image_size=16, test_fraction=0.25))  # the same split, in memory
    for split, dataset in (("train", data.train), ("test", data.test)):
        stored = read_codes(tmp_path / "run" / "codes", split, vqvae=model)
        # a streamed folder's file index is shuffled once, by --data-seed (0), before it streams
        order = datasets.Dataset.from_dict({"i": list(range(len(dataset.images)))}).shuffle(seed=0)["i"]
        assert order != sorted(order)
        assert torch.equal(stored.codes, model.encode(dataset.images[order].float() / 255))
        assert torch.equal(stored.labels, dataset.labels[order])


def test_the_warm_up_lasts_the_steps_asked_for_up_to_a_quarter_of_the_run():
    from foundation.training import warmup_cosine

    def factor(warmup, total, step):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return warmup_cosine(optimizer, warmup, total).lr_lambdas[0](step)

    assert factor(200, 936, 99) == pytest.approx(0.5) and factor(200, 936, 199) == pytest.approx(1.0)  # stage one's default
    assert factor(200, 400, 99) == pytest.approx(1.0)  # a short run: a quarter of it, 100 steps
    assert factor(200, 936, 935) < 0.001  # the cosine ends near zero


def test_curves_are_drawn_at_each_evaluation_and_a_missing_tracker_is_named(tiny_fashion, tmp_path, monkeypatch):
    from foundation import training
    from PIL import Image

    run_stage_one(tmp_path, "--max-steps", "6", "--eval-every", "3", "--log-every", "1", "--no-dump", "--report-to", "none")
    curves = Image.open(tmp_path / "vqvae" / "curves.png")
    assert curves.height == 220 and curves.width >= 2 * 360  # MSE and the codebook, at least
    monkeypatch.setattr(training, "is_wandb_available", lambda: False)
    with pytest.raises(UserError, match="--report-to wandb needs the wandb package, which is not installed here"):
        run_stage_one(tmp_path / "other", "--max-steps", "2", "--report-to", "wandb")
    assert not (tmp_path / "other").exists()
