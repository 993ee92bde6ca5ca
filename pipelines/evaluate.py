"""`python -m pipelines.evaluate`: one file of numbers for a trained run, `<run>/metrics.json`.

- stage1: reconstruction mse, psnr, ssim; codebook_usage and perplexity on the test split.
- stage2: nll_bits_per_code on the test split; bits_per_dim, the VQ-VAE paper's bound
  (decoder term + prior term per image dimension).
- samples: the Frechet distance between generated and test images in the feature space of
  a small classifier trained once on the labelled train split (`fd`), the same distance for
  held-out real images (`fd_floor`, what a perfect generator would score), and how often
  the classifier recognises the class a sample was asked for (`classifier_accuracy`).
"""

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from pipelines.classifier import FeatureClassifier, features_and_predictions, frechet_distance, train_classifier
from pipelines.inception import cached_inception, inception_features
from pipelines.sample import SampleConfig, load_run, pick_device, sample_images
from stage1_vqvae.atomic import save_pretrained_atomic
from stage1_vqvae.cli import parse_config
from stage1_vqvae.codes import read_codes
from stage1_vqvae.data import InMemoryBatches, load_image_data
from stage1_vqvae.dump_codes import data_config_of_run
from stage1_vqvae.errors import UserError, run_cli
from stage1_vqvae.metrics import eval_loader, reconstruction_metrics
from stage1_vqvae.training import use_all_cores
from stage2_prior.evaluation import prior_bits_per_dim, test_nll

CLASSIFIER_DIR = "eval_classifier"


@dataclass
class EvaluateConfig:
    run_dir: str = field(default="runs/default", metadata={"help": "run to evaluate"})
    n: int = field(default=2000, metadata={"help": "generated (and held-out real) images for the Frechet distance"})
    batch_size: int = field(default=500, metadata={"help": "code maps sampled at once"})
    classifier_epochs: int = field(default=3, metadata={"help": "epochs of the feature classifier (trained once per run)"})
    seed: int = field(default=0, metadata={"help": "seed of the samples"})
    device: str = field(default="auto", metadata={"help": "where to run", "choices": ["auto", "cuda", "mps", "cpu"]})
    inception: str = field(
        default="auto", metadata={"help": "also Inception-v3 distances: auto = on a GPU when its weights are cached", "choices": ["auto", "on", "off"]}
    )


def decoder_bits_per_dim(mse: float) -> float:
    """-log2 p(x | z) per dimension for a Gaussian decoder with variance = the test MSE,
    integrated over the 1/256-wide bin of an 8-bit pixel value."""
    return 0.5 * math.log2(2 * math.pi * math.e * mse) + 8


def feature_classifier(run_dir: Path, data, device, epochs: int):
    """The run's cached classifier, or a new one trained on the labelled train split."""
    directory = run_dir / CLASSIFIER_DIR
    if (directory / "model.safetensors").exists():
        cached = FeatureClassifier.from_pretrained(str(directory))
        if cached.source == data.source:
            return cached.to(device).eval()
    model = FeatureClassifier(in_channels=data.channels, num_classes=data.num_classes, source=data.source)
    model = train_classifier(model, data.train.images, data.train.labels, epochs, device)
    save_pretrained_atomic(model, directory)
    return model


def sample_metrics(vqvae, prior, data, classifier, config: EvaluateConfig, device) -> dict:
    test_images = data.test.images
    n = min(config.n, len(test_images) // 2)
    if n < 2:
        raise UserError(f"the test split has {len(test_images)} images; the Frechet distance needs at least 4")
    real_features, real_predictions = features_and_predictions(classifier, test_images, device)
    held_out, reference = real_features[:n], real_features[n:]
    labels = torch.arange(n) % prior.num_classes if prior.num_classes else None
    sampling = SampleConfig(batch_size=config.batch_size, seed=config.seed)
    _, generated = sample_images(vqvae, prior, labels, n, sampling, device)
    generated_features, generated_predictions = features_and_predictions(classifier, generated, device)
    metrics = {
        "fd": frechet_distance(generated_features, reference),
        "fd_floor": frechet_distance(held_out, reference),
        "classifier_test_accuracy": (real_predictions == data.test.labels).float().mean().item(),
        "n": n,
        "features": "penultimate layer of a small CNN classifier trained on the run's train split",
    }
    if labels is not None:
        metrics["classifier_accuracy"] = (generated_predictions == labels).float().mean().item()
    if config.inception == "on" or (config.inception == "auto" and device.type == "cuda"):
        inception = cached_inception(device)
        if inception is None and config.inception == "on":
            raise UserError("--inception on, but torchvision's Inception-v3 weights are not in the torch hub cache; use --inception off")
        if inception is not None:
            real = inception_features(inception, test_images, device)
            fake = inception_features(inception, generated, device)
            metrics["fd_inception"] = frechet_distance(fake, real[n:])
            metrics["fd_inception_floor"] = frechet_distance(real[:n], real[n:])
    return metrics


def evaluate_run(config: EvaluateConfig) -> dict:
    run_dir = Path(config.run_dir)
    device = pick_device(config.device)
    use_all_cores(device)
    vqvae, prior = load_run(run_dir, device)
    data = load_image_data(data_config_of_run(run_dir))
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no")

    stage1 = reconstruction_metrics(accelerator, vqvae, accelerator.prepare(eval_loader(data.test, config.batch_size)))
    test_maps = read_codes(run_dir / "codes", "test", vqvae=vqvae)
    maps = InMemoryBatches(codes=test_maps.codes, labels=test_maps.labels if prior.num_classes else None)
    loader = accelerator.prepare(eval_loader(maps, config.batch_size))
    nll = test_nll(accelerator, prior, loader)
    stage2 = {
        "nll_bits_per_code": nll,
        "prior_bits_per_dim": prior_bits_per_dim(nll, vqvae),
        "decoder_bits_per_dim": decoder_bits_per_dim(stage1["mse"]),
    }
    stage2["bits_per_dim"] = stage2["prior_bits_per_dim"] + stage2["decoder_bits_per_dim"]

    if data.num_classes:
        classifier = feature_classifier(run_dir, data, device, config.classifier_epochs)
        samples = sample_metrics(vqvae, prior, data, classifier, config, device)
    else:
        samples = {"fd": None, "note": "the images have no labels to train the feature classifier on"}
    return {"stage1": stage1, "stage2": stage2, "samples": samples, "device": str(device)}


def format_table(metrics: dict) -> str:
    rows = []
    for section in ("stage1", "stage2", "samples"):
        for key, value in metrics[section].items():
            shown = f"{value:.5g}" if isinstance(value, float) else str(value)
            rows.append(f"{section:<8} {key:<26} {shown}")
    return "\n".join(rows)


def main(argv=None):
    config = parse_config(EvaluateConfig, argv, description=__doc__.splitlines()[0])
    started = time.time()
    metrics = evaluate_run(config)
    path = Path(config.run_dir) / "metrics.json"
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(staging, path)
    print(format_table(metrics))
    print(f"Wrote {path} in {time.time() - started:.0f}s")


if __name__ == "__main__":
    run_cli(main)
