"""What both stages stand on: image data in, the accelerate training loop, flags from
dataclasses, one-sentence errors, atomic writes, and the judge whose features give the
Frechet distances. It imports nothing from the stages above it."""
