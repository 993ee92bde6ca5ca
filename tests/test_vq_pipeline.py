"""`VQPipeline`, the Python way to use a run: drawing, completing, saving, the Hub layout."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from foundation.errors import UserError
from pipelines import VQPipeline, sample


@pytest.fixture(scope="module")
def pipe(trained_run):
    return VQPipeline.from_pretrained(trained_run, device="cpu")


def test_five_lines_draw_the_images_of_the_command_line_for_a_seed(trained_run, pipe, tmp_path):
    sample.main(["--run-dir", str(trained_run), "--n", "12", "--label", "Dress", "--seed", "5", "--out", str(tmp_path)])
    images = pipe(n=12, labels="Dress", seed=5).images
    assert len(images) == 12 and all(isinstance(image, Image.Image) and image.size == (32, 32) for image in images)
    assert np.array_equal(pipe(n=12, labels="Dress", seed=5).codes.numpy(), np.load(tmp_path / "codes.npy"))
    assert np.array_equal(np.asarray(images[3]), np.asarray(Image.open(tmp_path / "0003.png").convert("L")))


def test_labels_by_name_index_list_or_all(pipe):
    assert pipe(n=3, labels="Sneaker").labels.tolist() == [7, 7, 7]
    assert pipe(n=2, labels=2).labels.tolist() == [2, 2]
    assert pipe(labels=["Bag", 0, "Trouser"]).labels.tolist() == [8, 0, 1]
    assert torch.bincount(pipe(n=12).labels).tolist() == [2, 2] + [1] * 8  # every class, within n
    assert pipe(n=4, labels="none", guidance=None).labels is None


def test_guidance_defaults_to_the_scale_stored_with_the_prior(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = json.loads((run / "prior" / "config.json").read_text())
    (run / "prior" / "config.json").write_text(json.dumps({**config, "default_guidance": 2.5}))
    guided = VQPipeline.from_pretrained(run, device="cpu")
    assert guided(n=2).guidance == 2.5
    assert guided(n=2, guidance=1).guidance == 1
    assert guided(n=2, labels="none").guidance == 1.0  # nothing to guide towards


def test_each_output_type(pipe):
    tensor = pipe(n=3, output_type="pt").images
    assert tensor.shape == (3, 1, 32, 32) and tensor.dtype == torch.float32 and 0 <= tensor.min() and tensor.max() <= 1
    array = pipe(n=3, output_type="np").images
    assert array.shape == (3, 32, 32, 1) and np.allclose(array, tensor.permute(0, 2, 3, 1).numpy())
    pil = pipe(n=3).images
    assert np.array_equal(np.asarray(pil[1]), (tensor[1, 0] * 255).round().to(torch.uint8).numpy())


def test_completion_with_a_mask_keeps_the_rest_of_the_map(pipe):
    images = [Image.new("RGB", (50, 40), (200, 10, 10)), Image.new("L", (32, 32), 90)]
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[16:] = True  # the bottom half of the pixels
    result = pipe.complete(images, mask, samples=3, labels="Coat", output_type="pt")
    assert result.images.shape == (2, 3, 1, 32, 32) and result.region[4:].all() and not result.region[:4].any()
    kept_codes = pipe.vqvae.encode(pipe.prepare_images(images).float() / 255)
    assert torch.equal(result.codes[:, :, :4], kept_codes[:, None, :4].expand(-1, 3, -1, -1))
    assert result.labels.tolist() == [4, 4]
    assert len(pipe.complete(images[0], "bottom", samples=2).images[0]) == 2  # PIL: one list per input


@pytest.mark.parametrize("call, message", [
    (lambda pipe: pipe(labels="Hat"), "label 'Hat' is neither a class name nor an index from 0 to 9"),
    (lambda pipe: pipe(n=3, labels=[1, 2]), "2 labels were given for n=3 images"),
    (lambda pipe: pipe(output_type="jpg"), "output_type 'jpg' is not one of"),
    (lambda pipe: pipe(passes=4), "passes 4 sets MaskGIT's sampling passes, but this run's prior is a transformer"),
    (lambda pipe: pipe.complete(torch.zeros(2, 3, 32, 32), "bottom"), r"a tensor of shape \(2, 3, 32, 32\) was given"),
    (lambda pipe: pipe.complete(Image.new("L", (8, 8)), torch.zeros(32, 32)), "covers no code of the 8x8 map"),
    (lambda pipe: pipe.complete("missing.png"), "image missing.png does not exist"),
])
def test_bad_arguments_are_one_sentence_and_a_value_error(pipe, call, message):
    with pytest.raises(ValueError, match=message):
        call(pipe)


def test_a_missing_run_names_the_command_that_makes_it(tmp_path):
    with pytest.raises(UserError, match=r"no VQ-VAE in .*stage1_vqvae/train.py"):
        VQPipeline.from_pretrained(tmp_path)
    with pytest.raises(UserError, match="neither a folder nor a Hub repo id"):
        VQPipeline.from_pretrained(str(tmp_path / "not" / "there"))


def test_save_pretrained_writes_what_sampling_needs_and_loads_to_the_same_images(trained_run, tmp_path):
    pipe = VQPipeline.from_pretrained(trained_run, device="cpu")
    pipe.metrics = {"stage1": {"mse": 0.00512, "rfd_ratio": 3.2}, "samples": {"fd_ratio": 4.4, "classifier_accuracy": 0.87}}
    saved = pipe.save_pretrained(tmp_path / "saved")
    files = sorted(str(path.relative_to(saved)) for path in saved.rglob("*") if path.is_file())
    assert files == ["README.md", "metrics.json", "pipeline.json", "prior/config.json", "prior/model.safetensors",
                     "samples.png", "vqvae/config.json", "vqvae/model.safetensors"]  # no checkpoint, optimizer or log
    again = VQPipeline.from_pretrained(saved, device="cpu")
    assert torch.equal(again(n=10, seed=3, output_type="pt").images, pipe(n=10, seed=3, output_type="pt").images)
    assert again.prior.default_guidance == pipe.prior.default_guidance and again.metrics == pipe.metrics
    card = (saved / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: pytorch" in card and "zalando-datasets/fashion_mnist" in card
    assert "| stage one: Frechet distance of reconstructions / real-vs-real floor | 3.20x |" in card
    assert "![samples](samples.png)" in card and Image.open(saved / "samples.png").size[1] == 2 + 10 * 34


def test_a_hub_repo_id_loads_through_huggingface_hub_and_offline_is_one_sentence(pipe, tmp_path, monkeypatch):
    saved = pipe.save_pretrained(tmp_path / "saved", grid=False)
    asked = {}

    def fake_download(repo_id, **kwargs):
        asked.update(repo_id=repo_id, **kwargs)
        return str(saved)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_download)
    hub = VQPipeline.from_pretrained("someone/fashion-vq", device="cpu")
    assert asked["repo_id"] == "someone/fashion-vq" and "vqvae/*" in asked["allow_patterns"]
    assert torch.equal(hub(n=4, output_type="pt").images, pipe(n=4, output_type="pt").images)

    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic is disabled")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(UserError, match=r"^someone/fashion-vq is not a folder here, and fetching it from the Hugging Face Hub "
                                        r"failed \(LocalEntryNotFoundError: .*\); give the path of a run folder"):
        VQPipeline.from_pretrained("someone/fashion-vq")


def test_push_to_hub_uploads_exactly_what_save_pretrained_writes(pipe, tmp_path, monkeypatch):
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
            uploaded.update(created=repo_id, private=private)

        def upload_folder(self, repo_id, folder_path, commit_message, repo_type):
            root = Path(folder_path)
            uploaded["files"] = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
            uploaded["card"] = (root / "README.md").read_text()
            return "https://huggingface.co/someone/fashion-vq/commit/0"

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    assert pipe.push_to_hub("someone/fashion-vq", private=True).endswith("/commit/0")
    saved = pipe.save_pretrained(tmp_path / "saved")
    assert uploaded["files"] == sorted(str(p.relative_to(saved)) for p in saved.rglob("*") if p.is_file())
    assert uploaded["created"] == "someone/fashion-vq" and uploaded["private"] is True
    assert 'VQPipeline.from_pretrained("someone/fashion-vq")' in uploaded["card"]
