"""Stage two's batch follows the code map's size, unless --batch-size sets it.

The prior reads every code of a map in one step, so a step's time grows with the map's area:
on two cores 32 maps of 16x16 codes (a 64-pixel image at downsample 4) took 0.21 s a step, five
times the demo's 32 maps of 8x8 (44 ms). With the demo's 2,048 codes a step (8 maps of 16x16)
a step takes 68 ms (attention grows with the square of the map's length), and the steps
(--min-steps) stay the number the demo needs.
"""

CODES_PER_STEP = 32 * 8 * 8
BATCH_RANGE = (8, 32)


def preset_prior_batch(map_height: int, map_width: int) -> int:
    low, high = BATCH_RANGE
    return max(low, min(high, CODES_PER_STEP // (map_height * map_width)))


def describe_prior_batch(batch: int, map_height: int, map_width: int) -> str:
    return (f"--batch-size {batch} (maps of {map_height}x{map_width} codes: about {CODES_PER_STEP:,} codes a step, "
            f"so that a step's cost grows little with the map)")
