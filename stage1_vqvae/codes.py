"""The code-map format: the seam between stage one and stage two.

`<run>/codes` is a `datasets.DatasetDict` saved with `save_to_disk`, one split per image
split, columns `codes` (Array2D uint16 [h, w]) and `label` (when the images had labels),
and `metadata.json` beside it naming the VQ-VAE the maps came from. A reader checks that
metadata against a given VQ-VAE, so maps from another model are refused, not misread.
"""

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from stage1_vqvae.atomic import replace_directory
from stage1_vqvae.errors import UserError

METADATA_FILE = "metadata.json"
DUMP_HINT = "re-encode them with `python -m stage1_vqvae.dump_codes --run-dir {run}`"


@dataclass
class CodesMetadata:
    codebook_size: int
    map_height: int
    map_width: int
    vqvae_sha256: str  # hash of the VQ-VAE's weights, see `weights_hash`
    dataset: str
    class_names: list[str] | None
    splits: dict[str, int]  # split name -> number of maps


@dataclass
class CodeMaps:
    codes: torch.Tensor  # int64 [N, h, w]
    labels: torch.Tensor | None  # int64 [N]
    metadata: CodesMetadata


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names and raw bytes), identical for a model and its saved copy."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_codes(directory: Path, splits: dict, metadata: CodesMetadata) -> None:
    """Write {split: (codes [N, h, w] int tensor, labels [N] or None)} atomically to `directory`."""
    import datasets

    height, width = metadata.map_height, metadata.map_width
    if metadata.codebook_size > 65536:
        raise UserError(f"a codebook of {metadata.codebook_size} codes does not fit uint16 maps; use at most 65536")
    code_feature = datasets.Array2D(shape=(height, width), dtype="uint16")
    label_feature = datasets.ClassLabel(names=metadata.class_names) if metadata.class_names else datasets.Value("int64")
    tables = {}
    for name, (codes, labels) in splits.items():  # a split without labels (a test split of -1s) has no label column
        columns, features = {"codes": codes.cpu().numpy().astype(np.uint16)}, {"codes": code_feature}
        if labels is not None:
            columns["label"], features["label"] = labels.cpu().numpy().astype(np.int64), label_feature
        tables[name] = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    metadata.splits = {name: len(table) for name, table in tables.items()}
    with replace_directory(directory) as staging:
        datasets.DatasetDict(tables).save_to_disk(str(staging))
        (staging / METADATA_FILE).write_text(json.dumps(asdict(metadata), indent=2) + "\n")


def read_metadata(directory: Path) -> CodesMetadata:
    path = directory / METADATA_FILE
    if not path.exists():
        run = directory.parent
        raise UserError(
            f"no code maps in {directory}; train stage one with `accelerate launch stage1_vqvae/train.py "
            f"--run-dir {run}` or {DUMP_HINT.format(run=run)}"
        )
    return CodesMetadata(**json.loads(path.read_text()))


def check_matches(metadata: CodesMetadata, vqvae, directory: Path) -> None:
    """Refuse maps that another VQ-VAE (or another configuration) produced, naming what differs."""
    hint = DUMP_HINT.format(run=directory.parent)
    expected = {
        "codebook size": (metadata.codebook_size, vqvae.codebook_size),
        "map shape": ((metadata.map_height, metadata.map_width), tuple(vqvae.map_shape)),
    }
    for what, (stored, actual) in expected.items():
        if stored != actual:
            raise UserError(f"the code maps in {directory} have {what} {stored} but the VQ-VAE has {actual}; {hint}")
    actual_hash = weights_hash(vqvae)
    if metadata.vqvae_sha256 != actual_hash:
        raise UserError(
            f"the code maps in {directory} came from VQ-VAE weights {metadata.vqvae_sha256[:12]}, not from the "
            f"VQ-VAE beside them ({actual_hash[:12]}); {hint}"
        )


def read_codes(directory: Path, split: str, vqvae=None) -> CodeMaps:
    """Load one split as int64 tensors; with `vqvae`, first check the maps came from it."""
    import datasets

    directory = Path(directory)
    metadata = read_metadata(directory)
    if vqvae is not None:
        check_matches(metadata, vqvae, directory)
    if split not in metadata.splits:
        raise UserError(f"the code maps in {directory} have no split '{split}' (they have: {', '.join(metadata.splits)})")
    columns = datasets.load_from_disk(str(directory / split)).with_format("numpy")[:]
    codes = torch.from_numpy(columns["codes"].astype(np.int64))
    labels = torch.from_numpy(columns["label"].astype(np.int64)) if "label" in columns else None
    return CodeMaps(codes, labels, metadata)
