"""The transformed copies of the train images that the dump encodes beside the originals, each
map stored with its transform's id (distribution augmentation: Jun et al. 2020, "Distribution
Augmentation for Generative Modeling").

A prior that passes over the same few thousand maps many times learns them by heart before it
learns what the images share. Mirrored, rotated or recoloured images give it more distinct maps,
and because it is told which transform made each map (as it is told the class), it learns each
transformed set as a distribution of its own instead of drawing from it: sampling asks for the
identity, the images as they are. Unconditioned mirrored maps were measured to hurt (docs).

Id 0 is always the identity; the others follow in the order the run names them, recorded in the
code maps' metadata, so that a prior knows what each of its transform ids means.
"""

import torch
from torchvision.transforms.v2 import functional as tv

IDENTITY = "identity"


def zoomed(image: torch.Tensor, top: int, left: int) -> torch.Tensor:
    """The image enlarged by an eighth and cropped back to its size, `top` and `left` halves of the
    margin from the corner (0, 1 or 2): a small zoom with a shift, as a photographer's recrop. A
    shift by half a code's pixels gives the VQ-VAE other codes for the same picture."""
    size = image.shape[-1]
    margin = 2 * max(1, size // 16)
    enlarged = tv.resize(image, [size + margin] * 2, antialias=True)
    top, left = top * margin // 2, left * margin // 2
    return enlarged[..., top: top + size, left: left + size]


# where a zoom crops, in halves of the margin: (top, left) for each compass point and the centre
ZOOMS = {"nw": (0, 0), "n": (0, 1), "ne": (0, 2), "w": (1, 0), "c": (1, 1), "e": (1, 2), "sw": (2, 0), "s": (2, 1), "se": (2, 2)}


# name -> what it does to float images [B, C, H, W]; each changes which codes the VQ-VAE writes
TRANSFORMS = {
    IDENTITY: lambda x: x,
    "flip": lambda x: x.flip(-1),
    "rot90": lambda x: x.rot90(1, (-2, -1)),
    "rot180": lambda x: x.rot90(2, (-2, -1)),
    "rot270": lambda x: x.rot90(3, (-2, -1)),
    "flip_rot90": lambda x: x.flip(-1).rot90(1, (-2, -1)),
    "flip_rot180": lambda x: x.flip(-1).rot90(2, (-2, -1)),
    "flip_rot270": lambda x: x.flip(-1).rot90(3, (-2, -1)),
    # the other five orders of the red, green and blue channels
    "colours_rbg": lambda x: x[:, [0, 2, 1]],
    "colours_grb": lambda x: x[:, [1, 0, 2]],
    "colours_gbr": lambda x: x[:, [1, 2, 0]],
    "colours_brg": lambda x: x[:, [2, 0, 1]],
    "colours_bgr": lambda x: x[:, [2, 1, 0]],
    **{f"zoom_{where}": (lambda x, at=at: zoomed(x, *at)) for where, at in ZOOMS.items()},
    **{f"flip_zoom_{where}": (lambda x, at=at: zoomed(x.flip(-1), *at)) for where, at in ZOOMS.items()},
}
# names that stand for several transforms on the command line
GROUPS = {
    "rotations": ["rot90", "rot180", "rot270"],
    "dihedral": ["flip", "rot90", "rot180", "rot270", "flip_rot90", "flip_rot180", "flip_rot270"],
    "colours": [name for name in TRANSFORMS if name.startswith("colours_")],
    "zooms": [name for name in TRANSFORMS if name.startswith("zoom_")],
    "flipped_zooms": [name for name in TRANSFORMS if name.startswith("flip_zoom_")],
}
COLOUR_ONLY = tuple(GROUPS["colours"])


def parse_transforms(text: str, channels: int) -> list[str]:
    """'flip,rotations' -> ['identity', 'flip', 'rot90', 'rot180', 'rot270'] (the identity first,
    each name once); 'none' or '' -> ['identity']. Raises ValueError naming a bad name."""
    names = [IDENTITY]
    for part in (part.strip() for part in text.split(",")):
        if part in ("", "none", IDENTITY):
            continue
        if part not in TRANSFORMS and part not in GROUPS:
            raise ValueError(f"{part!r} is not a transform; use none or a comma-separated list of "
                             f"{', '.join([*GROUPS, *(name for name in TRANSFORMS if name != IDENTITY)])}")
        for name in GROUPS.get(part, [part]):
            if name in COLOUR_ONLY and channels != 3:
                raise ValueError(f"{part} reorders the red, green and blue channels, but the images have {channels} channel")
            if name not in names:
                names.append(name)
    return names


def apply_transform(name: str, images: torch.Tensor) -> torch.Tensor:
    """Float images [B, C, H, W] as transform `name` makes them."""
    return TRANSFORMS[name](images).contiguous()
