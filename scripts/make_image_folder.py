"""Write a folder of synthetic RGB PNGs in class subfolders, for measuring data at scale.

    python scripts/make_image_folder.py /tmp/shapes200k --count 200000 --size 64

Each image is a random disc, square or triangle (its class) of a random colour on a random
two-colour gradient, so files compress like real pictures rather than noise. Seeded: the
same arguments write the same files. Not committed data: generate it where it is needed.
"""

import argparse
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("disc", "square", "triangle")


def draw(index: int, size: int) -> Image.Image:
    rng = np.random.default_rng(index)
    top, bottom = rng.integers(0, 256, (2, 3))
    ramp = np.linspace(0, 1, size)[:, None, None]
    background = (top * (1 - ramp) + bottom * ramp).astype(np.uint8).repeat(size, axis=1)
    image = Image.fromarray(background, "RGB")
    centre, radius = rng.uniform(0.3, 0.7, 2) * size, rng.uniform(0.15, 0.35) * size
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    x, y = centre
    shape = CLASSES[index % len(CLASSES)]
    canvas = ImageDraw.Draw(image)
    if shape == "disc":
        canvas.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    elif shape == "square":
        canvas.rectangle([x - radius, y - radius, x + radius, y + radius], fill=colour)
    else:
        canvas.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=colour)
    return image


def write(job: tuple[Path, int, int]) -> None:
    root, index, size = job
    draw(index, size).save(root / CLASSES[index % len(CLASSES)] / f"{index:07d}.png")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    for name in CLASSES:
        (args.folder / name).mkdir(parents=True, exist_ok=True)
    with Pool() as pool:
        pool.map(write, [(args.folder, i, args.size) for i in range(args.count)], chunksize=1000)
    print(f"wrote {args.count} {args.size}x{args.size} PNGs to {args.folder}")


if __name__ == "__main__":
    main()
