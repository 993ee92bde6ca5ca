"""Train the VQ-VAE: `accelerate launch stage1_vqvae/train.py` (or plain `python`).

With no flags it trains on Fashion-MNIST into runs/default/vqvae and ends by writing the
code maps to runs/default/codes for stage two.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from stage1_vqvae.atomic import save_pretrained_atomic
from stage1_vqvae.cli import parse_config
from stage1_vqvae.data import DataConfig, collate_batches, load_image_data
from stage1_vqvae.discriminator import (
    PatchDiscriminator, adaptive_weight, feature_matching_loss, generator_adversarial_loss,
    hinge_discriminator_loss, load_lpips, lpips_loss,
)
from stage1_vqvae.dump_codes import dump
from stage1_vqvae.errors import UserError, run_cli
from stage1_vqvae.metrics import reconstruction_metrics, to_unit_range
from stage1_vqvae.model import VQVAE
from stage1_vqvae.training import (
    LoopConfig, batches_per_epoch, describe_length, format_duration, open_stage, run_training_loop, set_up_training,
)


@dataclass
class ModelConfig:
    hidden_channels: int = field(default=128, metadata={"help": "channels at the code-map resolution"})
    res_blocks: int = field(default=2, metadata={"help": "residual blocks in encoder and decoder"})
    res_channels: int = field(default=32, metadata={"help": "width inside a residual block"})
    downsample: int = field(default=4, metadata={"help": "image side / code-map side, a power of two"})
    codebook_size: int = field(default=512, metadata={"help": "number of codes K"})
    code_dim: int = field(default=64, metadata={"help": "dimension of a code vector"})
    codebook: str = field(default="ema", metadata={"help": "how the codebook learns", "choices": ["ema", "loss"]})
    decay: float = field(default=0.99, metadata={"help": "EMA decay of the codebook"})
    beta: float = field(default=0.25, metadata={"help": "commitment loss weight"})
    dead_code_steps: int = field(default=50, metadata={"help": "restart a code unused for this many steps (0: never)"})
    l2_normalize: bool = field(default=False, metadata={"help": "look codes up by cosine similarity"})


@dataclass
class LossConfig:
    """What the decoder is trained to match: pixels, and (after --disc-start) a discriminator."""

    pixel_loss: str = field(default="l1", metadata={"help": "pixel term", "choices": ["l1", "mse", "l1+mse"]})
    disc_start: int = field(default=400, metadata={"help": "optimizer step at which the discriminator starts (-1: never)"})
    disc_weight: float = field(default=0.5, metadata={"help": "factor on the adaptive weight of the adversarial term (0: none)"})
    feature_matching_weight: float = field(default=1.0, metadata={"help": "weight of the discriminator feature-matching loss"})
    lpips_weight: float = field(default=0.0, metadata={"help": "weight of LPIPS (needs the lpips package and its weights)"})
    disc_channels: int = field(default=32, metadata={"help": "discriminator width"})
    disc_lr: float = field(default=4e-4, metadata={"help": "discriminator learning rate (Adam, betas 0.5, 0.9)"})

    @property
    def uses_discriminator(self) -> bool:
        return self.disc_start >= 0 and (self.disc_weight > 0 or self.feature_matching_weight > 0)


def pixel_loss(kind: str, reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    l1 = F.l1_loss(reconstruction, images) if "l1" in kind else 0.0
    mse = F.mse_loss(reconstruction, images) if "mse" in kind else 0.0
    return l1 + mse


@dataclass
class TrainConfig(LoopConfig, DataConfig, ModelConfig, LossConfig):
    # the demo's 2 epochs of Fashion-MNIST: what a small data set gets too
    min_steps: int = field(default=936, metadata={"help": "at least this many optimizer steps, however few --epochs make on a small data set"})
    dump: bool = field(default=True, metadata={"help": "write the code maps at the end"})
    grid_images: int = field(default=16, metadata={"help": "test images in each reconstruction grid"})


def build_model(config: TrainConfig, channels: int) -> VQVAE:
    return VQVAE(
        in_channels=channels, image_size=config.image_size, hidden_channels=config.hidden_channels,
        res_blocks=config.res_blocks, res_channels=config.res_channels, downsample=config.downsample,
        codebook_size=config.codebook_size, code_dim=config.code_dim, beta=config.beta,
        ema=config.codebook == "ema", decay=config.decay, dead_code_steps=config.dead_code_steps,
        l2_normalize=config.l2_normalize,
    )


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
    if min(config.disc_weight, config.feature_matching_weight, config.lpips_weight) < 0:
        raise UserError("--disc-weight, --feature-matching-weight and --lpips-weight must not be negative; 0 turns a term off")
    if config.disc_channels < 1:
        raise UserError(f"--disc-channels {config.disc_channels} must be at least 1 (32 is the default); use --disc-start -1 for no discriminator")


def save_reconstruction_grid(model, images: torch.Tensor, path: Path) -> None:
    """Originals in the top row(s), their reconstructions below."""
    originals = to_unit_range(images)
    reconstructions = model.decode(model.encode(originals)).float()
    nrow = min(8, len(originals))
    grid = make_grid(torch.cat([originals, reconstructions]).cpu(), nrow=nrow, padding=1, pad_value=1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)


def main(argv=None):
    config = parse_config(TrainConfig, argv, description=__doc__.splitlines()[0])
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
    accelerator, checkpoints = open_stage(config, stage_dir, "stage one")
    lpips_network = lpips_network.to(accelerator.device) if lpips_network is not None else None
    with accelerator.main_process_first():  # a download or cache is built once, then read by the others
        data = load_image_data(config)
    companions = []
    if config.uses_discriminator:
        discriminator = PatchDiscriminator(data.channels, config.disc_channels)
        companions = [(discriminator, torch.optim.Adam(discriminator.parameters(), lr=config.disc_lr, betas=(0.5, 0.9)))]
    setup = set_up_training(
        accelerator, config, stage_dir, checkpoints, build_model(config, data.channels), data.train, data.test,
        "stage one", {"best_mse": float("inf")}, companions,
    )
    model, state, log = setup.model, setup.state, setup.log
    unwrapped = accelerator.unwrap_model(model)
    last_layer = unwrapped.decoder[-1].weight
    discriminator = setup.companions[0][0] if setup.companions else None
    bare_discriminator = accelerator.unwrap_model(discriminator) if discriminator is not None else None
    grid_images = collate_batches([data.test[i] for i in range(min(config.grid_images, len(data.test)))])["images"]
    grid_images = grid_images.to(accelerator.device)
    accelerator.print(
        f"Stage one: {sum(p.numel() for p in unwrapped.parameters()) / 1e6:.2f}M parameters, "
        f"{'a stream of' if config.streaming else len(data.train)} train images from {data.source}, "
        f"{describe_length(config, setup.steps, batches_per_epoch(setup.train_loader))} "
        f"of {config.batch_size * accelerator.num_processes} images"
    )

    def train_step(batch):
        unwrapped.quantizer.defer_updates = not accelerator.sync_gradients  # codebook learns once per optimizer step
        images = to_unit_range(batch["images"])
        output = model(images)
        reconstruction, quantizer = output.reconstruction.float(), output.quantizer
        metrics = {"mse": output.reconstruction_loss, "commitment": quantizer.commitment,
                   "perplexity": quantizer.perplexity, "codes_used": quantizer.usage}
        reconstruction_loss = pixel_loss(config.pixel_loss, reconstruction, images)
        metrics["pixel_loss"] = reconstruction_loss.detach()
        if lpips_network is not None:
            reconstruction_loss = reconstruction_loss + config.lpips_weight * lpips_loss(lpips_network, reconstruction, images)
        if discriminator is None or state["step"] < config.disc_start:
            return reconstruction_loss + quantizer.loss, metrics, len(images)
        return adversarial_step(images, reconstruction, reconstruction_loss, quantizer.loss, metrics), metrics, len(images)

    def adversarial_step(images, reconstruction, reconstruction_loss, quantizer_loss, metrics):
        """The discriminator learns from real against detached reconstructions; the decoder
        learns from a copy of the discriminator whose weights take no gradient."""
        with accelerator.autocast():
            logits, features = discriminator(torch.cat([images, reconstruction.detach()]))
        real_logits, fake_logits = logits.float().chunk(2)
        real_features = [feature.chunk(2)[0] for feature in features]
        disc_loss = hinge_discriminator_loss(real_logits, fake_logits)
        frozen = {name: p.detach() for name, p in bare_discriminator.named_parameters()}
        with accelerator.autocast():
            logits, features = torch.func.functional_call(bare_discriminator, frozen, (reconstruction,))
        if config.feature_matching_weight > 0:
            matching = feature_matching_loss(features, real_features)
            reconstruction_loss = reconstruction_loss + config.feature_matching_weight * matching
            metrics["feature_matching"] = matching.detach()
        loss = reconstruction_loss + quantizer_loss + disc_loss
        if config.disc_weight > 0:
            adversarial = generator_adversarial_loss(logits)
            weight = config.disc_weight * adaptive_weight(reconstruction_loss, adversarial, last_layer)
            loss = loss + weight * adversarial
            metrics.update(adversarial=adversarial.detach(), adaptive_weight=weight)
        metrics.update(disc_loss=disc_loss.detach(), real_logit=real_logits.mean().detach(), fake_logit=fake_logits.mean().detach())
        return loss

    def evaluate(step):
        metrics = reconstruction_metrics(accelerator, model, setup.test_loader)
        log.log({f"test/{k}": v for k, v in metrics.items()}, step)
        if accelerator.is_main_process:
            save_reconstruction_grid(unwrapped, grid_images, stage_dir / "reconstructions" / f"step_{step:07d}.png")
            # Once the discriminator trades MSE for sharpness, MSE no longer ranks weights: the newest are kept.
            adversarial = bool(setup.companions) and step > config.disc_start
            if adversarial or metrics["mse"] < state["best_mse"]:
                state["best_mse"] = metrics["mse"]
                save_pretrained_atomic(unwrapped, stage_dir)
        accelerator.wait_for_everyone()
        return f"test mse {metrics['mse']:.5f}, psnr {metrics['psnr']:.2f} dB, codebook used {metrics['codebook_usage']:.1%}"

    run_training_loop(accelerator, config, setup, checkpoints, train_step, evaluate, "stage one")

    if accelerator.is_main_process:
        save_pretrained_atomic(unwrapped, stage_dir / "final")
    accelerator.wait_for_everyone()
    summary = f"test mse {state['best_mse']:.5f} of the weights kept in {stage_dir}"
    if config.dump:
        best = type(unwrapped).from_pretrained(str(stage_dir)).to(accelerator.device)
        summary += f", code maps in {dump(accelerator, best, data, run_dir)}"
    accelerator.end_training()
    accelerator.print(f"Stage one done in {format_duration(time.time() - started)}: {summary}")


if __name__ == "__main__":
    run_cli(main)
