"""The judge of images: a small CNN whose penultimate layer is the feature space for the
Frechet distance, and whose predictions say whether a sample shows the class asked for.

Inception weights cannot be fetched on every machine, and Inception features of 32x32
grayscale clothing say little anyway; a classifier trained once on the run's own labelled
train split gives features that separate its classes. It is cached in `<run>/eval_classifier`.
Images without classes get a judge trained without them: it learns which of the square's eight
turns and mirror images was applied to a train image (Gidaris et al. 2018, "Unsupervised
Representation Learning by Predicting Image Rotations"), which it can only tell from what the
upright image shows, so its features too separate images by their content.

It sits in foundation, below both stages, because stage two (which picks its guidance scale by
it) and the pipelines use it, and imports only run downstream.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from tqdm.auto import tqdm

from foundation.atomic import save_pretrained_atomic
from foundation.data import held_in_memory
from foundation.training import bf16_is_fast


class FeatureClassifier(nn.Module, PyTorchModelHubMixin):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, feature_dim: int = 128, source: str = "",
                 trained_on: dict | None = None):
        super().__init__()
        self.source = source  # the data set it was trained on, stored in config.json
        self.trained_on = trained_on  # everything the judge depends on (`judge_key`); None in older config.json
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(128 * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images larger than 64 pixels are averaged down to 64 first: the judge tells classes
        and textures apart, which 64 pixels show, at a sixteenth of the cost of 256."""
        if max(images.shape[-2:]) > JUDGE_SIDE:
            images = F.interpolate(images, size=(JUDGE_SIDE, JUDGE_SIDE), mode="area")
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


JUDGE_DIR = "eval_classifier"
JUDGE_SIDE = 64
ORIENTATIONS = 8  # the unlabelled judge's classes: four quarter turns, of the image and of its mirror image


def orient(images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Square images [B, C, S, S], each as orientation `ids` [B] makes it: k % 4 quarter turns,
    of the mirror image from 4 on."""
    turned = images.clone()
    for k in range(ORIENTATIONS):
        chosen = ids == k
        if chosen.any():
            picked = images[chosen].flip(-1) if k >= 4 else images[chosen]
            turned[chosen] = picked.rot90(k % 4, (-2, -1))
    return turned

# Three epochs are 702 steps of Fashion-MNIST but 15 of 1,429 icons, which left a judge at chance
# (22% on 9 classes; 69% after 500 steps): a small set gets more epochs, up to a hundred.
MIN_JUDGE_STEPS = 600
MAX_JUDGE_EPOCHS = 100


def judge_epochs(epochs: int, batches_per_epoch: int) -> int:
    """`epochs`, or as many more as reach MIN_JUDGE_STEPS, at most MAX_JUDGE_EPOCHS."""
    needed = math.ceil(MIN_JUDGE_STEPS / max(batches_per_epoch, 1))
    return max(epochs, min(needed, MAX_JUDGE_EPOCHS))


def judge_key(data, epochs: int) -> dict:
    """What a judge depends on: a cached judge trained on anything else is the wrong yardstick
    (another image size or channel count would not even run)."""
    key = {"source": data.source, "image_size": data.image_size, "channels": data.channels,
           "class_names": data.class_names, "epochs": epochs,
           "min_steps": MIN_JUDGE_STEPS, "max_epochs": MAX_JUDGE_EPOCHS}
    return key if data.num_classes else {**key, "task": "orientation"}


def load_or_train_judge(run_dir: Path, data, device, epochs: int = 3) -> "FeatureClassifier":
    """The run's cached judge where it was trained on this data with these epochs; else a new
    one, trained on the train split (on its classes, or without labels on the orientations of
    its images) and cached in its place."""
    directory = Path(run_dir) / JUDGE_DIR
    key = judge_key(data, epochs)
    if (directory / "model.safetensors").exists():
        cached = FeatureClassifier.from_pretrained(str(directory))
        if cached.trained_on == key:
            return cached.to(device).eval()
    with torch.random.fork_rng(devices=[]):  # the same judge whatever ran before: figures stay comparable
        torch.manual_seed(0)
        model = FeatureClassifier(in_channels=data.channels, num_classes=data.num_classes or ORIENTATIONS, source=data.source,
                                  trained_on=key)
    # a split decoded as it is read lends a sample, at most 60,000 images (Fashion-MNIST's count) and 128 MB,
    # so the memory a run needs does not grow with its data set (60,000 32x32 grayscale images are 61 MB)
    train = held_in_memory(data.train, limit=60000, max_bytes=2**27)
    model = train_classifier(model, train.images, train.labels if data.num_classes else None, epochs, device)
    save_pretrained_atomic(model, directory)
    return model


def train_classifier(model, images, labels, epochs: int, device, batch_size: int = 256, seed: int = 0):
    """Plain supervised training on uint8 images [N, C, H, W]; a few epochs suffice for features
    on a large set, a small one gets more (`judge_epochs`). `labels` None: each image is shown in
    one of its eight orientations, drawn anew each time, and the orientation is the label.

    It trains in bf16 and channels_last where the hardware has bf16 (2.5x faster on this
    project's CPU); its features are always computed in fp32.
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(images))
    epochs = judge_epochs(epochs, len(images) // batch_size)
    model.to(device, memory_format=torch.channels_last).train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_is_fast(device.type))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    steps = epochs * (len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=max(steps, 1))
    with tqdm(total=steps, desc="training the feature classifier", leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=generator)
            for start in range(0, len(images) - batch_size + 1, batch_size):
                index = order[start: start + batch_size]
                batch = images[index].to(device).float() / 255
                if labels is None:
                    targets = torch.randint(ORIENTATIONS, (len(index),), generator=generator).to(device)
                    batch = orient(batch, targets)
                else:
                    targets = labels[index].to(device)
                with autocast:
                    logits = model(batch.contiguous(memory_format=torch.channels_last))
                loss = F.cross_entropy(logits.float(), targets)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(1)
    return model.to(memory_format=torch.contiguous_format).eval()  # safetensors saves contiguous weights


def class_accuracy(predictions: torch.Tensor, labels: torch.Tensor | None) -> float | None:
    """How often the judge's predicted class is the label; None without labels."""
    return (predictions == labels).float().mean().item() if labels is not None else None


@torch.no_grad()
def features_and_predictions(model, images: torch.Tensor, device, batch_size: int = 1000):
    """Images in [0, 1] (float) or uint8 -> (features [N, D] float64, predicted classes [N])."""
    features, predictions = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start: start + batch_size].to(device)
        batch = batch.float() / 255 if batch.dtype == torch.uint8 else batch.float()
        feature = model.features(batch)
        features.append(feature.double().cpu())
        predictions.append(model.head(feature).argmax(1).cpu())
    return torch.cat(features), torch.cat(predictions)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), in float64.

    Tr((S_a S_b)^1/2) is the sum of square roots of the eigenvalues of
    S_a^1/2 S_b S_a^1/2, which is symmetric, so `eigvalsh` is enough.
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    sqrt_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def frechet_spread(a: torch.Tensor, b: torch.Tensor, draws: int = 20, seed: int = 0) -> float:
    """How much the Frechet distance of `a` to `b` moves with the images drawn: its standard
    deviation over `draws` bootstrap resamples of both sets. On a few hundred test images it is a
    fifth of the distance or more; on thousands, a few percent."""
    generator = torch.Generator().manual_seed(seed)
    resample = lambda x: x[torch.randint(len(x), (len(x),), generator=generator)]
    return torch.tensor([frechet_distance(resample(a), resample(b)) for _ in range(draws)]).std().item()


def judge_images(judge, images: torch.Tensor, reference_features: torch.Tensor, device, labels=None) -> dict:
    """Frechet distance of `images` to the reference features, and the judge's accuracy on the
    classes they were asked to show (when given)."""
    features, predictions = features_and_predictions(judge, images, device)
    result = {"fd": frechet_distance(features, reference_features)}
    if labels is not None:
        result["classifier_accuracy"] = class_accuracy(predictions, labels)
    return result


@dataclass
class HeldOut:
    """The judge's view of a test split: its first `n` images are held out (reconstructed, or
    the reference samples are compared with), the rest are the reference."""

    images: torch.Tensor  # uint8, the held-out images
    labels: torch.Tensor | None
    reference_features: torch.Tensor
    floor: float  # the Frechet distance between held-out and reference real images: a perfect score
    accuracy: float | None  # how often the judge recognises the real test images' class


def hold_out(judge, test, n: int, device) -> HeldOut:
    """`test` holds `.images` (uint8) and `.labels`; n is at most half of it."""
    n = min(n, len(test.images) // 2)
    if n < 2:
        raise ValueError(f"the test split has {len(test.images)} images; the Frechet distance needs at least 4")
    features, predictions = features_and_predictions(judge, test.images, device)
    accuracy = class_accuracy(predictions, test.labels)
    return HeldOut(test.images[:n], test.labels[:n] if test.labels is not None else None, features[n:],
                   frechet_distance(features[:n], features[n:]), accuracy)


@torch.no_grad()
def reconstruct(vqvae, images: torch.Tensor, device, batch_size: int = 500) -> torch.Tensor:
    """decode(encode(images)) in fp32, uint8 in, [0, 1] floats out, on the CPU."""
    return torch.cat([
        vqvae.decode(vqvae.encode(images[start: start + batch_size].to(device).float() / 255)).float().cpu()
        for start in range(0, len(images), batch_size)
    ])


def reconstruction_quality(judge, reconstructed: torch.Tensor, reference_features: torch.Tensor, device, labels=None) -> dict:
    """Stage one's ceiling on the samples' figures: `rfd`, the Frechet distance of reconstructed
    held-out images to the reference (given the held-out images themselves, a perfect
    reconstruction, it is the floor), and with their labels `classifier_accuracy`, how often
    the judge still recognises their class."""
    result = judge_images(judge, reconstructed, reference_features, device, labels)
    return {"rfd": result.pop("fd"), **result}


def judge_reconstructions(vqvae, judge, held_out: HeldOut, device) -> dict:
    """rfd, its ratio to the floor, and the judge's accuracy on the reconstructions."""
    result = reconstruction_quality(judge, reconstruct(vqvae, held_out.images, device), held_out.reference_features,
                                    device, held_out.labels)
    return {**result, "rfd_ratio": result["rfd"] / held_out.floor if held_out.floor > 0 else None}
