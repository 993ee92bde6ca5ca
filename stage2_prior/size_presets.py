"""Stage two's batch follows the code map's size, unless --batch-size sets it.

The prior reads every code of a map in one step, so a step's time grows with the map's area:
32 maps of 16x16 codes (a 64-pixel image at downsample 4) cost about three times a step of the
demo's 32 maps of 8x8. Keeping the codes per step near the demo's (2,048) keeps a step's time
near the demo's at every size, and the steps (--min-steps) stay the number the demo needs.
"""

CODES_PER_STEP = 32 * 8 * 8
BATCH_RANGE = (8, 32)


def preset_prior_batch(map_height: int, map_width: int) -> int:
    low, high = BATCH_RANGE
    return max(low, min(high, CODES_PER_STEP // (map_height * map_width)))


def describe_prior_batch(batch: int, map_height: int, map_width: int) -> str:
    return (f"--batch-size {batch} (maps of {map_height}x{map_width} codes: about {CODES_PER_STEP:,} codes a step, "
            f"so that a step costs about the same at every map size)")
