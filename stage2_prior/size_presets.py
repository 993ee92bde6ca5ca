"""Stage two's batch follows the code map's size; whether it learns from the dump's transformed
copies of the train images, its dropout, its token corruption and how often it is evaluated follow
the passes over the maps, unless --batch-size, --(no-)transformed-maps, --dropout,
--token-corruption and --eval-every set them.

The prior reads every code of a map in one step, so a step's time grows with the map's area:
on two cores 32 maps of 16x16 codes (a 64-pixel image at downsample 4) took 0.21 s a step, five
times the demo's 32 maps of 8x8 (44 ms). With the demo's 2,048 codes a step (8 maps of 16x16)
a step takes 68 ms (attention grows with the square of the map's length), and the steps
(--min-steps) stay the number the demo needs.
"""

import os
from dataclasses import replace

from foundation.errors import UserError
from foundation.training import total_steps

CODES_PER_STEP = 32 * 8 * 8
BATCH_RANGE = (8, 32)


def preset_prior_batch(map_height: int, map_width: int) -> int:
    low, high = BATCH_RANGE
    return max(low, min(high, CODES_PER_STEP // (map_height * map_width)))


def describe_prior_batch(batch: int, map_height: int, map_width: int) -> str:
    return (f"--batch-size {batch} (maps of {map_height}x{map_width} codes: about {CODES_PER_STEP:,} codes a step, "
            f"so that a step's cost grows little with the map)")


# Transformed copies (stage one's --map-transforms) give a prior more distinct maps, each told its
# transform, but every copy takes a share of the steps from the maps of the images as they are,
# which are what it is asked to draw. On the 1,429 icons, whose maps the demo's 4,219 steps of 32
# pass over 96 times, the mirror images (47 passes over each map) made the prior's samples more
# recognisable and nearer the data; on the 3,283 emoji (41 passes, 21 with the mirror images)
# they made them less so than the maps alone (docs/small-sets.md).
COPIES_NEED_PASSES = 40


def batches_and_passes(config, train_maps: int) -> tuple[int, float]:
    """Each process's batches in a pass over `train_maps`, as the loader deals them (it drops a
    last, incomplete batch), and how many passes the run's steps make."""
    batches = max(1, train_maps // (config.batch_size * int(os.environ.get("WORLD_SIZE", "1"))))
    return batches, total_steps(config, batches) * config.gradient_accumulation_steps / batches


def preset_transformed_maps(config, own_maps: int, copies: int) -> tuple[bool, str]:
    """Whether to train on the copies: only where the steps still pass over every map, copies
    included, COPIES_NEED_PASSES times. `own_maps`: the maps of the images as they are; `copies`:
    how many maps the dump wrote of each (1 + its transforms)."""
    _, passes = batches_and_passes(config, own_maps * copies)
    if passes >= COPIES_NEED_PASSES:
        return True, (f"--transformed-maps (each image also as the dump's {copies - 1} transform(s): "
                      f"the steps still pass over every map {passes:.3g} times)")
    return False, (f"--no-transformed-maps (with the dump's transformed copies the steps would pass over each map "
                   f"only {passes:.3g} times, fewer than the {COPIES_NEED_PASSES} the images as they are need)")


# A prior that passes over the same maps many times learns them by heart. In the demo's 4,219
# steps of 32 maps and without dropout, the best test NLL was 3.97 bits/code on 3,283 emoji maps
# (41 epochs) and 7.01 on 1,429 icons (96 epochs); with dropout 0.1, 3.30 and 4.93. Nearer the
# line it pays less, then costs: 3.28 -> 3.00 on the icons at 64 pixels (23.7 passes), 3.31 ->
# 3.27 on 10,000 Fashion-MNIST maps (13.5), and 2.35 -> 2.50 on the emoji at 64 pixels (10.3),
# which were still learning when the steps ran out. Fashion-MNIST's 2.25 keep the demo's prior.
DROPOUT_ABOVE_EPOCHS = 12
SMALL_SET_DROPOUT = 0.1


def preset_prior_dropout(epochs: float) -> float:
    return SMALL_SET_DROPOUT if epochs > DROPOUT_ABOVE_EPOCHS else 0.0


def describe_prior_dropout(dropout: float, epochs: float) -> str:
    if dropout:
        return f"--dropout {dropout:g} ({epochs:.3g} passes over the same maps: enough to learn them by heart without it)"
    return f"--dropout 0 ({epochs:.3g} passes over the maps: too few to learn them by heart)"


# A prior that reads every code of a map it has seen many times can tell which train map it is in
# after two codes, and copy the rest. Replacing a share of its input codes by random ones (the
# targets unchanged) makes the map's own codes a less sure guide than what codes follow what. On
# the 1,429 icons and 3,283 emoji (41-96 passes) a fifth raised the share of samples the judge
# recognises and brought them nearer the data, without copies, at some cost in variety (the FD
# rose on the icons); 0.3 and 0.4 lost more (0.4 drew the same few icons again and again). On
# Fashion-MNIST (2.25 passes) a fifth cost 0.13 bits/code and a third on the FD, and on the emoji
# at 64 pixels (10.3 passes, still learning) 0.31 bits/code (docs/small-sets.md): where dropout
# is not needed, neither is this.
CORRUPTION_ABOVE_EPOCHS = DROPOUT_ABOVE_EPOCHS
SMALL_SET_CORRUPTION = 0.2


def preset_token_corruption(epochs: float) -> float:
    return SMALL_SET_CORRUPTION if epochs > CORRUPTION_ABOVE_EPOCHS else 0.0


def describe_token_corruption(corruption: float, epochs: float) -> str:
    if corruption:
        return (f"--token-corruption {corruption:g} ({epochs:.3g} passes over the same maps: a share of the codes it reads "
                f"replaced by random ones, so that it learns what follows what, not which map it is in)")
    return f"--token-corruption 0 ({epochs:.3g} passes over the maps: too few to learn them by heart)"


# The prior kept is the one with the best test NLL among the evaluations. Without dropout the
# icons' best was 4.55 bits/code at step 700 (evaluated every 100 steps), 7.01 at step 2,000 (the
# demo's spacing); with dropout 0.1, 4.40 at step 900. Every two passes over the maps, the
# evaluations come before a small set is learnt by heart; Fashion-MNIST keeps the demo's 2,000.
EVAL_EVERY_EPOCHS = 2
EVAL_EVERY_RANGE = (100, 2000)


def preset_prior_eval_every(steps_per_epoch: float) -> int:
    low, high = EVAL_EVERY_RANGE
    return max(low, min(high, round(EVAL_EVERY_EPOCHS * steps_per_epoch)))


def describe_prior_eval_every(eval_every: int) -> str:
    return f"--eval-every {eval_every} (about every {EVAL_EVERY_EPOCHS} passes over the maps: the best of the evaluations is kept)"


def apply_prior_presets(config, map_height: int, map_width: int, own_maps: int, copies: int = 1):
    """(config with every choice left to the presets made, what was chosen and why) for stage two's
    summary line; a flag the user gave is kept as given. `own_maps`: the train maps of the images
    as they are; `copies`: how many maps the dump wrote of each image (1: no transformed copies)."""
    choices = []
    if config.batch_size is None:
        config = replace(config, batch_size=preset_prior_batch(map_height, map_width))
        choices.append(describe_prior_batch(config.batch_size, map_height, map_width))
    elif config.batch_size < 1:
        raise UserError(f"--batch-size {config.batch_size} must be at least 1 (leave it out for the map size's default)")
    if copies == 1:
        config = replace(config, transformed_maps=config.transformed_maps if config.transformed_maps is not None else False)
    elif config.transformed_maps is None:
        used, why = preset_transformed_maps(config, own_maps, copies)
        config = replace(config, transformed_maps=used)
        choices.append(why)
    batches, passes = batches_and_passes(config, own_maps * (copies if config.transformed_maps else 1))
    steps_per_pass = batches / config.gradient_accumulation_steps
    if config.eval_every is None:
        config = replace(config, eval_every=preset_prior_eval_every(steps_per_pass))
        choices.append(describe_prior_eval_every(config.eval_every))
    elif config.eval_every < 1:
        raise UserError(f"--eval-every {config.eval_every} must be at least 1 (leave it out to evaluate about every 2 passes over the maps)")
    if config.dropout is None and config.prior == "pixelcnn":  # which has no dropout
        config = replace(config, dropout=0.0)
    elif config.dropout is None:
        config = replace(config, dropout=preset_prior_dropout(passes))
        choices.append(describe_prior_dropout(config.dropout, passes))
    if config.token_corruption is None:
        config = replace(config, token_corruption=preset_token_corruption(passes))
        choices.append(describe_token_corruption(config.token_corruption, passes))
    return config, choices
