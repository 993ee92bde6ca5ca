"""`python -m stage1_vqvae.dump_codes`: encode every image of a run again with its saved VQ-VAE.

Stage one's training ends with the same dump; this command redoes it, for example after
replacing the weights. Under `accelerate launch` each process encodes its share and the
main process writes one data set, in the original order, every image once.
"""

import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from stage1_vqvae.cli import parse_config
from stage1_vqvae.codes import CodesMetadata, weights_hash, write_codes
from stage1_vqvae.data import DataConfig, ImageData, load_image_data
from stage1_vqvae.errors import UserError, run_cli
from stage1_vqvae.metrics import eval_loader, to_unit_range
from stage1_vqvae.model import VQVAE
from stage1_vqvae.training import format_duration, use_all_cores


@dataclass
class DumpConfig:
    run_dir: str = field(default="runs/default", metadata={"help": "run whose vqvae/ encodes the images"})
    batch_size: int = field(default=512, metadata={"help": "images per process per batch"})


@torch.no_grad()
def encode_split(accelerator: Accelerator, model: VQVAE, dataset, batch_size: int, desc: str):
    """All code maps (and labels) of one split, gathered in order on every process."""
    loader = accelerator.prepare(eval_loader(dataset, batch_size))
    codes, labels = [], []
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_main_process, leave=False):
        batch_codes = model.encode(to_unit_range(batch["images"]))  # fp32: codes must not depend on the hardware
        gathered = accelerator.gather_for_metrics({"codes": batch_codes, **({"labels": batch["labels"]} if "labels" in batch else {})})
        codes.append(gathered["codes"].cpu())
        if "labels" in gathered:
            labels.append(gathered["labels"].cpu())
    return torch.cat(codes), (torch.cat(labels) if labels else None)


def dump(accelerator: Accelerator, model: VQVAE, data: ImageData, run_dir: Path, batch_size: int = 512) -> Path:
    """Encode the train and test splits and write `<run>/codes` (main process)."""
    model.eval()
    splits = {
        name: encode_split(accelerator, model, dataset, batch_size, f"encoding {name}")
        for name, dataset in (("train", data.train), ("test", data.test))
    }
    directory = Path(run_dir) / "codes"
    if accelerator.is_main_process:
        height, width = model.map_shape
        metadata = CodesMetadata(
            codebook_size=model.codebook_size, map_height=height, map_width=width,
            vqvae_sha256=weights_hash(model), dataset=data.source, class_names=data.class_names, splits={},
        )
        write_codes(directory, splits, metadata)
    accelerator.wait_for_everyone()
    return directory


def load_vqvae(run_dir: Path) -> VQVAE:
    directory = Path(run_dir) / "vqvae"
    if not (directory / "model.safetensors").exists():
        raise UserError(f"no VQ-VAE in {directory}; train one with `accelerate launch stage1_vqvae/train.py --run-dir {run_dir}`")
    return VQVAE.from_pretrained(str(directory))


def data_config_of_run(run_dir: Path) -> DataConfig:
    """The data flags stage one was trained with, from its resolved config."""
    path = Path(run_dir) / "vqvae" / "train_config.json"
    if not path.exists():
        raise UserError(f"{path} is missing, so the images of this run are unknown; rerun stage one training")
    saved = json.loads(path.read_text())
    return DataConfig(**{f.name: saved[f.name] for f in fields(DataConfig) if f.name in saved})


def main(argv=None):
    config = parse_config(DumpConfig, argv, description=__doc__.splitlines()[0])
    started = time.time()
    run_dir = Path(config.run_dir)
    accelerator = Accelerator()
    use_all_cores(accelerator.device, accelerator.num_processes)
    model = load_vqvae(run_dir).to(accelerator.device)
    with accelerator.main_process_first():  # a download or cache is built once, then read by the others
        data = load_image_data(data_config_of_run(run_dir))
    directory = dump(accelerator, model, data, run_dir, config.batch_size)
    accelerator.print(f"Wrote code maps of {len(data.train)} train and {len(data.test)} test images to {directory} in {format_duration(time.time() - started)}")


if __name__ == "__main__":
    run_cli(main)
