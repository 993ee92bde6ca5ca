from types import SimpleNamespace

import pytest
import torch

from foundation.judge import features_and_predictions, load_or_train_judge


def tiny_labelled_data():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 16, 16), dtype=torch.uint8, generator=generator)
    train = SimpleNamespace(images=images, labels=torch.arange(64) % 4)
    return SimpleNamespace(channels=1, num_classes=4, source="synthetic", train=train, image_size=16, class_names=list("abcd"))


def test_the_judge_is_the_same_whatever_ran_before_and_is_cached(tmp_path):
    """A fixed yardstick: two runs that consumed random numbers differently get the same judge."""
    data = tiny_labelled_data()
    torch.manual_seed(1)
    first = load_or_train_judge(tmp_path / "a", data, "cpu", epochs=1)
    torch.manual_seed(2)
    torch.rand(100)
    second = load_or_train_judge(tmp_path / "b", data, "cpu", epochs=1)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    cached = load_or_train_judge(tmp_path / "a", data, "cpu", epochs=1)
    features, _ = features_and_predictions(cached, data.train.images, "cpu")
    torch.testing.assert_close(features, features_and_predictions(first, data.train.images, "cpu")[0])


def test_a_judge_is_trained_again_when_what_it_depends_on_changes(tmp_path):
    """A run trained again at another image size, or judged with other epochs, gets a new judge,
    never the old one's yardstick (which at another size or channel count would not even run)."""
    data = tiny_labelled_data()
    first = load_or_train_judge(tmp_path, data, "cpu", epochs=1)
    assert load_or_train_judge(tmp_path, data, "cpu", epochs=1).trained_on == first.trained_on
    generator = torch.Generator().manual_seed(1)
    larger = SimpleNamespace(**{**vars(data), "image_size": 24, "channels": 3, "train": SimpleNamespace(
        images=torch.randint(0, 256, (64, 3, 24, 24), dtype=torch.uint8, generator=generator), labels=data.train.labels)})
    again = load_or_train_judge(tmp_path, larger, "cpu", epochs=1)
    assert again.trained_on["image_size"] == 24 and again.body[0].in_channels == 3
    features, _ = features_and_predictions(again, larger.train.images, "cpu")  # the cached judge would fail here
    assert features.shape == (64, 128)
    assert load_or_train_judge(tmp_path, larger, "cpu", epochs=2).trained_on["epochs"] == 2


def test_frechet_distance_matches_a_direct_scipy_computation():
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)), as pytorch-fid computes it."""
    import numpy as np
    from scipy import linalg

    from foundation.judge import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(loc=0.3, size=(400, 16)) @ rng.normal(size=(16, 16))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a + cov_b - 2 * root)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-6)


def test_the_judge_reads_large_images_at_64_pixels():
    from foundation.judge import FeatureClassifier

    torch.manual_seed(0)
    judge = FeatureClassifier(in_channels=3, num_classes=4).eval()
    large = torch.rand(2, 3, 256, 256)
    small = torch.nn.functional.avg_pool2d(large, 4)
    torch.testing.assert_close(judge.features(large), judge.features(small))
    assert judge.features(torch.rand(2, 3, 32, 32)).shape == (2, 128)  # 32 pixels are read as they are


def test_a_small_set_gets_enough_steps_for_a_judge_that_classifies():
    """Three epochs of 64 images are three steps, a judge at chance; a small set gets more epochs
    (up to 100), and a large one keeps the epochs asked for."""
    from foundation.judge import FeatureClassifier, judge_epochs, train_classifier
    from tests.conftest import synthetic_images

    assert judge_epochs(3, 234) == 3  # Fashion-MNIST: 702 steps already
    assert judge_epochs(3, 12) == 50 and judge_epochs(3, 5) == 100 and judge_epochs(3, 0) == 100
    images, labels = synthetic_images(96, 16, seed=0)
    images = torch.from_numpy(images).unsqueeze(1)
    labels = torch.from_numpy(labels).long()
    torch.manual_seed(0)
    judge = train_classifier(FeatureClassifier(num_classes=4), images[:64], labels[:64], epochs=3, device="cpu")
    _, predictions = features_and_predictions(judge, images[64:], "cpu")
    assert (predictions == labels[64:]).float().mean() > 0.6  # 4 classes: chance is 0.25
