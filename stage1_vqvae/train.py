"""Train the VQ-VAE: `accelerate launch stage1_vqvae/train.py` (or plain `python`).

With no flags it trains on Fashion-MNIST into runs/default/vqvae and ends by writing the
code maps to runs/default/codes for stage two.
"""

import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar

import torch
from torchvision.utils import make_grid, save_image

from foundation.atomic import save_pretrained_atomic
from foundation.cli import parse_config
from foundation.curves import write_curves
from foundation.data import DataConfig, collate_batches, load_image_data
from foundation.errors import UserError, run_cli
from foundation.estimate import format_duration
from foundation.judge import JUDGE_DIR
from foundation.training import LoopConfig, batches_per_epoch, cuda_graphs_apply, describe_graphs, describe_length, open_stage, run_training_loop, set_up_training
from stage1_vqvae.discriminator import load_lpips
from stage1_vqvae.dump_codes import describe_dump, dump, parse_map_transforms
from stage1_vqvae.gan_health import diagnose
from stage1_vqvae.fsq import LEVELS_FOR_CODEBOOK, levels_for
from stage1_vqvae.gan_loss import GANLoss, LossConfig, build_discriminator
from stage1_vqvae.metrics import reconstruction_metrics, to_unit_range
from stage1_vqvae.model import VQVAE, ModelConfig
from stage1_vqvae.size_presets import DATA_PRESETS, apply_data_presets, apply_size_presets
from stage1_vqvae.weight_average import update_average, weight_average


# The panels of vqvae/curves.png
CURVES = {"MSE": ["train/mse", "test/mse"], "share of the codebook in use": ["train/codes_used", "test/codebook_usage"],
          "discriminator's hinge loss": ["train/disc_loss"]}


@dataclass
class TrainConfig(LoopConfig, DataConfig, ModelConfig, LossConfig):
    # how runs saved before these flags existed trained, for --resume's comparison
    FLAGS_ADDED_SINCE: ClassVar[dict] = {"disc_augment": "none", "disc_norm": "group", "adaptive_weight": True,
                                         "r1_weight": 0.0, "r1_every": 4, "ema_decay": 0.0, "clean_feature_matching": False,
                                         "adam_beta2": 0.999, "gan_ramp_steps": 0, "disc_head_start": 0,
                                         "architecture": "conv", "disc_lr_decay": False, "lr_rewarm_steps": 0,
                                         "dead_code_share": 0.0, "quantizer": "vq", "fsq_levels": None,
                                         "vq_gradient": "straight-through"}
    # each says what it warms up: the learning rate at the start, the GAN terms' weight, the rate again at --disc-start
    RENAMED_FLAGS: ClassVar[dict] = {**LoopConfig.RENAMED_FLAGS, "--gan-warmup": "--gan-ramp-steps",
                                     "--gan-lr-warmup": "--lr-rewarm-steps"}
    # left out (None), chosen from the train split's size once it is loaded (size_presets.py)
    CHOSEN_FROM_DATA: ClassVar[tuple] = tuple(DATA_PRESETS)
    batch_size: int | None = field(default=None, metadata={"help": "images per process per step (default: 128 up to 64x64 "
                                                                    "images, fewer for larger ones)"})
    min_steps: int | None = field(default=None, metadata={"help": "at least this many optimizer steps, however few --epochs make on a "
                                                                  "small data set (default: 1404 below 10,000 train images of at most "
                                                                  "32 pixels, else 936)"})
    lr_warmup_steps: int | None = field(default=None, metadata={"help": "linear warm-up before the cosine decay, at most a quarter of "
                                                                     "the run's steps (default: 200 on 10,000 train images or more, "
                                                                     "else 100)"})
    # 0.95, not Adam's 0.999: a second moment that averages over ~1000 steps still remembers the
    # pixel loss's small gradients when the discriminator's terms start, and the updates swell
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW's second-moment decay for the VQ-VAE"})
    # After a small set's head start the decoder first reads a discriminator that has learnt, and
    # Adam's second moment still holds the pixel term's small gradients: at full rate its steps
    # swell for a few dozen steps, the encoder jumps and part of the codebook falls idle
    lr_rewarm_steps: int | None = field(default=None, metadata={"help": "the VQ-VAE's learning rate warms up again over this many "
                                                                        "steps from --disc-start, when the decoder first reads the "
                                                                        "discriminator (0: no; default: 100 below 10,000 train "
                                                                        "images of at most 32 pixels, else 0)"})
    dead_code_share: float | None = field(default=None, metadata={"help": "a step counts towards --dead-code-steps for a code "
                                                                        "used by at most this share of an even share of the "
                                                                        "batch's positions (0: only for a code not used at all; "
                                                                        "default: 0.25 below 10,000 train images of at most 32 "
                                                                        "pixels, else 0)"})
    ema_decay: float = field(default=0.0, metadata={"help": "keep an EMA of the weights with this decay and export it (0: the trained weights)"})
    dump: bool = field(default=True, metadata={"help": "write the code maps at the end"})
    map_transforms: str | None = field(default=None, metadata={"help": "the dump also encodes the train images as these transforms "
                                                                       "make them, for stage two (none, or a comma-separated list "
                                                                       "of flip, rotations, dihedral, colours, zooms or single "
                                                                       "transforms such as rot90; default: chosen from the data)"})
    grid_images: int = field(default=16, metadata={"help": "test images in each reconstruction grid"})


# what only the vector quantizer's codebook reads; under FSQ one changed from its default is refused
VQ_ONLY_FLAGS = ("codebook", "decay", "beta", "l2_normalize", "dead_code_steps", "dead_code_share")
FLAG_DEFAULTS = {field.name: field.default for field in fields(TrainConfig)}


def build_model(config: TrainConfig, channels: int) -> VQVAE:
    return VQVAE(
        in_channels=channels, image_size=config.image_size, hidden_channels=config.hidden_channels,
        res_blocks=config.res_blocks, res_channels=config.res_channels, downsample=config.downsample,
        codebook_size=config.codebook_size, code_dim=config.code_dim, beta=config.beta,
        ema=config.codebook == "ema", decay=config.decay, dead_code_steps=config.dead_code_steps,
        l2_normalize=config.l2_normalize, dead_code_share=config.dead_code_share, architecture=config.architecture,
        quantizer=config.quantizer, fsq_levels=parse_fsq_levels(config), vq_gradient=config.vq_gradient,
    )


def parse_fsq_levels(config: TrainConfig) -> list[int] | None:
    """--fsq-levels 8,5,5,5 -> [8, 5, 5, 5]; None for the vector quantizer or levels chosen from --codebook-size."""
    if config.quantizer != "fsq" or config.fsq_levels is None:
        return None
    try:
        levels = [int(level) for level in config.fsq_levels.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 2:
        raise UserError(f"--fsq-levels {config.fsq_levels} is not a comma-separated list of level counts of 2 or more, "
                        f"e.g. 8,5,5,5")
    return levels


def check_config(config: TrainConfig) -> None:
    if config.downsample < 2 or config.downsample & (config.downsample - 1):
        raise UserError(f"--downsample {config.downsample} is not a power of two; use 2, 4, 8 or 16")
    if config.image_size % config.downsample:
        nearest = max(config.downsample, round(config.image_size / config.downsample) * config.downsample)
        raise UserError(
            f"--image-size {config.image_size} cannot be divided by --downsample {config.downsample}; "
            f"use a multiple of {config.downsample}, e.g. {nearest}"
        )
    if config.batch_size < 1 or config.codebook_size < 2:
        raise UserError("--batch-size must be at least 1 and --codebook-size at least 2")
    if config.quantizer == "fsq" and parse_fsq_levels(config) is None and levels_for(config.codebook_size) is None:
        raise UserError(f"--quantizer fsq has no levels of its own for --codebook-size {config.codebook_size}; give them "
                        f"(--fsq-levels 8,5,5,5 makes 1,000 codes), or a size of {', '.join(map(str, LEVELS_FOR_CODEBOOK))}")
    if config.fsq_levels is not None and config.quantizer != "fsq":
        raise UserError(f"--fsq-levels {config.fsq_levels} sets the levels of --quantizer fsq, but this run's quantizer is "
                        f"{config.quantizer}; add --quantizer fsq, or drop --fsq-levels")
    vq_only = [name for name in VQ_ONLY_FLAGS if getattr(config, name) != FLAG_DEFAULTS[name]]
    if config.quantizer == "fsq" and vq_only:
        flags = ", ".join("--" + name.replace("_", "-") for name in vq_only)
        raise UserError(f"{flags} tune{'s' if len(vq_only) == 1 else ''} the vector quantizer's codebook, but --quantizer fsq "
                        f"rounds without one; drop {flags}, or train with --quantizer vq")
    if config.vq_gradient != "straight-through" and config.quantizer != "vq":
        raise UserError(f"--vq-gradient {config.vq_gradient} changes how the vector quantizer passes gradients, but this "
                        f"run's quantizer is {config.quantizer}, which rounds without a codebook; drop --vq-gradient")
    if min(config.disc_weight, config.feature_matching_weight, config.lpips_weight) < 0:
        raise UserError("--disc-weight, --feature-matching-weight and --lpips-weight must not be negative; 0 turns a term off")
    if config.disc_channels < 1:
        raise UserError(f"--disc-channels {config.disc_channels} must be at least 1 (32 is the default); use --disc-start -1 for no discriminator")
    if config.r1_weight < 0 or config.r1_every < 1:
        raise UserError(f"--r1-weight {config.r1_weight} must not be negative (0 turns it off) and --r1-every {config.r1_every} must be at least 1")
    if config.disc_head_start is not None and (config.disc_head_start < 0 or config.disc_head_start > max(0, config.disc_start)):
        raise UserError(f"--disc-head-start {config.disc_head_start} must be between 0 and --disc-start ({config.disc_start})")
    if config.gan_ramp_steps < 0:
        raise UserError(f"--gan-ramp-steps {config.gan_ramp_steps} must not be negative (0: the GAN terms at full strength at once)")
    if config.lr_rewarm_steps is not None and config.lr_rewarm_steps < 0:
        raise UserError(f"--lr-rewarm-steps {config.lr_rewarm_steps} must not be negative (0: no second warm-up when the decoder "
                        "first reads the discriminator)")
    if config.lr_rewarm_steps is not None and not config.uses_discriminator:
        raise UserError(f"--lr-rewarm-steps {config.lr_rewarm_steps} warms the learning rate up again when the discriminator starts, "
                        f"but this run trains without one (--disc-start {config.disc_start}, --disc-weight {config.disc_weight:g}, "
                        f"--feature-matching-weight {config.feature_matching_weight:g}); drop --lr-rewarm-steps, or train with a discriminator")
    if config.dead_code_share is not None and config.dead_code_steps <= 0:
        raise UserError(f"--dead-code-share {config.dead_code_share} says which codes count as idle for restarts, but "
                        f"--dead-code-steps {config.dead_code_steps} restarts none; drop --dead-code-share, or give "
                        f"--dead-code-steps a number of steps (e.g. 50)")
    if config.dead_code_share is not None and not 0 <= config.dead_code_share < 1:
        raise UserError(f"--dead-code-share {config.dead_code_share} must be at least 0 (0: restart only unused codes) and below "
                        "1, e.g. 0.25")
    if not 0 <= config.adam_beta2 < 1:
        raise UserError(f"--adam-beta2 {config.adam_beta2} must be at least 0 and below 1, e.g. 0.99")
    if not 0 <= config.ema_decay < 1:
        raise UserError(f"--ema-decay {config.ema_decay} must be at least 0 (0: no average) and below 1, e.g. 0.999")


def save_reconstruction_grid(model, images: torch.Tensor, path: Path) -> None:
    """Originals in the top row(s), their reconstructions below."""
    originals = to_unit_range(images)
    reconstructions = model.decode(model.encode(originals)).float()
    nrow = min(8, len(originals))
    grid = make_grid(torch.cat([originals, reconstructions]).cpu(), nrow=nrow, padding=1, pad_value=1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)


def main(argv=None):
    config, size_choices = apply_size_presets(parse_config(TrainConfig, argv, description=__doc__.splitlines()[0]))
    check_config(config)
    started = time.time()
    run_dir = Path(config.run_dir)
    stage_dir = run_dir / "vqvae"
    lpips_network = None
    if config.lpips_weight > 0:
        try:
            lpips_network = load_lpips("cpu")
        except ValueError as error:
            raise UserError(f"--lpips-weight {config.lpips_weight} needs LPIPS, but {error}; install it where its weights "
                            "can be downloaded once, or use --lpips-weight 0 (feature matching needs no weights)") from None
    accelerator, checkpoints = open_stage(config, stage_dir, "stage one", (run_dir / "codes", run_dir / JUDGE_DIR))
    lpips_network = lpips_network.to(accelerator.device) if lpips_network is not None else None
    with accelerator.main_process_first():  # a download or cache is built once, then read by the others
        data = load_image_data(config)
    train_images = None if config.streaming else len(data.train)
    config, data_choices = apply_data_presets(config, train_images)  # recorded, and compared on --resume, as chosen
    size_choices += data_choices
    transforms = parse_map_transforms(config.map_transforms, data.channels)
    head_start = config.disc_head_start or 0  # None without a discriminator
    model = build_model(config, data.channels).to(accelerator.device)
    average = weight_average(model, config.ema_decay) if config.ema_decay > 0 else None
    discriminator = build_discriminator(config, data.channels)
    companions = [(discriminator, {"lr": config.disc_lr, "betas": (0.5, 0.9), "scheduled": config.disc_lr_decay})] if discriminator is not None else []
    loss = GANLoss(config, None, lpips_network, accelerator.autocast)
    checkpointed = [holder for holder in (average, loss.adaptive) if holder is not None]  # restored on --resume
    setup = set_up_training(
        accelerator, config, stage_dir, checkpoints, model, data.train, data.test,
        "stage one", {"kept_mse": float("inf")}, companions, checkpointed, betas=(0.9, config.adam_beta2),
        rewarm_at=config.disc_start if config.uses_discriminator else None, rewarm_steps=config.lr_rewarm_steps or 0,
    )
    model, state, log = setup.model, setup.state, setup.log
    if "best_mse" in state:  # a checkpoint written before the name said what it holds
        state["kept_mse"] = state.pop("best_mse")
    unwrapped = accelerator.unwrap_model(model)
    kept = average.module if average is not None else unwrapped  # what is evaluated, exported and dumped
    last_layer = unwrapped.decoder[-1].weight
    loss.discriminator = setup.companions[0] if setup.companions else None  # prepared: wrapped for several processes
    grid_images = collate_batches([data.test[i] for i in range(min(config.grid_images, len(data.test)))])["images"]
    grid_images = grid_images.to(accelerator.device)
    accelerator.print(
        f"Stage one: {sum(p.numel() for p in unwrapped.parameters()) / 1e6:.2f}M parameters, "
        f"{'a stream of' if config.streaming else len(data.train)} train images from {data.source}, "
        f"{describe_length(config, setup.steps, batches_per_epoch(setup.train_loader))} "
        f"of {config.batch_size * accelerator.num_processes} images"
        + (f"; chosen for this data: {', '.join(size_choices)}" if size_choices else "")
    )

    def train_step(batch):
        unwrapped.quantizer.defer_updates = not accelerator.sync_gradients  # codebook learns once per optimizer step
        images = to_unit_range(batch["images"])
        output = model(images)
        quantizer = output.quantizer
        reconstruction_loss, metrics = loss(images, output.reconstruction.float(), last_layer, state["step"])
        metrics.update(mse=output.reconstruction_loss, commitment=quantizer.commitment,
                       perplexity=quantizer.perplexity, codes_used=quantizer.usage)
        return reconstruction_loss + quantizer.loss, metrics, len(images)

    def evaluate(step):
        metrics = reconstruction_metrics(accelerator, kept, setup.test_loader)
        log.log({f"test/{k}": v for k, v in metrics.items()}, step)
        if accelerator.is_main_process:
            save_reconstruction_grid(kept, grid_images, stage_dir / "reconstructions" / f"step_{step:07d}.png")
            # Once the discriminator trades MSE for sharpness, MSE no longer ranks weights: the newest are
            # kept. kept_mse: the test MSE of the weights kept (the lowest before then, the newest after).
            adversarial = discriminator is not None and step > config.disc_start
            if adversarial or metrics["mse"] < state["kept_mse"]:
                state["kept_mse"] = metrics["mse"]
                save_pretrained_atomic(kept, stage_dir)
            write_curves(stage_dir / "log.jsonl", stage_dir / "curves.png", CURVES)
        accelerator.wait_for_everyone()
        return f"test mse {metrics['mse']:.5f}, psnr {metrics['psnr']:.2f} dB, codebook used {metrics['codebook_usage']:.1%}"

    after_step = (lambda step: update_average(average, unwrapped)) if average is not None else None
    # the discriminator's own steps start at disc_start - head_start, the decoder's GAN terms at disc_start
    pace_changes = (config.disc_start - head_start, config.disc_start) if discriminator is not None else ()
    captured = run_training_loop(accelerator, config, setup, checkpoints, train_step, evaluate, "stage one", after_step,
                                 hint=f"--max-steps {setup.steps // 2} halves it", estimate_also_at=pace_changes,
                                 graph_key=loss.phase if cuda_graphs_apply(accelerator, config) else None)

    if accelerator.is_main_process:
        save_pretrained_atomic(unwrapped, stage_dir / "final")
    accelerator.wait_for_everyone()
    summary = f"test mse {state['kept_mse']:.5f} of the weights kept in {stage_dir}"
    summary += describe_graphs(captured)
    if config.dump:
        best = type(kept).from_pretrained(str(stage_dir)).to(accelerator.device)
        summary += f", {describe_dump(dump(accelerator, best, data, run_dir, transforms=transforms))}"
    accelerator.end_training()
    warnings = diagnose(stage_dir / "log.jsonl", config.disc_start) if accelerator.is_main_process else []
    accelerator.print(f"Stage one done in {format_duration(time.time() - started)}: {summary}" + "".join(f"; but {w}" for w in warnings))


if __name__ == "__main__":
    run_cli(main)
