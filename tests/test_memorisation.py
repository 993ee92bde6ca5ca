"""Near-copies and the nearest-train ratio, and the judge of images without classes."""

import json

import pytest
import torch

from foundation.judge import ORIENTATIONS, orient
from foundation.memorisation import memorisation, nearest_distances
from tests.conftest import TINY_MODEL, reset_accelerate_state


def test_nearest_distances_are_the_brute_force_minimum_in_chunks():
    torch.manual_seed(0)
    queries, references = torch.randn(37, 5), torch.randn(53, 5)
    expected = torch.cdist(queries, references).min(1).values
    assert torch.allclose(nearest_distances(queries, references, chunk=8), expected, atol=1e-5)


def test_copies_read_as_copies_new_draws_as_unseen_images_and_noise_as_blends():
    torch.manual_seed(0)
    train, test = torch.randn(400, 8), torch.randn(200, 8)
    copies = memorisation(train[:100] + 1e-4, test, train)
    assert copies["near_copy_share"] == 1.0 and copies["nearest_train_ratio"] < 0.01
    fresh = memorisation(torch.randn(300, 8), test, train)  # drawn as the test images were
    assert fresh["near_copy_share"] < 0.12 and 0.85 < fresh["nearest_train_ratio"] < 1.15
    blends = memorisation(3 * torch.randn(300, 8), test, train)  # off the data
    assert blends["near_copy_share"] == 0 and blends["nearest_train_ratio"] > 1.5


def test_the_orientations_are_the_eight_turns_and_mirrors_of_the_square():
    image = torch.arange(16.0).view(1, 1, 4, 4)
    turned = [orient(image, torch.tensor([k])) for k in range(ORIENTATIONS)]
    assert len({tuple(t.flatten().tolist()) for t in turned}) == ORIENTATIONS  # all different
    assert torch.equal(turned[0], image) and torch.equal(turned[4], image.flip(-1))
    assert torch.equal(turned[1], image.rot90(1, (-2, -1)))
    batch = torch.cat([image, image + 1])
    assert torch.equal(orient(batch, torch.tensor([2, 0]))[1], batch[1])  # each image its own orientation


def test_an_unlabelled_folder_gets_a_judge_of_orientations_and_every_sample_figure(tmp_path, monkeypatch):
    from pipelines import evaluate
    from stage1_vqvae import train as stage_one
    from stage2_prior import train as stage_two
    from tests.conftest import synthetic_images
    from tests.test_stage2_training import TINY_PRIOR

    from PIL import Image

    folder = tmp_path / "flat"
    folder.mkdir()
    images, _ = synthetic_images(60, 20, 0)
    for i, array in enumerate(images):
        Image.fromarray(array).save(folder / f"{i}.png")
    run = tmp_path / "run"
    stage_one.main(["--run-dir", str(run), "--dataset", str(folder), "--test-fraction", "0.3", *TINY_MODEL, "--max-steps", "4"])
    reset_accelerate_state()
    stage_two.main(["--run-dir", str(run), *TINY_PRIOR, "--max-steps", "4"])
    reset_accelerate_state()
    evaluate.main(["--run-dir", str(run), "--n", "12", "--classifier-epochs", "1", "--batch-size", "8"])
    samples = json.loads((run / "metrics.json").read_text())["samples"]
    judge = json.loads((run / "eval_classifier" / "config.json").read_text())
    assert judge["num_classes"] == ORIENTATIONS and judge["trained_on"]["task"] == "orientation"
    assert isinstance(samples["fd"], float) and samples["fd_ratio"] == pytest.approx(samples["fd"] / samples["fd_floor"])
    assert "classifier_accuracy" not in samples and "orientations" in samples["features"]
    for space in ("features", "pixels"):
        figures = samples["memorisation"][space]
        assert 0 <= figures["near_copy_share"] <= 1 and figures["nearest_train_ratio"] > 0
    assert samples["memorisation"]["train_images"] == 42 and samples["n"] == 12
    # a larger set is compared with a seeded sample of its train images, not all of them
    monkeypatch.setattr(evaluate, "MEMORISATION_TRAIN_IMAGES", 20)
    evaluate.main(["--run-dir", str(run), "--n", "12", "--classifier-epochs", "1", "--batch-size", "8"])
    assert json.loads((run / "metrics.json").read_text())["samples"]["memorisation"]["train_images"] == 20
