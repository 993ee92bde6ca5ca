"""The priors by name, and loading whichever one a folder holds."""

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from foundation.errors import UserError
from stage2_prior.maskgit import MaskGITPrior, masked_code_loss
from stage2_prior.pixelcnn import GatedPixelCNN
from stage2_prior.transformer import TransformerPrior

PRIORS = {"transformer": TransformerPrior, "pixelcnn": GatedPixelCNN, "maskgit": MaskGITPrior}
# priors that draw every code at once in a few passes; the others draw one code per pass, in raster order
PARALLEL_PRIORS = ("maskgit",)


def corrupt_codes(codes: torch.Tensor, share: float, codebook_size: int) -> torch.Tensor:
    """`codes` with a random `share` of them replaced by codes drawn uniformly from the codebook
    (taming's pkeep is 1 - share): a prior that reads a few wrong codes and must still predict the
    right next ones cannot lean on copying a train map it has recognised, and at sampling time
    it recovers from a code it drew badly instead of compounding it."""
    if share <= 0:
        return codes
    replaced = torch.rand(codes.shape, device=codes.device) < share
    return torch.where(replaced, torch.randint_like(codes, codebook_size), codes)


def training_loss(model, codes: torch.Tensor, labels: torch.Tensor | None, kind: str, transforms: torch.Tensor | None = None,
                  inputs: torch.Tensor | None = None) -> torch.Tensor:
    """The loss a prior of this kind trains on (nats): the NLL of every code for the raster
    priors, the label-smoothed cross-entropy of the hidden codes for a parallel one (MaskGIT).
    `model` may be wrapped (DDP), so it is called, not unwrapped. `inputs`: what the prior reads
    where it differs from the targets `codes` (`corrupt_codes`)."""
    inputs = codes if inputs is None else inputs
    if kind in PARALLEL_PRIORS:
        return masked_code_loss(model, codes, labels, transforms=transforms, inputs=inputs).mean()
    return F.cross_entropy(model(inputs, labels, transforms).float(), codes)


def load_prior(directory: Path):
    """`from_pretrained` of the prior class named by the folder's config.json."""
    directory = Path(directory)
    config = directory / "config.json"
    if not (directory / "model.safetensors").exists() or not config.exists():
        raise UserError(
            f"no prior in {directory}; train one with `accelerate launch stage2_prior/train.py --run-dir {directory.parent}`"
        )
    saved = json.loads(config.read_text())
    kind = saved.get("prior")
    if kind not in PRIORS:
        raise UserError(f"{config} names prior {kind!r}, not one of {', '.join(PRIORS)}; retrain stage two")
    # a transformer saved before these options existed was trained without them
    older = {key: value for key, value in (("label_every_code", False), ("code_vector_dim", 0)) if key not in saved}
    return PRIORS[kind].from_pretrained(str(directory), **(older if kind == "transformer" else {}))


def set_default_guidance(prior, scale: float) -> None:
    """Record the guidance scale sampling should use by default; `save_pretrained` writes it
    to config.json and `from_pretrained` reads it back."""
    prior.default_guidance = scale
    prior._hub_mixin_config["default_guidance"] = scale
