"""`python -m pipelines.evaluate`: one file of numbers for a trained run, `<run>/metrics.json`.

- stage1: reconstruction mse, psnr, ssim; codebook_usage and perplexity on the test split.
- stage2: nll_bits_per_code on the test split; bits_per_dim, the VQ-VAE paper's bound
  (decoder term + prior term per image dimension).
- samples: the Frechet distance between generated and test images in the feature space of
  a small classifier (the judge) trained once on the train split (`fd`; on its classes, or,
  without labels, on its images' orientations), drawn with the sampler's defaults; the same
  distance for held-out real images (`fd_floor`, what a perfect generator would score) and for
  their reconstructions (`stage1.rfd`, the ceiling stage one sets); how often the judge
  recognises the class a sample was asked for (`classifier_accuracy`, over all `--n` samples
  where the test split holds fewer), and a reconstruction's (`stage1.classifier_accuracy`, its
  ceiling). Every distance is also given as a ratio to `fd_floor`.
  `--guidance 1,1.5,2,3` adds one row per scale (`samples.guidance_sweep`).
- memorisation: for the same samples, the share that are near-copies of a train image and
  their median distance to the nearest train image as a multiple of real test images' (1: as
  near as unseen real images; above: blends; below: copies), in the judge's features and in
  pixels (foundation/memorisation.py).
- with `--inception on` (or `auto` on a GPU), the standard Inception FID of the same samples
  and its real-vs-real floor (`samples.fid`, `samples.fid_floor`), through torchmetrics.
"""

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from foundation.cli import parse_config
from foundation.data import data_config_of_run, eval_loader, held_in_memory, load_image_data
from foundation.errors import UserError, run_cli
from foundation.judge import (class_accuracy, features_and_predictions, frechet_distance, frechet_spread, hold_out,
                              judge_reconstructions, load_or_train_judge)
from foundation.memorisation import memorisation
from foundation.training import bf16_is_fast, use_all_cores
from pipelines.inception import load_fid_metric, standard_fid
from pipelines.pipeline import check_null_label_was_trained, load_run, output_of, pick_device, resolve_guidance
from stage1_vqvae.codes import open_codes, weights_hash
from stage1_vqvae.metrics import reconstruction_metrics
from stage2_prior.evaluation import prior_bits_per_dim, test_nll
from stage2_prior.priors import PARALLEL_PRIORS
from stage2_prior.quality import balanced_labels, generate_images, guidance_sweep, parse_scales


@dataclass
class EvaluateConfig:
    run_dir: str = field(default="runs/default", metadata={"help": "run to evaluate"})
    prior_dir: str = field(default="prior", metadata={"help": "folder of the prior inside the run (stage two's --prior-dir)"})
    n: int = field(default=2000, metadata={"help": "generated images (the Frechet distance uses as many as it has held-out real ones)"})
    batch_size: int = field(default=500, metadata={"help": "code maps sampled at once"})
    classifier_epochs: int = field(default=3, metadata={"help": "epochs of the feature classifier (trained once per run; a small set gets more, up to 600 steps)"})
    guidance: str = field(default="", metadata={"help": "also one row per guidance scale, e.g. 1,1.5,2,3"})
    seed: int = field(default=0, metadata={"help": "seed of the samples"})
    device: str = field(default="auto", metadata={"help": "where to run", "choices": ["auto", "cuda", "mps", "cpu"]})
    inception: str = field(
        default="auto", metadata={"help": "also the standard Inception FID (torchmetrics): auto = on a GPU, skipped with a note "
                                          "where its weights cannot be had", "choices": ["auto", "on", "off"]}
    )


def decoder_bits_per_dim(mse: float) -> float:
    """-log2 p(x | z) per dimension for a Gaussian decoder with variance = the test MSE,
    integrated over the 1/256-wide bin of an 8-bit pixel value."""
    return 0.5 * math.log2(2 * math.pi * math.e * mse) + 8


def with_ratio(metrics: dict, key: str, floor: float) -> None:
    metrics[f"{key}_ratio"] = metrics[key] / floor if floor > 0 else None


# The train images the samples are compared with: all of a set of up to 10,000 (the small sets,
# where a prior passes over its maps often enough to copy them), else a seeded sample of 10,000.
# All of Fashion-MNIST's 60,000 cost the demo's evaluate 32 of its 62 s here, most of it the
# judge's features of the train images.
MEMORISATION_TRAIN_IMAGES, MEMORISATION_TRAIN_BYTES = 10_000, 2**30


def memorisation_metrics(judge, samples: torch.Tensor, sample_features: torch.Tensor, test_images: torch.Tensor,
                         data, device) -> dict:
    """Near-copies and the nearest-train ratio of `samples` ([0, 1] floats, whose judge features are
    `sample_features`) against the real test images (uint8), in the judge's features and in pixels."""
    train = held_in_memory(data.train, MEMORISATION_TRAIN_IMAGES, MEMORISATION_TRAIN_BYTES).images
    if len(train) > MEMORISATION_TRAIN_IMAGES:  # a split held in memory comes whole
        train = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:MEMORISATION_TRAIN_IMAGES]]
    vectors = [sample_features, *(features_and_predictions(judge, images, device)[0] for images in (test_images, train))]
    pixels = [images.float() / 255 if images.dtype == torch.uint8 else images for images in (samples, test_images, train)]
    return {"features": memorisation(*vectors), "pixels": memorisation(*pixels), "train_images": len(train),
            "note": "near-copies: nearer their nearest train image than 95% of real test images are to theirs; "
                    "ratio: the samples' median distance to their nearest train image over the test images' "
                    "(1: as near as unseen real images, above 1: blends, below 1: copies)"}


def sample_metrics(vqvae, prior, data, judge, config: EvaluateConfig, device) -> tuple[dict, dict]:
    """(the stage-one figures rfd and its ratio, the sample figures) on the same features and n."""
    # the whole test split when it is held in memory; else a bounded sample of it: 4n images
    test = held_in_memory(data.test, 4 * config.n)
    try:
        held_out = hold_out(judge, test, config.n, device)
    except ValueError as error:
        raise UserError(str(error)) from None
    n, reference, floor = len(held_out.images), held_out.reference_features, held_out.floor
    stage1 = judge_reconstructions(vqvae, judge, held_out, device)

    # --n samples, of which the Frechet distance takes as many as it has held-out real images
    labels = balanced_labels(config.n, prior.num_classes)
    guidance = resolve_guidance(None, labels, prior)  # what `pipelines.sample` uses with no flags
    _, generated = generate_images(prior, vqvae, labels, config.n, device, config.batch_size, config.seed, guidance=guidance)
    features, predictions = features_and_predictions(judge, generated, device)
    metrics = {"guidance": guidance, "fd": frechet_distance(features[:n], reference),
               "fd_spread": frechet_spread(features[:n], reference), "fd_floor": floor}
    if labels is not None:
        metrics["classifier_accuracy"] = class_accuracy(predictions, labels)
    with_ratio(metrics, "fd", floor)
    metrics.update({
        # None where the test split has no labels (ImageNet's test split): the FDs need none
        "classifier_test_accuracy": held_out.accuracy,
        "n": config.n,
        "fd_n": n,
        "features": "penultimate layer of a small CNN trained on the run's train split"
                    + (" to tell its classes" if data.num_classes else " to tell its images' orientations (no labels)"),
        "sampling": "balanced classes, the prior's default guidance" if labels is not None else "unconditional",
        "memorisation": memorisation_metrics(judge, generated, features, test.images, data, device),
    })
    scales = parse_scales(config.guidance, "--guidance")
    if scales and labels is not None:
        rows = guidance_sweep(prior, vqvae, judge, reference, n, device, scales, config.batch_size, config.seed)
        for sweep_row in rows:
            with_ratio(sweep_row, "fd", floor)
        metrics["guidance_sweep"] = rows
    if config.inception == "on" or (config.inception == "auto" and device.type == "cuda"):
        try:
            metric = load_fid_metric(device)
        except ValueError as error:
            if config.inception == "on":
                raise UserError(f"--inception on needs the standard FID, but {error}; use --inception off") from None
            metrics["fid_note"] = f"standard FID skipped: {error}"
        else:
            metrics.update(standard_fid(metric, test.images[n:], generated, test.images[:n]))
            with_ratio(metrics, "fid", metrics["fid_floor"])
    return stage1, metrics


def evaluate_run(config: EvaluateConfig) -> dict:
    scales = parse_scales(config.guidance, "--guidance")  # a typo should stop us before minutes of work
    run_dir = Path(config.run_dir)
    device = pick_device(config.device)
    use_all_cores(device)
    vqvae, prior = load_run(run_dir, device, config.prior_dir)
    if scales and not prior.num_classes:
        raise UserError(f"--guidance {config.guidance} does nothing for an unconditional prior (guidance steers samples "
                        f"towards their class, and this prior has none); drop --guidance")
    if any(scale != 1 for scale in scales):
        check_null_label_was_trained(prior, f"--guidance {config.guidance}")
    data = load_image_data(data_config_of_run(run_dir))
    # fp32 for stage one's figures on every device, so that metrics.json does not depend on the GPU
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no")

    stage1 = reconstruction_metrics(accelerator, vqvae, accelerator.prepare(eval_loader(data.test, config.batch_size)))
    maps = open_codes(run_dir / "codes", "test", vqvae=vqvae, labels=bool(prior.num_classes))
    loader = accelerator.prepare(eval_loader(maps, config.batch_size))
    # In bf16 where the hardware has it, as stage two measures it: 3x faster on a CPU with AMX,
    # and 0.0003 bits/code from fp32 on the demo's prior (stage one's figures stay in fp32).
    bf16 = bf16_is_fast(device.type)
    masked = prior.prior in PARALLEL_PRIORS
    nll = test_nll(accelerator, prior, loader, lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), masked)
    stage2 = {
        "prior": prior.prior,
        "masked_nll_bits_per_code" if masked else "nll_bits_per_code": nll,
        "nll_precision": "bf16" if bf16 else "fp32",
        # the NLL and bits/dim are of p(codes | label) then; a test split without labels is scored with the null label
        "conditional_on_labels": maps.labelled,
        "decoder_bits_per_dim": decoder_bits_per_dim(stage1["mse"]),
    }
    if masked:
        stage2["note"] = "MaskGIT has no likelihood: its figure scores masked codes only, so there is no bits/dim bound"
    else:
        stage2["prior_bits_per_dim"] = prior_bits_per_dim(nll, vqvae)
        stage2["bits_per_dim"] = stage2["prior_bits_per_dim"] + stage2["decoder_bits_per_dim"]

    judge = load_or_train_judge(run_dir, data, device, config.classifier_epochs)
    rfd, samples = sample_metrics(vqvae, prior, data, judge, config, device)
    stage1.update(rfd)
    # what these figures describe: a run retrained since is shown as not evaluated (VQPipeline.from_run)
    weights = {"vqvae": weights_hash(vqvae), "prior": weights_hash(prior)}
    return {"stage1": stage1, "stage2": stage2, "samples": samples, "device": str(device), "weights": weights}


def format_table(metrics: dict) -> str:
    rows = []

    def add(section: str, key: str, value) -> None:
        if isinstance(value, dict):  # memorisation's two spaces: one row per figure
            for inner, inner_value in value.items():
                if inner != "note":
                    add(section, f"{key}.{inner}", inner_value)
            return
        shown = f"{value:.5g}" if isinstance(value, float) else str(value)
        rows.append(f"{section:<8} {key:<26} {shown}")

    for section in ("stage1", "stage2", "samples"):
        for key, value in metrics[section].items():
            if key == "guidance_sweep":
                for row in value:
                    shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "guidance")
                    rows.append(f"{section:<8} {'guidance ' + format(row['guidance'], 'g'):<26} {shown}")
                continue
            add(section, key, value)
    return "\n".join(rows)


def main(argv=None):
    config = parse_config(EvaluateConfig, argv, description=__doc__.splitlines()[0])
    started = time.time()
    metrics = evaluate_run(config)
    path = output_of(config.run_dir, "metrics.json", config.prior_dir)  # a second prior's beside the first's
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(staging, path)
    print(format_table(metrics))
    print(f"Wrote {path} in {time.time() - started:.0f}s")


if __name__ == "__main__":
    run_cli(main)
