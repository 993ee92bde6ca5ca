"""What every prior records beside its weights, and how it names "no class" and "as it is"."""

import torch
from torch import nn


class PriorMetadata(nn.Module):
    """Base of every prior: the map it models and the metadata stored in its config.json."""

    def _record(self, codebook_size: int, map_height: int, map_width: int, num_classes: int, prior: str,
                codes_source: str, class_names: list[str] | None, default_guidance: float, label_dropout: float | None,
                transforms: list[str] | None = None):
        self.codebook_size, self.map_shape, self.num_classes = codebook_size, (map_height, map_width), num_classes
        # stored in config.json: which prior, which VQ-VAE's codes, what the labels mean
        self.prior, self.codes_source, self.class_names = prior, codes_source, class_names
        self.default_guidance = default_guidance  # the scale stage two measured best; sampling's default
        self.label_dropout = label_dropout  # how often training showed the null label (None: not recorded)
        # the transforms behind the train maps' transform ids, identity first (None: maps of the images as they are only)
        self.transforms = transforms if transforms and len(transforms) > 1 else None

    @property
    def num_transforms(self) -> int:
        """How many transforms the prior tells apart: 0 where it was trained on untransformed maps only."""
        return len(self.transforms) if self.transforms else 0

    @property
    def null_label(self) -> int:
        """The label index the prior learned as "no class" (label dropout), after the real ones."""
        return self.num_classes


def prepare_transforms(n: int, transforms, num_transforms: int, device) -> torch.Tensor | None:
    """Transform ids for n maps: None -> the identity's (0); an int -> repeated; None back for a
    prior that knows no transforms (asked for the identity or nothing)."""
    if transforms is None:
        return torch.zeros(n, dtype=torch.long, device=device) if num_transforms else None
    transforms = torch.as_tensor(transforms, dtype=torch.long, device=device).reshape(-1)
    if transforms.numel() == 1:
        transforms = transforms.expand(n).clone()
    if transforms.numel() != n:
        raise ValueError(f"got {transforms.numel()} transform ids for {n} maps; give one id or one per map")
    if transforms.is_cuda and torch.cuda.is_current_stream_capturing():  # a graph cannot wait for the check
        return transforms
    if not num_transforms:
        if bool((transforms != 0).any()):
            raise ValueError("this prior was trained on the maps of the images as they are only; ask for the identity (transform 0)")
        return None
    bad = transforms[(transforms < 0) | (transforms >= num_transforms)]
    if bad.numel():
        raise ValueError(f"transform {bad[0].item()} is out of range for a prior trained on {num_transforms} transforms; "
                         f"use 0 (the identity) to {num_transforms - 1}")
    return transforms
