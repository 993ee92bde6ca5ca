"""What every prior records beside its weights, and how it names "no class"."""

from torch import nn


class PriorMetadata(nn.Module):
    """Base of every prior: the map it models and the metadata stored in its config.json."""

    def _record(self, codebook_size: int, map_height: int, map_width: int, num_classes: int, prior: str,
                codes_source: str, class_names: list[str] | None, default_guidance: float, label_dropout: float | None):
        self.codebook_size, self.map_shape, self.num_classes = codebook_size, (map_height, map_width), num_classes
        # stored in config.json: which prior, which VQ-VAE's codes, what the labels mean
        self.prior, self.codes_source, self.class_names = prior, codes_source, class_names
        self.default_guidance = default_guidance  # the scale stage two measured best; sampling's default
        self.label_dropout = label_dropout  # how often training showed the null label (None: not recorded)

    @property
    def null_label(self) -> int:
        """The label index the prior learned as "no class" (label dropout), after the real ones."""
        return self.num_classes
