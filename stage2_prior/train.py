"""Train a prior over the code maps: `accelerate launch stage2_prior/train.py [--prior pixelcnn|maskgit]`.

It reads `<run>/codes`, refuses maps that the VQ-VAE in `<run>/vqvae` did not write, and
saves the prior with the best test loss to `<run>/prior` (or `--prior-dir`, so that two
priors can share one VQ-VAE). The loss is the NLL for the raster-order priors, and the
cross-entropy of masked codes for MaskGIT.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torchvision.utils import make_grid, save_image

from foundation.atomic import save_pretrained_atomic
from foundation.cli import parse_config
from foundation.curves import write_curves
from foundation.data import data_config_of_run, held_in_memory, load_image_data
from foundation.errors import UserError, run_cli
from foundation.estimate import format_duration
from foundation.judge import JUDGE_DIR, class_accuracy, features_and_predictions, load_or_train_judge
from foundation.training import LoopConfig, cuda_graphs_apply, describe_graphs, describe_length, open_stage, run_training_loop, set_up_training
from stage1_vqvae.codes import open_codes, weights_hash
from stage1_vqvae.model import load_vqvae
from stage1_vqvae.weight_average import update_average, weight_average
from stage2_prior.evaluation import LOG2, prior_bits_per_dim, test_nll
from stage2_prior.prior_config import PriorConfig
from stage2_prior.priors import PARALLEL_PRIORS, PRIORS, corrupt_codes, load_prior, set_default_guidance, training_loss
from stage2_prior.quality import balanced_labels, best_guidance, guidance_sweep, parse_scales, sweep_samples
from stage2_prior.size_presets import apply_prior_presets


# The panels of <prior>/curves.png: the loss as trained (MaskGIT's label-smoothed, on masked
# codes) beside the test split's
CURVES = {"NLL, bits per code": ["train/nll_bits_per_code", "test/nll_bits_per_code"],
          "MaskGIT: masked codes, bits per code": ["train/masked_loss_bits_per_code", "test/masked_nll_bits_per_code"]}


@dataclass
class TrainConfig(LoopConfig, PriorConfig):
    # how runs saved before these flags existed trained, so that --resume of one refuses the new default
    FLAGS_ADDED_SINCE: ClassVar[dict] = {"label_every_code": False, "codebook_inputs": False,
                                         "token_corruption": 0.0, "ema_decay": 0.0}
    # left out, each is chosen from the data (size_presets.py): the same data makes the same choice
    CHOSEN_FROM_DATA: ClassVar[tuple] = ("batch_size", "eval_every", "dropout", "transformed_maps", "token_corruption")
    # one flag name, one meaning: --steps counted optimizer steps elsewhere, --channels image channels in stage one
    RENAMED_FLAGS: ClassVar[dict] = {**LoopConfig.RENAMED_FLAGS, "--steps": "--passes", "--channels": "--pixelcnn-channels"}
    epochs: float = field(default=2.25, metadata={"help": "passes over the train maps (ignored with --max-steps)"})
    # the demo's 2.25 epochs of Fashion-MNIST's maps: what a small data set gets too
    min_steps: int = field(default=4219, metadata={"help": "at least this many optimizer steps, however few --epochs make on a small data "
                                                           "set (unless --patience stops it sooner)"})
    # An evaluation (test NLL on every test map, and a grid) costs about 7 s on 2 cores: the demo keeps three.
    eval_every: int | None = field(default=None, metadata={"help": "evaluate on the test split every N steps (default: about every "
                                                                   "2 passes over the maps, 100 to 2000 steps)"})
    batch_size: int | None = field(default=None, metadata={"help": "maps per process per step (default: 32 maps of 8x8 codes, "
                                                                    "fewer of larger maps; small batches: more updates in the same time)"})
    dropout: float | None = field(default=None, metadata={"help": "transformer (and MaskGIT) dropout (default: 0.1 where the run "
                                                                   "passes over the train maps more than 12 times, else 0)"})
    transformed_maps: bool | None = field(default=None, metadata={"help": "train on the transformed copies of the train images "
                                                                          "that stage one's dump wrote, each told its transform "
                                                                          "(default: where the steps still pass over every map "
                                                                          "40 times; --no-transformed-maps: the images' own maps only)"})
    token_corruption: float | None = field(default=None, metadata={"help": "share of the input codes replaced by random codes "
                                                                          "while training, the targets unchanged (default: 0.2 "
                                                                          "where the run passes over the train maps more than 12 "
                                                                          "times, else 0)"})
    ema_decay: float = field(default=0.0, metadata={"help": "evaluate, keep and save an EMA of the prior's weights with this decay "
                                                            "(0: the trained weights)"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate of AdamW"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    grid_samples: int = field(default=32, metadata={"help": "samples in each evaluation grid"})
    guidance_scales: str = field(
        default="1,1.25,1.35,1.5", metadata={"help": "guidance scales tried at the end; the best becomes sampling's default ('': none)"}
    )
    guidance_samples: int = field(default=2000, metadata={"help": "samples judged per guidance scale (FD is noisy below 2000)"})
    # On a small set the test NLL passes its best long before the demo's 4,219 steps end (the icons
    # near step 900) and never came back below it: the prior kept would not change, only the time spent.
    patience: int = field(default=5, metadata={"help": "stop once the test NLL has not improved for this many evaluations "
                                                       "in a row (0: train every step)"})


def choose_guidance(accelerator, run_dir: Path, stage_dir: Path, vqvae, scales: list[float], n: int, log, step: int) -> str:
    """Judge the best prior's samples at each guidance scale and store the best scale in its
    config.json, where `pipelines.sample` reads its default."""
    try:
        data = load_image_data(data_config_of_run(run_dir))
    except UserError as error:  # the prior is saved already; only the sweep is lost
        return f"guidance not measured: {error}"
    if not data.num_classes:
        return "guidance not measured: the judge needs labelled images"
    judge = load_or_train_judge(run_dir, data, accelerator.device)
    test = held_in_memory(data.test, 4 * n)  # all of a split held in memory, else a bounded sample
    reference, predictions = features_and_predictions(judge, test.images, accelerator.device)
    chance = 1 / data.num_classes
    accuracy = class_accuracy(predictions, test.labels)
    if accuracy is not None and accuracy < chance + (1 - chance) / 4:  # such a judge ranks the scales at random
        return (f"guidance not measured: the judge recognises only {accuracy:.0%} of the real test images "
                f"({data.num_classes} classes, chance {chance:.0%}), too few to rank guidance scales by")
    prior = load_prior(stage_dir).to(accelerator.device).eval()
    # Samples of another seed than `pipelines.evaluate` draws (0), so that the figure it reports
    # is a fresh measurement, not the lowest of the noisy ones this choice was made on.
    samples = sweep_samples(n, len(test.images), prior.map_shape)
    rows = guidance_sweep(prior, vqvae, judge, reference, samples, accelerator.device, scales, seed=1)
    for row in rows:
        log.log({f"guidance/{key}": value for key, value in row.items()}, step)
    best = best_guidance(rows)
    set_default_guidance(prior, best)
    save_pretrained_atomic(prior, stage_dir)
    table = ", ".join(f"{row['guidance']:g}: fd {row['fd']:.3g} acc {row['classifier_accuracy']:.2f}" for row in rows)
    return f"guidance {best:g} became the default ({table})"


# Each prior's own flags, refused for another prior. Those that are not sizes are never named as the reason a size does not fit.
NOT_SIZES = ("dropout", "label_every_code", "codebook_inputs")
PRIOR_FLAGS = {
    "transformer": ("width", "layers", "heads", "dropout", "label_every_code", "codebook_inputs"),
    "pixelcnn": ("pixelcnn_channels", "pixelcnn_layers", "kernel_size"),
    "maskgit": ("width", "layers", "heads", "dropout", "passes"),
}


def check_prior_flags(config: TrainConfig) -> None:
    """Refuse flags of another prior, which would otherwise be silently ignored."""
    defaults = PriorConfig()
    own = PRIOR_FLAGS[config.prior]
    for other, names in PRIOR_FLAGS.items():
        changed = [f"--{name.replace('_', '-')} {getattr(config, name)}" for name in names
                   if name not in own and getattr(config, name) not in (None, getattr(defaults, name))]
        if changed:
            raise UserError(f"{', '.join(changed)} only apply to --prior {other}, not {config.prior}; "
                            f"drop {'them' if len(changed) > 1 else 'it'} or choose --prior {other}")


# the run's other folders, which a prior must not overwrite
RUN_FOLDERS = ("vqvae", "codes", "samples", "eval_classifier", "completions")


def check_prior_dir(name: str) -> None:
    """--prior-dir is one folder name inside the run, and none of the run's other folders."""
    if not name or Path(name).name != name or name in (".", "..") or name in RUN_FOLDERS:
        raise UserError(f"--prior-dir {name!r} must name one new folder inside the run, not a path or one of "
                        f"{', '.join(RUN_FOLDERS)}; e.g. --prior-dir prior_maskgit")


def build_prior(config: TrainConfig, codebook_size: int, map_shape, class_names: list[str] | None, source: str,
                codebook: torch.Tensor | None = None, transforms: list[str] | None = None):
    """The prior `config` asks for; `codebook` [K, D] (the VQ-VAE's) feeds the transformer's codebook
    inputs; `transforms` names the transform ids of the train maps (None: the images' own maps only)."""
    common = dict(codebook_size=codebook_size, map_height=map_shape[0], map_width=map_shape[1],
                  num_classes=len(class_names or []), codes_source=source, class_names=class_names,
                  label_dropout=config.label_dropout if class_names else None, transforms=transforms)
    try:
        if config.prior == "transformer":
            vectors = codebook if config.codebook_inputs else None
            prior = PRIORS["transformer"](width=config.width, layers=config.layers, heads=config.heads, dropout=config.dropout,
                                          label_every_code=config.label_every_code and bool(class_names),
                                          code_vector_dim=0 if vectors is None else vectors.shape[1], **common)
            if vectors is not None:
                prior.set_code_vectors(vectors)
            return prior
        if config.prior == "maskgit":
            return PRIORS["maskgit"](width=config.width, layers=config.layers, heads=config.heads, dropout=config.dropout,
                                     default_steps=config.passes, **common)
        return PRIORS["pixelcnn"](channels=config.pixelcnn_channels, layers=config.pixelcnn_layers, kernel_size=config.kernel_size, **common)
    except ValueError as error:  # sizes that do not fit together: an even kernel, too few layers for the maps
        flags = " ".join(f"--{name.replace('_', '-')} {getattr(config, name)}" for name in PRIOR_FLAGS[config.prior] if name not in NOT_SIZES)
        raise UserError(f"{flags}: {error}") from None


def drop_labels(labels: torch.Tensor, null: int, fraction: float) -> torch.Tensor:
    """Replace a random fraction of labels by the null label, so the prior also learns p(codes)."""
    if fraction <= 0:
        return labels
    return torch.where(torch.rand(labels.shape, device=labels.device) < fraction, torch.full_like(labels, null), labels)


@torch.no_grad()
def save_sample_grid(prior, vqvae, count: int, path: Path, seed: int = 0) -> None:
    """Decode `count` samples (cycling through the classes, if any) into a PNG grid."""
    labels = balanced_labels(count, prior.num_classes)
    generator = torch.Generator(device=vqvae.quantizer.codebook.device).manual_seed(seed)
    codes = prior.generate(count, labels, generator=generator)
    images = vqvae.decode(codes).float().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = prior.num_classes if prior.num_classes and count % prior.num_classes == 0 else 8
    save_image(make_grid(images, nrow=nrow, padding=1, pad_value=1.0), path)


def check_config(config: TrainConfig) -> None:
    """Refuse bad flags before anything is read or written, each with one sentence."""
    check_prior_flags(config)
    check_prior_dir(config.prior_dir)
    if config.patience < 0:
        raise UserError(f"--patience {config.patience} must not be negative (0: train every step, however the test NLL moves)")
    if config.token_corruption is not None and not 0 <= config.token_corruption < 1:
        raise UserError(f"--token-corruption {config.token_corruption:g} must be at least 0 (0: the prior reads the true codes) "
                        f"and below 1, e.g. 0.2 (leave it out for the default chosen from the passes over the maps)")
    if config.passes is not None and config.passes < 1:
        raise UserError(f"--passes {config.passes} must be at least 1 (MaskGIT's sampling passes; leave it out for the map size's default, 4 on 8x8 maps)")


def main(argv=None):
    config = parse_config(TrainConfig, argv, description=__doc__.splitlines()[0])
    scales = parse_scales(config.guidance_scales, "--guidance-scales")
    check_config(config)
    masked = config.prior in PARALLEL_PRIORS
    started = time.time()
    run_dir = Path(config.run_dir)
    vqvae = load_vqvae(run_dir).eval()  # before the stage opens: its batch follows the maps' size
    own_maps = open_codes(run_dir / "codes", "train", vqvae=vqvae, transforms=False)  # the images as they are
    metadata = own_maps.metadata
    copies = len(metadata.transforms or [None])
    config, size_choices = apply_prior_presets(config, metadata.map_height, metadata.map_width, len(own_maps), copies)
    transforms = metadata.transforms if config.transformed_maps and copies > 1 else None
    stage_dir = run_dir / config.prior_dir
    accelerator, checkpoints = open_stage(config, stage_dir, "stage two", (run_dir / JUDGE_DIR,))
    vqvae = vqvae.to(accelerator.device)
    conditional = own_maps.labelled and not config.unconditional and bool(metadata.class_names)
    # memory-mapped, or uint16 in memory: int64 one batch at a time
    train_maps, test_maps = (open_codes(run_dir / "codes", split, labels=conditional, transforms=config.transformed_maps)
                             for split in ("train", "test"))
    class_names = metadata.class_names if conditional else None
    num_classes = len(class_names or [])
    prior = build_prior(config, metadata.codebook_size, (metadata.map_height, metadata.map_width), class_names, weights_hash(vqvae),
                        codebook=vqvae.quantizer.codebook.cpu(), transforms=transforms)
    if conditional and not test_maps.labelled:
        accelerator.print("The test split has no labels: its NLL is scored without a class (the null label), the train split's with one.")

    average = weight_average(prior.to(accelerator.device), config.ema_decay) if config.ema_decay > 0 else None
    setup = set_up_training(
        accelerator, config, stage_dir, checkpoints, prior, train_maps, test_maps,
        "stage two", {"best_nll": float("inf"), "evaluations_since_best": 0}, checkpointed=[average] if average is not None else [],
    )
    model, state, log = setup.model, setup.state, setup.log
    if "stopped" in state and not 0 < config.patience <= state["evaluations_since_best"]:
        del state["stopped"]  # a stopped run resumed with more --patience (or 0) trains on from where it stopped
    unwrapped = accelerator.unwrap_model(model)
    accelerator.print(
        f"Stage two: {config.prior} prior of {sum(p.numel() for p in unwrapped.parameters()) / 1e6:.2f}M parameters, "
        f"{len(train_maps)} train maps of {metadata.map_height}x{metadata.map_width} codes (K={metadata.codebook_size})"
        f"{f' ({len(train_maps) // len(transforms)} images as they are and as {len(transforms) - 1} transforms make them)' if transforms else ''}, "
        f"{'conditional on ' + str(num_classes) + ' classes' if num_classes else 'unconditional'}, "
        f"{describe_length(config, setup.steps, len(setup.train_loader))} of {config.batch_size * accelerator.num_processes} maps"
        + (f"; chosen for these maps: {', '.join(size_choices)}" if size_choices else "")
    )

    def train_step(batch):
        labels = batch.get("labels")
        if labels is not None:
            labels = drop_labels(labels, unwrapped.null_label, config.label_dropout)
        codes = batch["codes"]
        inputs = corrupt_codes(codes, config.token_corruption, metadata.codebook_size)
        loss = training_loss(model, codes, labels, config.prior, batch.get("transforms"), inputs)
        name = "masked_loss_bits_per_code" if masked else "nll_bits_per_code"  # MaskGIT's is label-smoothed
        return loss, {name: loss.detach() / LOG2}, len(batch["codes"])

    kept = average.module if average is not None else unwrapped  # what is evaluated and saved

    def evaluate(step):
        nll = test_nll(accelerator, model if average is None else kept, setup.test_loader, masked=masked)
        if masked:  # not a likelihood: no bits/dim bound to go with it
            log.log({"test/masked_nll_bits_per_code": nll}, step)
        else:
            log.log({"test/nll_bits_per_code": nll, "test/prior_bits_per_dim": prior_bits_per_dim(nll, vqvae)}, step)
        improved = nll < state["best_nll"]  # the same on every process: the NLL is gathered from all
        if improved:
            state["best_nll"] = nll
        state["evaluations_since_best"] = 0 if improved else state["evaluations_since_best"] + 1
        if config.patience and state["evaluations_since_best"] >= config.patience:
            state["stopped"] = f"the test NLL has not improved for {config.patience} evaluations"
        if accelerator.is_main_process:
            save_sample_grid(kept.eval(), vqvae, config.grid_samples, stage_dir / "samples" / f"step_{step:07d}.png", config.seed)
            if improved:
                save_pretrained_atomic(kept, stage_dir)
            write_curves(stage_dir / "log.jsonl", stage_dir / "curves.png", CURVES)
        accelerator.wait_for_everyone()
        if masked:
            return f"test masked-code nll {nll:.4f} bits/code"
        return f"test nll {nll:.4f} bits/code, prior {prior_bits_per_dim(nll, vqvae):.4f} bits/dim"

    sooner = "; sooner if the test NLL stops improving (--patience)" if config.patience else ""
    graphable = cuda_graphs_apply(accelerator, config)
    graphed = graphable and not masked
    not_graphed = ("MaskGIT's loss picks its masked codes by boolean indexing, which reads back to the host: --cuda-graph "
                   "does not apply to it" if masked and graphable else None)
    after_step = (lambda step: update_average(average, unwrapped)) if average is not None else None
    captured = run_training_loop(accelerator, config, setup, checkpoints, train_step, evaluate, "stage two", after_step,
                                 hint=f"--max-steps {setup.steps // 2} halves it{sooner}", graph_key=(lambda step: None) if graphed else None)
    guidance = "unconditional prior: no guidance" if not num_classes else "guidance not measured (--guidance-scales '')"
    if accelerator.is_main_process:
        save_pretrained_atomic(unwrapped, stage_dir / "final")
        if num_classes and scales and config.label_dropout <= 0:
            guidance = "guidance not measured: with --label-dropout 0 the prior never learned the null label it needs"
        elif num_classes and scales:
            guidance = choose_guidance(accelerator, run_dir, stage_dir, vqvae, scales, config.guidance_samples, log, state["step"])
    accelerator.wait_for_everyone()
    accelerator.end_training()
    stopped = f" (stopped at step {state['step']} of {setup.steps}: {state['stopped']}; --patience 0 trains every step)" if "stopped" in state else ""
    accelerator.print(
        f"Stage two done in {format_duration(time.time() - started)}: best test {'masked-code ' if masked else ''}nll {state['best_nll']:.4f} bits/code"
        f"{stopped}{describe_graphs(captured, not_graphed)}, prior in {stage_dir}, sample grids in {stage_dir / 'samples'}; {guidance}"
    )


if __name__ == "__main__":
    run_cli(main)
