"""Which codes of a map a completion redraws: a named half, the centre, or a mask."""

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from foundation.data import to_uint8_tensor
from foundation.errors import UserError
from stage2_prior.priors import PARALLEL_PRIORS

REGIONS = ("bottom", "top", "left", "right", "center")


def named_region(name: str, height: int, width: int) -> torch.Tensor:
    rows, cols = torch.arange(height)[:, None], torch.arange(width)[None]
    halves = {
        "bottom": rows >= height // 2, "top": rows < height // 2,
        "left": cols < width // 2, "right": cols >= width // 2,
        "center": ((rows >= height // 4) & (rows < height - height // 4)) & ((cols >= width // 4) & (cols < width - width // 4)),
    }
    return halves[name].expand(height, width).clone()


def code_region(mask, height: int, width: int) -> torch.Tensor:
    """A region name, a mask image (PIL or a path; white = redraw) or a tensor [H, W] over pixels
    or [height, width] over codes -> bool [height, width], True = redraw. A mask larger than the
    map is scaled to it by area: a code is redrawn where its patch is mostly white."""
    if isinstance(mask, str) and mask in REGIONS:
        return named_region(mask, height, width)
    if isinstance(mask, (str, Path)):
        if not Path(mask).is_file():
            raise UserError(f"mask {str(mask)!r} is neither a region ({', '.join(REGIONS)}) nor an image file; give one of those")
        mask = {"path": str(mask)}
    if isinstance(mask, (Image.Image, dict)):
        mask = to_uint8_tensor(mask, max(height, width) * 8, 1, "the mask")[0].float() / 255
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise UserError(f"a mask of type {type(mask).__name__} was given; give a region name ({', '.join(REGIONS)}), "
                        f"a mask image, or a 2-D tensor (True or white = redraw)")
    if tuple(mask.shape) == (height, width):
        return mask.bool().cpu()
    return F.adaptive_avg_pool2d(mask.float().cpu()[None, None], (height, width))[0, 0] > 0.5


def describe(mask) -> str:
    """The mask as a sentence's subject: "the region center", "the mask image", ..."""
    if isinstance(mask, (str, Path)):
        return f"the region {mask}" if mask in REGIONS else f"the mask {mask}"
    return f"the mask {'image' if isinstance(mask, Image.Image) else type(mask).__name__}"


def check_region(region: torch.Tensor, prior, mask) -> None:
    """A raster-order prior draws a code from the codes before it only, so it can redraw a
    raster-order tail of the map and nothing else."""
    if not region.any():
        raise UserError(f"{describe(mask)} covers no code of the {region.shape[0]}x{region.shape[1]} map; "
                        f"redraw a larger region")
    tail = region.flatten().int()
    if prior.prior not in PARALLEL_PRIORS and (tail.diff() < 0).any():
        raise UserError(
            f"{describe(mask)} keeps codes after redrawn ones in raster order, which the {prior.prior} prior cannot "
            f"condition on; redraw the bottom, or use a MaskGIT prior (stage two's --prior maskgit --prior-dir NAME)"
        )
