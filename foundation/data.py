"""Image sources -> torch-ready train and test splits.

Three sources, one result:
- `fashion_mnist` (default): the four IDX files from $VQ_DATA_DIR or Debian's
  /usr/share/datasets/fashion-mnist, else the Hub (zalando-datasets/fashion_mnist); both
  give the same tensors and class names;
- a local folder of images, through `datasets`' imagefolder loader;
- any Hub id with an image column.

A split that fits in memory becomes one uint8 tensor batched by index (about 25x faster
than decoding rows from Arrow); a larger one is decoded row by row from its Arrow file. With
--streaming the train split is a stream (`StreamedImages`) and the test split its first
STREAM_TEST_IMAGES images.
"""

import copy
import gzip
import io
import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torchvision.transforms import v2

from foundation.errors import UserError

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SINGLE_CHANNEL_MODES = {"1", "L", "LA", "I", "I;16", "F"}
IMAGEFOLDER_METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
STREAM_TEST_IMAGES = 10_000  # the test split of a stream is held as its first images, at most these


@dataclass
class DataConfig:
    """Where the images come from; shared by training and `dump_codes`."""

    dataset: str = field(default="fashion_mnist", metadata={"help": "fashion_mnist, a Hub id, or a folder of images"})
    image_column: str = field(default="image", metadata={"help": "image column of a Hub data set"})
    label_column: str = field(default="label", metadata={"help": "label column (used when present)"})
    train_split: str = field(default="train", metadata={"help": "split to train on"})
    test_split: str = field(default="test", metadata={"help": "split to evaluate on"})
    image_size: int = field(default=32, metadata={"help": "images are resized and center-cropped to this side"})
    channels: int | None = field(
        default=None, metadata={"help": "1 (grayscale) or 3 (RGB); every image is converted to it (default: the images' "
                                        "own, 3 when they disagree)", "choices": [1, 3]}
    )
    test_fraction: float = field(default=0.1, metadata={"help": "held-out fraction when the data has no test split (seeded)"})
    max_memory_gb: float = field(default=8.0, metadata={"help": "splits larger than this are decoded on the fly"})
    data_seed: int = field(default=0, metadata={"help": "seed of the held-out split of data without a test split, and of the order a folder streams in"})
    streaming: bool = field(default=False, metadata={"help": "read a Hub data set or a folder as a stream: nothing is "
                                                             "downloaded or decoded up front (needs --max-steps)"})
    shuffle_buffer: int = field(default=10_000, metadata={"help": "images a stream is shuffled among (--streaming)"})


class InMemoryBatches(Dataset):
    """Tensors of equal length held in memory; `__getitems__` hands out whole batches by
    index, which the DataLoader uses instead of stacking items one by one."""

    cheap_to_read = True  # nothing to decode: a DataLoader worker would only copy the batches

    def __init__(self, **columns: torch.Tensor | None):
        self.columns = {name: tensor for name, tensor in columns.items() if tensor is not None}

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitems__(self, indices):
        index = torch.as_tensor(indices)
        return {name: tensor[index] for name, tensor in self.columns.items()}

    def __getitem__(self, i):
        return {name: tensor[i] for name, tensor in self.columns.items()}


class InMemoryImages(InMemoryBatches):
    """A split of images held as one uint8 tensor [N, C, H, W], with its labels if any."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None):
        super().__init__(images=images, labels=labels)

    @property
    def images(self) -> torch.Tensor:
        return self.columns["images"]

    @property
    def labels(self) -> torch.Tensor | None:
        return self.columns.get("labels")

    @property
    def labelled(self) -> bool:
        return "labels" in self.columns


class ImageRows:
    """Rows of image cells (and labels) decoded as they are read: what ArrowImages and
    StreamedImages share."""

    def __init__(self, image_column, label_column, image_size, channels):
        self.image_column, self.label_column, self.image_size, self.channels = image_column, label_column, image_size, channels

    @property
    def labelled(self) -> bool:
        return self.label_column is not None

    def decode(self, row, where: str) -> dict:
        item = {"images": to_uint8_tensor(row[self.image_column], self.image_size, self.channels, where)}
        if self.labelled:
            item["labels"] = torch.tensor(row[self.label_column])
        return item

    def hold(self, items, count: int) -> InMemoryImages:
        """At most `count` decoded items, copied one by one into a tensor made for them: a list
        of them stacked at the end would need twice the sample's memory at the peak."""
        images = torch.empty(count, self.channels, self.image_size, self.image_size, dtype=torch.uint8)
        labels = torch.empty(count, dtype=torch.long) if self.labelled else None
        held = 0
        for item in items:
            images[held] = item["images"]
            if labels is not None:
                labels[held] = item["labels"]
            held += 1
        if not held:
            raise UserError("a split holds no images; add images or choose another split")
        if held < count:  # a stream shorter than asked for
            images, labels = images[:held].clone(), labels[:held].clone() if labels is not None else None
        return InMemoryImages(images, labels)


class ArrowImages(ImageRows, Dataset):
    """A split too large for memory: rows are decoded and resized as they are read."""

    def __init__(self, table, image_column, label_column, image_size, channels):
        super().__init__(image_column, label_column, image_size, channels)
        self.table = table

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        return self.decode(self.table[i], f"row {i}")

    def sample(self, count: int, seed: int = 0) -> InMemoryImages:
        """`count` of the split's images, drawn by a fixed seed and kept in the split's order,
        decoded: the same images every time, from all over the split (a folder's files are
        sorted by class, so its first images could all be of one class)."""
        count = min(count, len(self))
        chosen = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:count].sort().values
        return self.hold((self[i] for i in chosen.tolist()), count)


class StreamedImages(ImageRows, IterableDataset):
    """A train split read as a stream (--streaming): no length, nothing read up front.

    `for_process` gives each process its part of the stream, shuffled among `shuffle_buffer`
    images by (seed, epoch) and split by `datasets`' `split_dataset_by_node`, so that every
    image is read by one process per epoch. Images are decoded as they arrive, in DataLoader
    workers, which `datasets` gives a share of the stream's shards each.
    """

    def __init__(self, stream, image_column, label_column, image_size, channels, shuffle_buffer, seed):
        super().__init__(image_column, label_column, image_size, channels)
        self.stream, self.shuffle_buffer, self.seed = stream, shuffle_buffer, seed

    def for_process(self, rank: int, world: int) -> "StreamedImages":
        from datasets.distributed import split_dataset_by_node

        part = copy.copy(self)
        part.stream = split_dataset_by_node(self.stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer), rank, world)
        return part

    def dealt(self, rank: int, world: int) -> "StreamedImages":
        """Every world-th image from `rank` on, in the stream's own order (unshuffled): the
        dump's share, which the main process deals back into order."""
        part = copy.copy(self)
        part.stream = self.stream.filter(lambda _, i: i % world == rank, with_indices=True)
        return part

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)  # another shuffle every epoch

    def __iter__(self):
        for i, row in enumerate(self.stream):
            yield self.decode(row, f"streamed image {i}")

    def head(self, count: int) -> InMemoryImages:
        """The stream's first `count` images, in its own order (unshuffled), decoded."""
        return self.hold((self.decode(row, f"streamed image {i}") for i, row in zip(range(count), self.stream)), count)


def held_in_memory(split, limit: int | None = None, max_bytes: int | None = None):
    """A split as tensors (`.images`, `.labels`): itself when it is held in memory, else at
    most `limit` of its images and `max_bytes`, decoded, for figures that need a bounded
    sample of a split too large to hold (the judge, the Frechet distances): a seeded sample
    of a split read from Arrow, the first images of a stream (a folder's stream is shuffled
    once when its index is built; a Hub stream comes in its publisher's order)."""
    if hasattr(split, "images"):
        return split
    if limit is None:
        if isinstance(split, StreamedImages):
            raise ValueError("a stream has no end: give a limit")
        limit = len(split)
    if max_bytes is not None:
        limit = min(limit, max(1, max_bytes // (split.channels * split.image_size**2)))
    return split.head(limit) if isinstance(split, StreamedImages) else split.sample(limit)


def collate_batches(batch):
    """`InMemoryImages` already returns a batch; `ArrowImages` returns items to stack."""
    if isinstance(batch, dict):
        return batch
    return {key: torch.stack([item[key] for item in batch]) for key in batch[0]}


def eval_loader(dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """A split in its own order, in whole batches (evaluation, the dump)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_batches, num_workers=num_workers)


@dataclass
class ImageData:
    train: Dataset
    test: Dataset
    channels: int
    image_size: int
    class_names: list[str] | None
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else 0


def data_config_of_run(run_dir: Path) -> DataConfig:
    """The data flags a run's stage one was trained with, from the config it recorded
    (`<run>/vqvae/train_config.json`): how stage two, completion and evaluation find its images."""
    path = Path(run_dir) / "vqvae" / "train_config.json"
    if not path.exists():
        raise UserError(f"{path} is missing, so the images of this run are unknown; rerun stage one training")
    saved = json.loads(path.read_text())
    return DataConfig(**{f.name: saved[f.name] for f in fields(DataConfig) if f.name in saved})


def run_test_images(run_dir: Path, n: int, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first `n` images of a run's test split (uint8 [n, C, S, S]) and their labels, if any,
    in the VQ-VAE's `channels`: only those are decoded (the page shows 16 of a folder that may
    hold a hundred thousand)."""
    # every split read row by row, and the run's channels as given: nothing is scanned or held
    data = load_image_data(replace(data_config_of_run(run_dir), max_memory_gb=0.0, channels=channels))
    test = data.test
    if hasattr(test, "images"):  # Fashion-MNIST's files come whole
        return test.images[:n], test.labels[:n] if test.labels is not None else None
    count = min(n, len(test)) if hasattr(test, "__len__") else n
    held = test.head(count) if isinstance(test, StreamedImages) else test.hold((test[i] for i in range(count)), count)
    return held.images, held.labels


def load_image_data(config: DataConfig) -> ImageData:
    """Resolve `config.dataset` to one of the three sources and load both splits."""
    if config.image_size < 4:
        raise UserError(f"--image-size {config.image_size} is too small; use at least 4 (32 suits Fashion-MNIST)")
    if config.dataset == "fashion_mnist":
        if config.streaming:
            raise UserError("--streaming reads a folder or a Hub data set; Fashion-MNIST is small enough to hold in memory, so drop the flag")
        local = _find_fashion_mnist()
        if local is not None:
            data = _load_fashion_mnist_idx(local, config.image_size)
        else:
            data = fashion_mnist_from_hub_dataset(_load_hub(FASHION_MNIST_HUB_ID, fashion=True), config.image_size)
        return as_rgb(data) if config.channels == 3 else data
    path = Path(config.dataset).expanduser()
    local = path.exists() or config.dataset.startswith((".", "/", "~"))
    if config.streaming:
        if local:  # the folder's index (paths, no pixels) streams; its held-out split is drawn first
            index = _with_held_out_split(_load_folder(path, config), config, str(path))
            # shuffled once, so that a stream's first images (its test split, the judge's sample) are not one class's
            index = {name: split.shuffle(seed=config.data_seed) for name, split in index.items()}
            streams = {name: split.to_iterable_dataset(num_shards=max(1, min(64, len(split)))) for name, split in index.items()}
            return from_streams(streams, config, str(path))
        return from_streams(_load_hub(config.dataset, streaming=True), config, config.dataset)
    if local:
        return from_hf_dataset(_load_folder(path, config), config, str(path))
    return from_hf_dataset(_load_hub(config.dataset), config, config.dataset)


def as_rgb(data: ImageData) -> ImageData:
    """Grayscale images held in memory, as RGB ones (`--channels 3`): the gray value in every channel."""
    def rgb(split):
        return InMemoryImages(split.images.expand(-1, 3, -1, -1).contiguous(), split.labels)

    return ImageData(rgb(data.train), rgb(data.test), 3, data.image_size, data.class_names, data.source)


# ---------------------------------------------------------------- Fashion-MNIST from IDX files


def _find_fashion_mnist() -> Path | None:
    for directory in filter(None, [os.environ.get("VQ_DATA_DIR"), DEBIAN_FASHION_MNIST_DIR]):
        if (Path(directory) / "train-images-idx3-ubyte.gz").exists():
            return Path(directory)
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read one gzipped IDX file (the MNIST format: magic, dimension sizes, uint8 data)."""
    try:
        with gzip.open(path, "rb") as file:
            data = file.read()
        magic = int.from_bytes(data[:4], "big")
        if magic >> 8 != 0x08:  # 0x08 = unsigned byte data
            raise ValueError("not an unsigned-byte IDX file")
        dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(magic & 0xFF)]
        offset = 4 + 4 * len(dims)
        return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)
    except (OSError, ValueError, EOFError) as error:
        raise UserError(
            f"{path} is not a readable IDX file ({error}); reinstall it with `apt-get install --reinstall "
            "dataset-fashion-mnist` or point VQ_DATA_DIR at good copies"
        ) from None


def _load_fashion_mnist_idx(directory: Path, image_size: int) -> ImageData:
    splits = {
        split: (read_idx(directory / f"{prefix}-images-idx3-ubyte.gz"), read_idx(directory / f"{prefix}-labels-idx1-ubyte.gz"))
        for split, prefix in (("train", "train"), ("test", "t10k"))
    }
    return fashion_mnist_from_arrays(splits, image_size, f"fashion_mnist ({directory})")


def fashion_mnist_from_hub_dataset(data, image_size: int) -> ImageData:
    """The Hub's copy (PNG cells, its own spelling of the class names) -> exactly the tensors
    and names the IDX files give, so MSE, FD and `--label` do not depend on the source found."""
    import datasets

    splits = {}
    for split in ("train", "test"):
        table = data[split]
        images = np.stack([np.asarray(_open_image(cell, f"row {i} of the Hub's Fashion-MNIST {split} split"))
                           for i, cell in enumerate(table.cast_column("image", datasets.Image(decode=False))["image"])])
        if images.shape[1:] != (28, 28) or images.dtype != np.uint8:
            raise UserError(f"the Hub's Fashion-MNIST {split} split holds {images.shape[1:]} {images.dtype} images, "
                            "not 28x28 grayscale; install the IDX files with `apt-get install dataset-fashion-mnist`")
        splits[split] = (images, np.asarray(table["label"]))
    return fashion_mnist_from_arrays(splits, image_size, FASHION_MNIST_HUB_ID)


def fashion_mnist_from_arrays(splits: dict, image_size: int, source: str) -> ImageData:
    """{split: (uint8 [N, 28, 28], labels [N])} -> ImageData: padded to 32x32 (the garments
    keep their 28 pixels), then resized only when another size is asked for."""
    result = {}
    for split, (images, labels) in splits.items():
        images = torch.nn.functional.pad(torch.from_numpy(np.array(images, dtype=np.uint8)).unsqueeze(1), (2, 2, 2, 2))
        if image_size != 32:
            images = v2.functional.resize(images, [image_size, image_size], antialias=True)
        result[split] = InMemoryImages(images, torch.from_numpy(np.array(labels, dtype=np.int64)))
    return ImageData(result["train"], result["test"], 1, image_size, FASHION_MNIST_CLASSES, source)


# ---------------------------------------------------------------- folders and the Hub, through datasets


def _load_hub(dataset_id: str, fashion: bool = False, streaming: bool = False):
    import datasets

    try:
        return datasets.load_dataset(dataset_id, streaming=streaming)
    except Exception as error:  # network, authentication, unknown id: all end the same way for a user
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        if fashion:
            raise UserError(
                "Fashion-MNIST is neither in $VQ_DATA_DIR nor in /usr/share/datasets/fashion-mnist, and the Hub "
                f"could not be reached ({reason}); install it with `apt-get install dataset-fashion-mnist` or set "
                "VQ_DATA_DIR to a folder holding its four IDX .gz files"
            ) from None
        raise UserError(
            f"could not load '{dataset_id}' from the Hub ({reason}); check the id and your connection, "
            "or pass a local folder of images to --dataset"
        ) from None


def _load_folder(path: Path, config: DataConfig):
    import datasets

    if not path.is_dir():
        raise UserError(f"--dataset {path} does not exist; pass an existing folder of images, a Hub id or fashion_mnist")
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*") if p.is_file()):
        raise UserError(f"folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); point --dataset at a folder of images")
    splits = _split_folders(path)
    if any((path / name).exists() for name in IMAGEFOLDER_METADATA_FILES):  # columns from a metadata file: imagefolder's job
        data = datasets.load_dataset("imagefolder", data_dir=str(path),
                                     data_files={split: [f"{name}/**" for name in names] for split, names in splits.items()})
    else:
        data = index_image_folder(path, splits)
    if config.train_split not in data and len(data) == 1:  # a flat folder: imagefolder calls its one split "train"
        data = datasets.DatasetDict({config.train_split: data[next(iter(data))]})
    return data


def _split_folders(path: Path) -> dict[str, list[str]]:
    """One split per top-level folder named as `datasets` names splits (train/, test/, val/...),
    else the whole folder as train."""
    from datasets.data_files import SPLIT_KEYWORDS

    splits = {}
    for split, keywords in SPLIT_KEYWORDS.items():
        folders = [child.name for child in sorted(path.iterdir()) if child.is_dir() and child.name in keywords]
        if folders:
            splits[str(split)] = folders
    return splits or {"train": ["."]}


def _image_files(folder: Path) -> list[str]:
    """Every image file under `folder`, sorted, found in one walk of the tree."""
    files = []
    for directory, subdirectories, names in os.walk(folder):
        subdirectories.sort()
        files += [os.path.join(directory, name) for name in sorted(names) if Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return files


def index_image_folder(path: Path, splits: dict[str, list[str]]):
    """A `DatasetDict` of image paths (no pixels, no copies), labelled as imagefolder labels:
    by the folder holding each image, in a split whose images sit in several folders, all at
    one depth (a split of class folders); a split with its images directly inside, or at mixed
    depths, is unlabelled.

    `datasets`' imagefolder loader resolves each file through fsspec and keeps about 2 KB per
    file (420 MB at the peak for 200,000 files, before the first image is read); a path and a
    label here are about 100 bytes."""
    import datasets

    def parent(file: str) -> str:
        return os.path.basename(os.path.dirname(file))

    files = {split: [file for name in names for file in _image_files(path / name)] for split, names in splits.items()}
    labelled = {split for split, split_files in files.items()
                if len({parent(file) for file in split_files}) > 1 and len({file.count(os.sep) for file in split_files}) == 1}
    names = sorted({parent(file) for split in labelled for file in files[split]})
    tables = {}
    for split, split_files in files.items():
        columns, features = {"image": split_files}, {"image": datasets.Image()}
        if split in labelled:
            columns["label"], features["label"] = [parent(file) for file in split_files], datasets.ClassLabel(names=names)
        tables[split] = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    return datasets.DatasetDict(tables)


def _with_held_out_split(data, config: DataConfig, source: str):
    """Data without a test split gets one: a seeded `--test-fraction` of the train split. A test
    split asked for by name (`--test-split X`) must exist instead."""
    import datasets

    if config.test_split in data or config.test_split != DataConfig.test_split or config.train_split not in data:
        return data
    train = data[config.train_split]
    if len(train) < 2:
        raise UserError(f"{source} holds {len(train)} image; it needs at least 2 to hold some out for testing")
    split = train.train_test_split(test_size=config.test_fraction, seed=config.data_seed)
    return datasets.DatasetDict({config.train_split: split["train"], config.test_split: split["test"]})


def _channels_of(image: Image.Image) -> int:
    return 1 if image.mode in SINGLE_CHANNEL_MODES else 3


def _open_image(value, where: str, decode: bool = True) -> Image.Image:
    """A datasets image cell (decoded, or {'path', 'bytes'}) -> PIL image, naming the file if
    broken; `decode=False` reads the header only (mode and size)."""
    if isinstance(value, Image.Image):
        return value
    if value is None:
        raise UserError(f"{where} has no image; remove it or fix the image column")
    name = value.get("path") or where
    try:
        image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
        if decode:
            image.load()
        return image
    except (UnidentifiedImageError, OSError, TypeError) as error:
        raise UserError(f"cannot read image {name} ({error}); remove or replace that file") from None


def _channels_of_cell(cell, where: str) -> int:
    """The channels of one image cell, from its header alone (the file is closed again)."""
    with _open_image(cell, where, decode=False) as image:
        return _channels_of(image)


def _dataset_channels(cells, where: str) -> int:
    """1 if every image is grayscale, else 3: a few colour files turn the whole set RGB."""
    for i, cell in enumerate(cells):
        if _channels_of_cell(cell, f"row {i} of {where}") == 3:
            return 3
    return 1


def on_white(image: Image.Image) -> Image.Image:
    """An image with transparency laid on white, as a viewer shows it. Dropping the alpha channel
    instead would keep whatever colour transparent pixels happen to store (often black, sometimes
    noise), and hard fringes where edges were half transparent."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return image


def as_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float grayscale image -> mode "L", its range scaled rather than
    clipped (PIL's convert("L") clips at 255: a 16-bit scan came out all white). Floats in [0, 1]
    are taken as that range, integers up to 65,535 as 16-bit; anything wider by its own maximum."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image, dtype=np.float64)
    top = values.max(initial=0.0)
    if image.mode == "F" and top <= 1.0:
        full = 1.0
    else:
        full = next((depth for depth in (255.0, 65535.0) if top <= depth), top)
    return Image.fromarray(np.clip(np.rint(values * (255.0 / full)), 0, 255).astype(np.uint8), mode="L")


def to_uint8_tensor(value, image_size: int, channels: int, where: str) -> torch.Tensor:
    """One image cell of any mode (grayscale of any depth, RGB, RGBA, palette) -> uint8 [channels, S, S]:
    laid on white where it has transparency, converted, resized (short side) and center-cropped."""
    image = on_white(as_8_bit(_open_image(value, where))).convert("L" if channels == 1 else "RGB")
    tensor = v2.functional.pil_to_tensor(image)
    tensor = v2.functional.resize(tensor, image_size, antialias=True)
    return v2.functional.center_crop(tensor, [image_size, image_size])


def load_image_file(path: Path, image_size: int, channels: int) -> torch.Tensor:
    """One image file of any mode -> uint8 [channels, S, S], converted, resized and cropped."""
    return to_uint8_tensor({"path": str(path)}, image_size, channels, str(path))


def _label_values_to_indices(table, label_column, class_names):
    index = {name: i for i, name in enumerate(class_names)}

    def convert(batch):
        unknown = [v for v in batch[label_column] if str(v) not in index]
        if unknown:
            raise UserError(f"label {unknown[0]!r} is missing from the train split; every test label must occur in train")
        return {label_column: [index[str(v)] for v in batch[label_column]]}

    import datasets

    features = table.features.copy()
    features[label_column] = datasets.Value("int64")  # else map keeps a string column's type and writes "0", "1"
    return table.map(convert, batched=True, features=features)


def _all_missing(labels) -> bool:
    return all(value is None or value == -1 for value in labels)


def from_hf_dataset(data, config: DataConfig, source: str) -> ImageData:
    """A `datasets.DatasetDict` with an image column (and maybe a label column) -> ImageData."""
    import datasets

    data = _with_held_out_split(data, config, source)
    splits = {}
    for split_name in (config.train_split, config.test_split):
        if split_name not in data:
            raise UserError(
                f"{source} has no split '{split_name}' (it has: {', '.join(data)}); pass --train-split/--test-split"
            )
        table = data[split_name]
        if config.image_column not in table.column_names:
            raise UserError(
                f"{source} has no column '{config.image_column}' (columns: {', '.join(table.column_names)}); "
                "pass --image-column"
            )
        if len(table) == 0:
            raise UserError(f"split '{split_name}' of {source} holds no images; add images or choose another split")
        splits[split_name] = table.cast_column(config.image_column, datasets.Image(decode=False))

    train_table = splits[config.train_split]
    if config.label_column != DataConfig.label_column and config.label_column not in train_table.column_names:
        raise UserError(f"--label-column {config.label_column} is not a column of {source} (columns: "
                        f"{', '.join(train_table.column_names)}); name one of them, or leave the flag out to train without labels")
    label_column = config.label_column if config.label_column in train_table.column_names else None
    if label_column is not None and _all_missing(train_table[label_column]):
        label_column = None  # no label at all: e.g. imagefolder on train/ and test/ with the images directly inside
    # A split whose labels are all missing (-1 in a ClassLabel, as ImageNet's test split, or no
    # column) is unlabelled, not of class -1: the run stays class-conditional on the train labels.
    split_labels = {name: label_column if label_column in table.column_names and not _all_missing(table[label_column]) else None
                    for name, table in splits.items()}
    class_names = None
    if label_column is not None:
        feature = train_table.features[label_column]
        if isinstance(feature, datasets.ClassLabel):
            class_names = list(feature.names)
        else:  # plain values (ints or strings) become classes in sorted order
            class_names = [str(v) for v in sorted(set(train_table[label_column]))]
            splits = {name: _label_values_to_indices(table, label_column, class_names) if split_labels[name] else table
                      for name, table in splits.items()}
    first = _channels_of_cell(train_table[0][config.image_column], f"row 0 of {config.train_split}")
    in_memory = len(train_table) * first * config.image_size**2 / 1e9 <= config.max_memory_gb
    # Every header of a split held in memory is read (cheap: no pixels); a larger split goes by its first image.
    train_cells = train_table[config.image_column] if in_memory else None  # read once, for the scan and the decoding
    channels = config.channels or (_dataset_channels(train_cells, config.train_split) if in_memory else first)

    result = {}
    for split_name, table in splits.items():
        size_gb = len(table) * channels * config.image_size**2 / 1e9
        if size_gb > config.max_memory_gb:
            result[split_name] = ArrowImages(table, config.image_column, split_labels[split_name], config.image_size, channels)
            continue
        column = train_cells if split_name == config.train_split and train_cells is not None else table[config.image_column]
        images = torch.stack([
            to_uint8_tensor(cell, config.image_size, channels, f"row {i} of split '{split_name}'")
            for i, cell in enumerate(column)
        ])
        labels = torch.tensor(list(table[label_column]), dtype=torch.int64) if split_labels[split_name] else None
        result[split_name] = InMemoryImages(images, labels)
    return ImageData(
        result[config.train_split], result[config.test_split], channels, config.image_size, class_names, source
    )


def from_streams(streams, config: DataConfig, source: str) -> ImageData:
    """{split: `datasets.IterableDataset`} -> ImageData: the train split as `StreamedImages`,
    the test split as its first STREAM_TEST_IMAGES images. Labels come from a ClassLabel
    column: plain values would need a pass over the whole stream to name the classes."""
    import datasets

    for split_name in (config.train_split, config.test_split):
        if split_name not in streams:
            raise UserError(
                f"{source} has no split '{split_name}' (it has: {', '.join(streams)}); a stream has no length to hold a "
                "fraction out of, so pass --train-split/--test-split, or drop --streaming"
            )
    train, test = streams[config.train_split], streams[config.test_split]
    features = train.features or {}
    if config.image_column not in features:
        raise UserError(f"{source} has no column '{config.image_column}' (columns: {', '.join(features)}); pass --image-column")
    if config.label_column != DataConfig.label_column and config.label_column not in features:
        raise UserError(f"--label-column {config.label_column} is not a column of {source} (columns: {', '.join(features)}); "
                        "name one of them, or leave the flag out to train without labels")
    label_column = config.label_column if config.label_column in features else None
    if label_column is not None and not isinstance(features[label_column], datasets.ClassLabel):
        raise UserError(f"column '{label_column}' of {source} holds plain values, whose classes a stream cannot list "
                        "before its end; drop --streaming, or store the labels as a ClassLabel")
    class_names = list(features[label_column].names) if label_column else None
    train, test = (split.cast_column(config.image_column, datasets.Image(decode=False)) for split in (train, test))
    first = next(iter(train), None)
    if first is None:
        raise UserError(f"split '{config.train_split}' of {source} holds no images; add images or choose another split")
    channels = config.channels or _channels_of_cell(first[config.image_column], f"row 0 of {config.train_split}")
    make = lambda stream, labels: StreamedImages(stream, config.image_column, labels, config.image_size, channels,  # noqa: E731
                                                 config.shuffle_buffer, config.data_seed)
    held = make(test, label_column if label_column in (test.features or {}) else None).head(STREAM_TEST_IMAGES)
    if held.labels is not None and _all_missing(held.labels.tolist()):
        held = InMemoryImages(held.images, None)
    return ImageData(make(train, label_column), held, channels, config.image_size, class_names, source)
