"""`python -m stage1_vqvae.seed_spread --seeds 0,1,2,3 -- [stage-one flags]`: how much stage one
moves from one seed to the next, with the flags given.

A GAN phase makes stage one a draw: the same flags give different reconstructions on another
seed. This trains stage one once per seed, one `accelerate launch` after another, into
`<run-dir>/seed_<s>/`, then scores every run the same way: test MSE, SSIM and codebook use, and
where the images have labels the Frechet distance of reconstructions (rFD, as a ratio to the
real-vs-real floor, by one judge for all seeds). It writes each run's figures and their mean,
min and max to `<run-dir>/seed_spread.json`, and the table to `seed_spread.md`.

A seed whose run already finished with the same flags is scored, not trained again, and one
that was stopped midway resumes from its newest checkpoint, so an interrupted spread continues
where it stopped.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate import Accelerator

from foundation.cli import build_parser, parse_config
from foundation.data import data_config_of_run, eval_loader, held_in_memory, load_image_data
from foundation.errors import UserError, run_cli
from foundation.estimate import format_duration
from foundation.judge import hold_out, judge_reconstructions, load_or_train_judge
from foundation.training import BOOKKEEPING_FLAGS, Checkpoints, bf16_is_fast, changed_flags, read_log, use_all_cores
from stage1_vqvae.gan_health import diagnose
from stage1_vqvae.metrics import reconstruction_metrics
from stage1_vqvae.model import load_vqvae
from stage1_vqvae.size_presets import apply_size_presets
from stage1_vqvae.train import TrainConfig

TRAIN_SCRIPT = Path(__file__).with_name("train.py")
FIGURES = ("mse", "ssim", "codebook_usage", "lowest_codebook_usage", "rfd_ratio")


@dataclass
class SpreadConfig:
    seeds: str = field(default="0,1,2,3", metadata={"help": "comma-separated seeds, e.g. 0,1,2,3"})
    run_dir: str = field(default="runs/seed_spread", metadata={"help": "folder of the runs (seed_<s>/) and the summary"})
    n: int = field(default=2000, metadata={"help": "held-out test images reconstructed for the rFD (as pipelines.evaluate)"})


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r} is not a list of distinct whole numbers; give e.g. --seeds 0,1,2,3")
    return seeds


def split_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """This command's flags, and stage one's (after `--`)."""
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


def train_config_of(train_flags: list[str], seed: int, run_dir: Path) -> TrainConfig:
    """The stage-one config a seed's run gets; a wrong flag stops here, before any training."""
    for own in ("--seed", "--run-dir"):
        if any(flag == own or flag.startswith(own + "=") for flag in train_flags):
            raise UserError(f"{own} is set by seed_spread for each run; leave it out of stage one's flags (use --seeds and --run-dir before --)")
    parser = build_parser(TrainConfig, "stage one")
    try:
        arguments = parser.parse_args([*train_flags, "--seed", str(seed), "--run-dir", str(run_dir)])
    except SystemExit:
        raise UserError(f"stage one does not take the flags {' '.join(train_flags)!r} (its error is above); "
                        "see `python stage1_vqvae/train.py --help`") from None
    config, _ = apply_size_presets(TrainConfig(**vars(arguments)))  # as the run will choose them, and record them
    if config.mixed_precision == "auto":  # as the run will resolve it, and record it
        config.mixed_precision = "bf16" if bf16_is_fast() else "no"
    return config


def trained_with(run_dir: Path, config: TrainConfig) -> bool:
    """Whether `run_dir` holds a stage one (finished or not) started with `config`'s flags."""
    saved = run_dir / "vqvae" / "train_config.json"
    return saved.exists() and not changed_flags(json.loads(saved.read_text()), config)


def finished_with(run_dir: Path, config: TrainConfig) -> bool:
    """Whether `run_dir` holds a finished stage one trained with `config`'s flags."""
    return (run_dir / "vqvae" / "final" / "model.safetensors").exists() and trained_with(run_dir, config)


def interrupted_with(run_dir: Path, config: TrainConfig) -> bool:
    """Whether `run_dir` holds an unfinished stage one with `config`'s flags and a checkpoint to resume."""
    newest = Checkpoints(run_dir / "vqvae" / "checkpoints", keep=1).newest()
    return newest is not None and trained_with(run_dir, config)


def train(run_dir: Path, seed: int, train_flags: list[str], resume: bool) -> float:
    """One stage-one run under `accelerate launch` (the user's accelerate config applies); its seconds."""
    command = [sys.executable, "-m", "accelerate.commands.launch", str(TRAIN_SCRIPT), "--no-dump", *train_flags,
               "--seed", str(seed), "--run-dir", str(run_dir), *(["--resume"] if resume else [])]
    started = time.time()
    done = subprocess.run(command, env=dict(os.environ, PYTHONPATH=str(TRAIN_SCRIPT.parent.parent)))
    if done.returncode:
        raise UserError(f"stage one with seed {seed} stopped (exit status {done.returncode}, its message is above); "
                        f"fix that and run seed_spread again: finished seeds are kept")
    return time.time() - started


def lowest_usage_after_start(run_dir: Path, disc_start: int) -> float | None:
    """The least codebook use on the test split at any evaluation once the discriminator had started."""
    usage = [row["test/codebook_usage"] for row in read_log(run_dir / "vqvae" / "log.jsonl")
             if "test/codebook_usage" in row and disc_start >= 0 and row["step"] > disc_start]
    return min(usage) if usage else None


def score(run_dir: Path, config: TrainConfig, judge_dir: Path, n: int, accelerator: Accelerator) -> dict:
    vqvae = load_vqvae(run_dir).to(accelerator.device).eval()
    data = load_image_data(data_config_of_run(run_dir))
    figures = reconstruction_metrics(accelerator, vqvae, accelerator.prepare(eval_loader(data.test, 512)))
    figures["lowest_codebook_usage"] = lowest_usage_after_start(run_dir, config.disc_start)
    if data.num_classes:
        judge = load_or_train_judge(judge_dir, data, accelerator.device)
        try:
            held_out = hold_out(judge, held_in_memory(data.test, 4 * n), n, accelerator.device)
        except ValueError as error:
            raise UserError(str(error)) from None
        figures.update(judge_reconstructions(vqvae, judge, held_out, accelerator.device), fd_floor=held_out.floor)
    figures["warnings"] = diagnose(run_dir / "vqvae" / "log.jsonl", config.disc_start)
    return figures


def summarise(runs: dict[int, dict]) -> dict:
    """{figure: {mean, min, max}} over the seeds, for the figures every run has."""
    summary = {}
    for name in FIGURES:
        values = [run[name] for run in runs.values() if run.get(name) is not None]
        if len(values) == len(runs):
            summary[name] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
    return summary


def format_table(runs: dict[int, dict], summary: dict) -> str:
    names = [name for name in FIGURES if name in summary]
    shown = lambda value: "" if value is None else f"{value:.4g}"  # noqa: E731
    lines = ["| seed | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    lines += [f"| {seed} | " + " | ".join(shown(run.get(name)) for name in names) + " |" for seed, run in runs.items()]
    for statistic in ("mean", "min", "max"):
        lines.append(f"| {statistic} | " + " | ".join(shown(summary[name][statistic]) for name in names) + " |")
    return "\n".join(lines)


def main(argv=None):
    own, train_flags = split_arguments(sys.argv[1:] if argv is None else list(argv))
    config = parse_config(SpreadConfig, own, description=__doc__.splitlines()[0])
    seeds = parse_seeds(config.seeds)
    root = Path(config.run_dir)
    configs = {seed: train_config_of(train_flags, seed, root / f"seed_{seed}") for seed in seeds}
    started = time.time()
    seconds = {}
    for seed, train_config in configs.items():
        run_dir = Path(train_config.run_dir)
        if finished_with(run_dir, train_config):
            print(f"seed {seed}: already trained with these flags in {run_dir}; scoring it")
            continue
        resume = interrupted_with(run_dir, train_config)
        if resume:
            print(f"seed {seed}: resuming the unfinished run in {run_dir}")
        seconds[seed] = train(run_dir, seed, train_flags, resume)
    accelerator = Accelerator(mixed_precision="no")  # the figures in fp32, as pipelines.evaluate's
    use_all_cores(accelerator.device)
    runs = {}
    for seed, train_config in configs.items():
        runs[seed] = {"train_seconds": seconds.get(seed), **score(Path(train_config.run_dir), train_config, root, config.n, accelerator)}
    summary = summarise(runs)
    flags = {key: value for key, value in asdict(configs[seeds[0]]).items() if key not in BOOKKEEPING_FLAGS | {"seed"}}
    result = {"flags": flags, "seeds": seeds, "summary": summary, "runs": runs}
    root.mkdir(parents=True, exist_ok=True)
    (root / "seed_spread.json").write_text(json.dumps(result, indent=2) + "\n")
    table = format_table(runs, summary)
    (root / "seed_spread.md").write_text(table + "\n")
    print(table)
    for seed, run in runs.items():
        for warning in run["warnings"]:
            print(f"seed {seed}: {warning}")
    print(f"Stage one over {len(seeds)} seeds in {format_duration(time.time() - started)}: {root / 'seed_spread.json'}")


if __name__ == "__main__":
    run_cli(main)
