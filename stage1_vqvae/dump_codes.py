"""`python -m stage1_vqvae.dump_codes`: encode every image of a run again with its saved VQ-VAE.

Stage one's training ends with the same dump; this command redoes it, for example after
replacing the weights. Under `accelerate launch` each process encodes a contiguous share
and writes it batch by batch; the main process joins the shares into one data set, in the
original order, every image once, without loading them.
"""

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import Subset
from tqdm.auto import tqdm

from foundation.cli import parse_config
from foundation.data import ImageData, StreamedImages, data_config_of_run, eval_loader, load_image_data
from foundation.errors import UserError, run_cli
from foundation.estimate import format_duration
from foundation.training import loader_workers, use_all_cores
from stage1_vqvae.codes import CodesMetadata, ShardWriter, read_metadata, weights_hash, write_codes
from stage1_vqvae.map_transforms import IDENTITY, apply_transform, parse_transforms
from stage1_vqvae.metrics import to_unit_range
from stage1_vqvae.model import VQVAE, load_vqvae


@dataclass
class DumpConfig:
    run_dir: str = field(default="runs/default", metadata={"help": "run whose vqvae/ encodes the images"})
    batch_size: int = field(default=512, metadata={"help": "images per process per batch"})
    map_transforms: str | None = field(default=None, metadata={"help": "also encode the train images as these transforms make "
                                                                       "them (none, or e.g. flip,rotations; default: what the "
                                                                       "run's stage one chose)"})


def parse_map_transforms(text: str, channels: int) -> list[str]:
    """--map-transforms as the list of transform names the dump encodes, identity first."""
    try:
        return parse_transforms(text, channels)
    except ValueError as error:
        raise UserError(f"--map-transforms {text!r}: {error}") from None


def describe_dump(directory: Path, seconds: float | None = None) -> str:
    """'code maps of N train and M test images ... in <dir>': what the dump wrote, for a summary line."""
    metadata = read_metadata(directory)
    counts, transforms = metadata.splits, metadata.transforms
    train = f"{counts['train']} train maps ({counts['train'] // len(transforms)} images, each also as {', '.join(transforms[1:])})" \
        if transforms else f"{counts['train']} train"
    size = sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())
    took = f" in {format_duration(seconds)}" if seconds is not None else ""
    return f"code maps of {train} and {counts['test']} test images in {directory} ({size / 2**20:.1f} MB){took}"


@torch.no_grad()
def encode_share(accelerator: Accelerator, model: VQVAE, dataset, batch_size: int, writer: ShardWriter, desc: str,
                 transforms: list[str] = (IDENTITY,)) -> None:
    """This process's contiguous share of a split (of a stream: every world-th image from its
    rank on, in the stream's order), encoded and written batch by batch: each batch as it is,
    then as each further transform makes it, every map with its transform's id."""
    rank, world = accelerator.process_index, accelerator.num_processes
    if isinstance(dataset, StreamedImages):  # decoded here: a worker would count the images of its own shards
        loader = eval_loader(dataset.dealt(rank, world), batch_size)
    else:
        share = Subset(dataset, range(len(dataset) * rank // world, len(dataset) * (rank + 1) // world))
        loader = eval_loader(share, batch_size, loader_workers(None, dataset, world))  # images decoded as read: in workers
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_main_process, leave=False):
        images = to_unit_range(batch["images"].to(accelerator.device))
        for index, name in enumerate(transforms):
            codes = model.encode(apply_transform(name, images))  # fp32: codes must not depend on the hardware
            writer.write(codes, batch.get("labels"), index)
    writer.close()


def dump(accelerator: Accelerator, model: VQVAE, data: ImageData, run_dir: Path, batch_size: int = 512,
         transforms: list[str] = (IDENTITY,)) -> Path:
    """Encode the train and test splits and write `<run>/codes`: each process writes its
    contiguous share to a shard, and the main process joins the shards in rank order, which
    is the splits' own order, every image once. With `transforms` beyond the identity, the train
    split also holds each image's transformed copies (`map_transforms.py`); the test split
    holds the images as they are, which is what a prior is scored on."""
    model.eval()
    transformed = len(transforms) > 1
    directory = Path(run_dir) / "codes"
    shard_dir = directory.with_name("codes.shards")
    height, width = model.map_shape
    metadata = CodesMetadata(
        codebook_size=model.codebook_size, map_height=height, map_width=width,
        vqvae_sha256=weights_hash(model), dataset=data.source, class_names=data.class_names, splits={},
        transforms=list(transforms) if transformed else None,
    )
    if accelerator.is_main_process:
        shutil.rmtree(shard_dir, ignore_errors=True)  # left by a dump that was killed
        shard_dir.mkdir(parents=True)
    accelerator.wait_for_everyone()
    shards = {}
    for name, dataset in (("train", data.train), ("test", data.test)):
        shards[name] = [shard_dir / f"{name}-{rank:05d}.arrow" for rank in range(accelerator.num_processes)]
        copies = transforms if name == "train" else (IDENTITY,)
        writer = ShardWriter(shards[name][accelerator.process_index], metadata, dataset.labelled, transformed and name == "train")
        encode_share(accelerator, model, dataset, batch_size, writer, f"encoding {name}", copies)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        interleaved = {name for name, dataset in (("train", data.train), ("test", data.test)) if isinstance(dataset, StreamedImages)}
        write_codes(directory, shards, metadata, interleaved)
        shutil.rmtree(shard_dir)
    accelerator.wait_for_everyone()
    return directory


def main(argv=None):
    config = parse_config(DumpConfig, argv, description=__doc__.splitlines()[0])
    started = time.time()
    run_dir = Path(config.run_dir)
    accelerator = Accelerator()
    use_all_cores(accelerator.device, accelerator.num_processes)
    model = load_vqvae(run_dir).to(accelerator.device)
    with accelerator.main_process_first():  # a download or cache is built once, then read by the others
        data = load_image_data(data_config_of_run(run_dir))
    transforms = parse_map_transforms(config.map_transforms or stage_one_choice(run_dir), data.channels)
    directory = dump(accelerator, model, data, run_dir, config.batch_size, transforms)
    accelerator.print(f"Wrote {describe_dump(directory, time.time() - started)}")


def stage_one_choice(run_dir: Path) -> str:
    """The --map-transforms the run's stage one chose ('none' for a run from before the flag)."""
    saved = json.loads((Path(run_dir) / "vqvae" / "train_config.json").read_text())
    return saved.get("map_transforms") or "none"


if __name__ == "__main__":
    run_cli(main)
