"""The code-map format: the seam between stage one and stage two.

`<run>/codes` is a `datasets.DatasetDict` saved with `save_to_disk`, one split per image
split, columns `codes` (Array2D uint16 [h, w]), `label` (when the images had labels) and,
in a train split that holds transformed copies of its images (`map_transforms.py`),
`transform` (the id of the transform that made each map, 0 for the image as it is), and
`metadata.json` beside it naming the VQ-VAE the maps came from. A reader checks that
metadata against a given VQ-VAE, so maps from another model are refused, not misread.

No step holds a whole split: the dump writes each process's maps batch by batch to an
Arrow shard (`ShardWriter`), `write_codes` joins the shards memory-mapped, and
`open_codes` hands stage two memory-mapped maps that become int64 one batch at a time.
"""

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from foundation.atomic import replace_directory
from foundation.errors import UserError

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
    # the transforms behind the train split's `transform` ids, identity first; None: no copies (older dumps too)
    transforms: list[str] | None = None


@dataclass
class CodeMaps:
    codes: torch.Tensor  # int64 [N, h, w]
    labels: torch.Tensor | None  # int64 [N]
    metadata: CodesMetadata
    transforms: torch.Tensor | None = None  # int64 [N], where the split holds transformed copies


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names and raw bytes), identical for a model and its saved copy."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def code_features(metadata: CodesMetadata, labelled: bool, transformed: bool = False):
    """The Arrow columns of one split: uint16 maps, the labels when the split has them, and
    each map's transform id where the split holds transformed copies."""
    import datasets

    if metadata.codebook_size > 65536:
        raise UserError(f"a codebook of {metadata.codebook_size} codes does not fit uint16 maps; use at most 65536")
    features = {"codes": datasets.Array2D(shape=(metadata.map_height, metadata.map_width), dtype="uint16")}
    if labelled:
        features["label"] = datasets.ClassLabel(names=metadata.class_names) if metadata.class_names else datasets.Value("int64")
    if transformed:
        features["transform"] = datasets.Value("uint8")
    return datasets.Features(features)


class ShardWriter:
    """Code maps appended batch by batch to one Arrow file, never held together in memory."""

    def __init__(self, path: Path, metadata: CodesMetadata, labelled: bool, transformed: bool = False):
        from datasets.arrow_writer import ArrowWriter

        self.labelled, self.transformed = labelled, transformed
        self.writer = ArrowWriter(features=code_features(metadata, labelled, transformed), path=str(path))
        self.maps = 0

    def write(self, codes: torch.Tensor, labels: torch.Tensor | None, transform: int = 0) -> None:
        batch = {"codes": codes.cpu().numpy().astype(np.uint16)}
        if self.labelled:
            batch["label"] = labels.cpu().numpy().astype(np.int64)
        if self.transformed:
            batch["transform"] = np.full(len(codes), transform, dtype=np.uint8)
        self.writer.write_batch(batch)
        self.maps += len(codes)

    def close(self) -> None:
        self.writer.finalize()


def write_codes(directory: Path, shards: dict[str, list[Path]], metadata: CodesMetadata, interleaved=()) -> None:
    """Join each split's shards, one after the other, into `directory` (atomically); the
    splits named in `interleaved` had their rows dealt out in turn (shard r holds rows r,
    r + n, ...) and are dealt back. The shards are memory-mapped and copied batch by batch,
    so no split is ever loaded whole."""
    import datasets

    tables = {}
    for name, paths in shards.items():
        parts = [datasets.Dataset.from_file(str(path)) for path in paths]
        table = datasets.concatenate_datasets(parts)
        if name in interleaved:  # row k is row k // n of shard k % n
            starts = np.cumsum([0] + [len(part) for part in parts[:-1]])
            k = np.arange(len(table))
            table = table.select(starts[k % len(parts)] + k // len(parts))
        tables[name] = table
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


IN_MEMORY_MAX_BYTES = 2**30


def _maps_of(table, height: int, width: int) -> np.ndarray:
    """A pyarrow `codes` column (Array2D uint16) -> numpy uint16 [N, h, w]."""
    column = table.column("codes").combine_chunks()
    return column.storage.flatten().flatten().to_numpy().reshape(-1, height, width)


class CodeMapSplit(Dataset):
    """One split of code maps, as uint16 in memory up to IN_MEMORY_MAX_BYTES (60,000 8x8 maps
    are 7.7 MB) and memory-mapped from Arrow beyond it; batches come out as int64 tensors
    {"codes": [B, h, w], "labels": [B], "transforms": [B]}, so no split is ever held as int64.
    `transforms=False` leaves the transformed copies out: the maps of the images as they are."""

    cheap_to_read = True  # a batch costs at most a millisecond: DataLoader workers would not pay

    def __init__(self, table, metadata: CodesMetadata, labels: bool = True, max_bytes: int | None = None, transforms: bool = True):
        self.metadata, self.shape = metadata, (metadata.map_height, metadata.map_width)
        self.labelled = labels and "label" in table.column_names
        self.transformed = "transform" in table.column_names
        columns = ["codes"] + ["label"] * self.labelled + ["transform"] * self.transformed
        self.table = table.data.table.select(columns)  # memory-mapped
        self.rows = None  # which of the table's rows this split serves (None: all)
        if self.transformed and not transforms:  # the identity's rows: a uint8 column read once
            self.rows = np.flatnonzero(self.table.column("transform").to_numpy() == 0)
            self.transformed = False
        self.in_memory = self.table.num_rows * self.shape[0] * self.shape[1] * 2 <= (IN_MEMORY_MAX_BYTES if max_bytes is None else max_bytes)

    @functools.cached_property
    def _whole(self) -> dict[str, np.ndarray]:
        """The split read into memory on first use: opening a split to look at it costs nothing.
        A gather from one array costs microseconds, an Arrow `take` about a millisecond."""
        return self._read(self.table)

    def _read(self, table) -> dict[str, np.ndarray]:
        columns = {"codes": _maps_of(table, *self.shape)}
        if self.labelled:
            columns["labels"] = table.column("label").to_numpy().astype(np.int64)
        if self.transformed:
            columns["transforms"] = table.column("transform").to_numpy().astype(np.int64)
        return columns

    def __len__(self):
        return self.table.num_rows if self.rows is None else len(self.rows)

    def __getitems__(self, indices):
        indices = np.asarray(indices, dtype=np.int64)
        if self.rows is not None:
            indices = self.rows[indices]
        columns = {name: values[indices] for name, values in self._whole.items()} if self.in_memory else self._read(self.table.take(indices))
        return {name: torch.from_numpy(values.astype(np.int64)) for name, values in columns.items()}

    def __getitem__(self, i):
        return {name: value[0] for name, value in self.__getitems__([i]).items()}


def open_codes(directory: Path, split: str, vqvae=None, labels: bool = True, transforms: bool = True) -> CodeMapSplit:
    """One split, memory-mapped; with `vqvae`, first check the maps came from it. `labels=False`
    leaves the labels out, as an unconditional prior wants; `transforms=False` the transformed
    copies of the images (their maps only)."""
    import datasets

    directory = Path(directory)
    metadata = read_metadata(directory)
    if vqvae is not None:
        check_matches(metadata, vqvae, directory)
    if split not in metadata.splits:
        raise UserError(f"the code maps in {directory} have no split '{split}' (they have: {', '.join(metadata.splits)})")
    return CodeMapSplit(datasets.load_from_disk(str(directory / split)), metadata, labels, transforms=transforms)


def read_codes(directory: Path, split: str, vqvae=None, transforms: bool = True) -> CodeMaps:
    """One split loaded whole as int64 tensors, for the small splits of tests and figures."""
    maps = open_codes(directory, split, vqvae, transforms=transforms)
    whole = maps.__getitems__(range(len(maps)))
    return CodeMaps(whole["codes"], whole.get("labels"), maps.metadata, whole.get("transforms"))
