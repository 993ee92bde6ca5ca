"""Tiny data sets made on the fly, so tests need neither the network nor the real data."""

import gzip
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = [
    "--hidden-channels", "16", "--res-blocks", "1", "--res-channels", "8",
    "--codebook-size", "16", "--code-dim", "8", "--batch-size", "8", "--lr-warmup-steps", "2",
]


def synthetic_images(count: int, side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bright rectangles whose size depends on the label: simple, learnable, labelled."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=count)
    images = np.zeros((count, side, side), dtype=np.uint8)
    for image, label in zip(images, labels):
        half = 3 + 2 * int(label)
        top, left = rng.integers(0, side - half, size=2)
        image[top: top + half, left: left + half] = rng.integers(120, 256)
    return images, labels.astype(np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.tobytes())


@pytest.fixture(scope="session")
def tiny_fashion_dir(tmp_path_factory) -> Path:
    """Four IDX files in Fashion-MNIST's layout: 64 train and 37 test images of 28x28."""
    directory = tmp_path_factory.mktemp("fashion")
    for prefix, count, seed in (("train", 64, 0), ("t10k", 37, 1)):
        images, labels = synthetic_images(count, 28, seed)
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return directory


@pytest.fixture
def tiny_fashion(tiny_fashion_dir, monkeypatch) -> Path:
    monkeypatch.setenv("VQ_DATA_DIR", str(tiny_fashion_dir))
    return tiny_fashion_dir


def write_image_folder(root: Path, per_class: int = 6, mode: str = "L", side: int = 20) -> Path:
    for class_name, seed in (("circles", 0), ("squares", 1)):
        (root / class_name).mkdir(parents=True, exist_ok=True)
        images, _ = synthetic_images(per_class, side, seed)
        for i, array in enumerate(images):
            image = Image.fromarray(array)
            image.convert(mode).save(root / class_name / f"{i}.png")
    return root


def reset_accelerate_state():
    """Accelerate keeps process-wide singletons; reset them so in-process runs don't leak."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate_state()


def cpu_env(**extra) -> dict:
    """Environment for subprocesses: this interpreter's packages, CPU only."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", PYTHONPATH=str(REPO), **extra)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def accelerate_command(num_processes: int) -> list[str]:
    """`accelerate launch` giving real DDP (gloo) on a CPU, unlike `--cpu --num_processes 2`."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
    ]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_fashion_dir):
    """Both stages, a few steps each, on the tiny Fashion-MNIST look-alike (shared: copy it before changing it)."""
    from stage1_vqvae import train as stage_one
    from stage2_prior import train as stage_two
    from tests.test_stage2_training import TINY_PRIOR

    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VQ_DATA_DIR", str(tiny_fashion_dir))
        stage_one.main(["--run-dir", str(run_dir), *TINY_MODEL, "--max-steps", "10"])
        reset_accelerate_state()
        stage_two.main(["--run-dir", str(run_dir), *TINY_PRIOR, "--max-steps", "6"])
        reset_accelerate_state()
    return run_dir
