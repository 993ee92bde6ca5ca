"""Stage one's choices that follow the image size and the data set's size, unless a flag sets them.

- The downsample factor keeps the code map at most 16x16 (8x8 at 32 pixels): the prior models
  one code after another, so its cost grows with the map's area, and 16x16 is where VQGAN,
  MaskGIT and LlamaGen work at 256 pixels.
- The batch keeps a step's pixels near those of 128 images of 64x64: a step's memory and time
  grow with the pixels, and 128 images of 256x256 would take a few gigabytes and seconds a step.
- On a set of fewer than 10,000 train images the discriminator trains alone for 100 steps
  before the decoder reads it; on a larger one both start together. On a few thousand images
  a discriminator whose features are still random, pulling at full strength, empties part of
  the codebook and leaves grain; on Fashion-MNIST's 60,000 the head start only costs sharpness
  (docs/stage-one-gan.md has both).
- A set of fewer than 10,000 train images of at most 32 pixels trains at least 1,404 steps
  rather than the demo's 936: the icons and the emoji were still improving at step 936, and
  1,404 steps lowered their test MSE by a fifth (about 4 minutes here against 2.5). At 64 pixels
  and above a step costs four times as much on a CPU, and the floor stays 936.
- On a set of fewer than 10,000 train images of at most 32 pixels (those that train 1,404
  steps) the VQ-VAE's learning rate warms up again over 100 steps when the decoder first reads
  the discriminator. The head start has taught the discriminator by then, its gradients are at
  once several times the pixel term's, and at the longer run's still high rate the encoder
  jumped and up to a quarter of the icons' codebook fell idle. On Fashion-MNIST, where both
  start together, the slower decoder let the discriminator run ahead and blurred three seeds
  of four; at 64 pixels (936 steps) the codebook dipped later instead, and deeper.
- On 10,000 train images or more the learning rate warms up over 200 steps, not 100. At the
  peak rate some Fashion-MNIST seeds' pixel loss jumped (seeds 2 and 3 near step 110): they met
  the discriminator behind the others and ended blurrier (rFD 5.91x on seed 3; 3.80x with the
  longer warm-up). On the icons the longer warm-up cost MSE and codebook, so a small set keeps 100.
- On a set of fewer than 10,000 train images the dump also writes the maps of the images' mirror
  images, each with its transform's id (`map_transforms.py`); stage two decides whether its steps
  have the time to learn from them. On the 1,429 icons a prior that learned the mirror images too,
  told which maps were mirrored, drew more recognisable icons nearer the data. Quarter turns (the
  eight orientations of distribution augmentation) made the icons' samples less recognisable and
  the emoji's prior worse; zooms beside the mirror images lowered the icons' NLL but did not make
  their samples more recognisable, and took steps the emoji needed (docs/small-sets.md). The
  mirror images cost the dump seconds and a megabyte or two.
- On those same small sets of small images a code is restarted once it has held at most a
  quarter of an even share of each batch for `--dead-code-steps` steps, not only once it has
  held nothing. In the adversarial phase the encoder moves, and codes it is leaving keep a stray
  vector or two per batch for many steps: at step 500 of an icons run 100 of the 512 codes were
  missing from the test split, 64 of them used by the train split, rarely (about the number a
  random sample of the test split's size would miss). Fashion-MNIST's codebook never dipped;
  with the share it did a little, and its rFD was worse over four seeds (3.28x against 3.03x).
"""

from dataclasses import replace

MAX_MAP_SIDE = 16
MIN_DOWNSAMPLE = 4
PIXELS_PER_STEP = 128 * 64 * 64
BATCH_RANGE = (16, 128)
SMALL_SET = 10_000
SMALL_SET_HEAD_START = 100
MIN_STEPS = 936  # the demo's 2 epochs of Fashion-MNIST
SMALL_SET_MIN_STEPS = 1404
SMALL_SET_MIN_STEPS_MAX_SIZE = 32
LR_WARMUP_STEPS, SMALL_SET_LR_WARMUP_STEPS = 200, 100
SMALL_SET_LR_REWARM_STEPS = 100
SMALL_SET_DEAD_CODE_SHARE = 0.25
SMALL_SET_MAP_TRANSFORMS = "flip"


def preset_downsample(image_size: int) -> int:
    """The smallest power of two from 4 on that leaves a map of at most 16 codes a side."""
    downsample = MIN_DOWNSAMPLE
    while image_size / downsample > MAX_MAP_SIDE:
        downsample *= 2
    return downsample


def preset_batch_size(image_size: int) -> int:
    low, high = BATCH_RANGE
    return max(low, min(high, PIXELS_PER_STEP // (image_size * image_size)))


def apply_size_presets(config):
    """The config with every size left unset (None) chosen from --image-size, and one reason a
    choice for the summary line."""
    chosen, reasons = {}, []
    if config.downsample is None:
        chosen["downsample"] = preset_downsample(config.image_size)
        side = config.image_size // chosen["downsample"]
        reasons.append(f"--downsample {chosen['downsample']} (code maps of {side}x{side}: the prior's cost grows with the map, "
                       f"kept at most {MAX_MAP_SIDE}x{MAX_MAP_SIDE})")
    if config.batch_size is None:
        chosen["batch_size"] = preset_batch_size(config.image_size)
        if chosen["batch_size"] != BATCH_RANGE[1]:
            reasons.append(f"--batch-size {chosen['batch_size']} (a step's memory and time grow with the pixels)")
    return replace(config, **chosen), reasons


def is_small_set(train_images: int | None) -> bool:
    """Fewer than SMALL_SET train images; a stream (None), of unknown size, counts as large."""
    return train_images is not None and train_images < SMALL_SET


def trains_longer(train_images: int | None, image_size: int) -> bool:
    """A small set of images of at most SMALL_SET_MIN_STEPS_MAX_SIZE pixels: it trains
    SMALL_SET_MIN_STEPS, and its learning rate warms up again for the discriminator."""
    return is_small_set(train_images) and image_size <= SMALL_SET_MIN_STEPS_MAX_SIZE


def preset_disc_head_start(train_images: int | None, disc_start: int) -> tuple[int, str]:
    """--disc-head-start for a train split of this many images (None: a stream, of unknown size), and why."""
    if is_small_set(train_images):
        steps = min(SMALL_SET_HEAD_START, disc_start)
        return steps, (f"--disc-head-start {steps} (fewer than {SMALL_SET:,} train images: the discriminator learns alone "
                       f"first, so that its first pull on the decoder does not scatter the codebook)")
    return 0, f"--disc-head-start 0 (at least {SMALL_SET:,} train images: the discriminator and its pull on the decoder start together)"


def preset_min_steps(train_images: int | None, image_size: int) -> tuple[int, str | None]:
    """--min-steps for a train split of this many images (None: a stream) at this size, and why
    where it is not the demo's."""
    if trains_longer(train_images, image_size):
        return SMALL_SET_MIN_STEPS, (f"--min-steps {SMALL_SET_MIN_STEPS} (fewer than {SMALL_SET:,} train images: a small set is "
                                     f"still improving at {MIN_STEPS} steps)")
    if not is_small_set(train_images):
        return MIN_STEPS, None
    return MIN_STEPS, (f"--min-steps {MIN_STEPS} (at {image_size} pixels a step is costly on a CPU; --min-steps "
                       f"{SMALL_SET_MIN_STEPS} gives a small set cleaner reconstructions in 1.5 times the time)")


def preset_lr_warmup_steps(train_images: int | None) -> tuple[int, str]:
    """--lr-warmup-steps for a train split of this many images (None: a stream), and why."""
    if is_small_set(train_images):
        return SMALL_SET_LR_WARMUP_STEPS, f"--lr-warmup-steps {SMALL_SET_LR_WARMUP_STEPS} (fewer than {SMALL_SET:,} train images)"
    return LR_WARMUP_STEPS, (f"--lr-warmup-steps {LR_WARMUP_STEPS} (at least {SMALL_SET:,} train images: a slower climb to the peak "
                          f"learning rate, where some seeds' pixel loss jumps)")


def preset_lr_rewarm_steps(train_images: int | None, image_size: int) -> tuple[int, str]:
    """--lr-rewarm-steps for a train split of this many images (None: a stream) at this size, and why."""
    if trains_longer(train_images, image_size):
        return SMALL_SET_LR_REWARM_STEPS, (f"--lr-rewarm-steps {SMALL_SET_LR_REWARM_STEPS} (fewer than {SMALL_SET:,} train images of at "
                                         f"most {SMALL_SET_MIN_STEPS_MAX_SIZE} pixels: on their longer run the rate is still high "
                                         f"when the decoder first reads the discriminator)")
    return 0, "--lr-rewarm-steps 0 (the decoder reads the discriminator at the learning rate's cosine)"


def preset_dead_code_share(train_images: int | None, image_size: int) -> tuple[float, str]:
    """--dead-code-share for a train split of this many images (None: a stream) at this size, and why."""
    if trains_longer(train_images, image_size):
        return SMALL_SET_DEAD_CODE_SHARE, (f"--dead-code-share {SMALL_SET_DEAD_CODE_SHARE} (fewer than {SMALL_SET:,} train images of "
                                           f"at most {SMALL_SET_MIN_STEPS_MAX_SIZE} pixels: codes the moving encoder is leaving "
                                           f"are restarted before they are quite unused)")
    return 0.0, "--dead-code-share 0 (only unused codes are restarted)"


def preset_map_transforms(train_images: int | None) -> tuple[str, str]:
    """--map-transforms for a train split of this many images (None: a stream), and why."""
    if is_small_set(train_images) and SMALL_SET_MAP_TRANSFORMS != "none":
        return SMALL_SET_MAP_TRANSFORMS, (f"--map-transforms {SMALL_SET_MAP_TRANSFORMS} (fewer than {SMALL_SET:,} train images: "
                                          f"the dump also writes their mirror images, which stage two learns from, each told "
                                          f"it is mirrored, where its steps have the time)")
    return "none", f"--map-transforms none (at least {SMALL_SET:,} train images: enough distinct maps for stage two)"


# Each choice stage one makes from its train split's size, applied where its flag was left out:
# (the flag's field, what it is then, and why, or None where the summary need not say). A
# choice that does not apply to the run (a discriminator's, without one) stays None.
DATA_PRESETS = {
    "disc_head_start": lambda config, images: (
        preset_disc_head_start(images, config.disc_start) if config.uses_discriminator else (None, None)),
    "lr_rewarm_steps": lambda config, images: (
        preset_lr_rewarm_steps(images, config.image_size) if config.uses_discriminator else (None, None)),
    "dead_code_share": lambda config, images: (
        said_if(preset_dead_code_share(images, config.image_size), lambda share: share > 0)
        if config.dead_code_steps > 0 and config.quantizer == "vq" else (0.0, None)),  # FSQ restarts nothing
    "lr_warmup_steps": lambda config, images: preset_lr_warmup_steps(images),
    "map_transforms": lambda config, images: said_if(preset_map_transforms(images), lambda chosen: chosen != "none"),
    "min_steps": lambda config, images: said_if(preset_min_steps(images, config.image_size), lambda _: config.max_steps is None),
}


def said_if(choice: tuple, worth_saying) -> tuple:
    value, why = choice
    return value, why if worth_saying(value) else None


def apply_data_presets(config, train_images: int | None):
    """The config with every DATA_PRESETS flag left out (None) chosen for a train split of this
    many images (None: a stream, of unknown size), and the reasons worth a summary's words."""
    chosen, reasons = {}, []
    for name, preset in DATA_PRESETS.items():
        if getattr(config, name) is None:
            value, why = preset(config, train_images)
            if value is not None:
                chosen[name] = value
            if why:
                reasons.append(why)
    return replace(config, **chosen), reasons
