"""What both training scripts share: the accelerator, cores, schedule, logs, checkpoints, resume.

It sits in foundation, below both stages, because imports only run downstream (stage two may
import stage one, never the reverse, and neither imports the pipelines).
"""

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, is_tensorboard_available, is_wandb_available, send_to_device, set_seed
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from foundation.captured_step import CapturedStep
from foundation.data import StreamedImages, collate_batches, eval_loader
from foundation.errors import UserError
from foundation.estimate import TimeLeft

CHECKPOINT_PREFIX = "step_"
PROGRESS_FILE = "progress.json"


@dataclass
class LoopConfig:
    """Flags of the training loop, the same for both stages."""

    # {flag: value}: how a run saved before the flag existed trained, for --resume's comparison
    FLAGS_ADDED_SINCE: ClassVar[dict] = {}
    # {old flag: new flag}: the old name is refused with the new one, and read as it in saved runs
    RENAMED_FLAGS: ClassVar[dict] = {"--warmup-steps": "--lr-warmup-steps"}
    run_dir: str = field(default="runs/default", metadata={"help": "folder of this run's artifacts"})
    epochs: float = field(default=2.0, metadata={"help": "passes over the train split (ignored with --max-steps)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps; overrides --epochs and --min-steps"})
    min_steps: int = field(default=0, metadata={"help": "at least this many optimizer steps, however few --epochs make on a small data set"})
    batch_size: int = field(default=128, metadata={"help": "images per process per step"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate of AdamW"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    lr_warmup_steps: int = field(default=100, metadata={"help": "linear warm-up before the cosine decay (at most a quarter of the run's steps)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip gradients to this norm (0: off)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    num_workers: int | None = field(
        default=None, metadata={"help": "DataLoader processes that decode images (default: none for data held in memory, "
                                        "else one per spare core, at most 4)"}
    )
    mixed_precision: str = field(
        default="auto", metadata={"help": "autocast dtype; auto: bf16 where the hardware has it", "choices": ["auto", "no", "bf16", "fp16"]}
    )
    seed: int = field(default=0, metadata={"help": "seed of weights, data order and sampling"})
    log_every: int = field(default=25, metadata={"help": "log training metrics every N steps"})
    eval_every: int = field(default=500, metadata={"help": "evaluate on the test split every N steps"})
    checkpoint_every: int = field(default=500, metadata={"help": "save a resumable checkpoint every N steps"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many checkpoints to keep"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint"})
    allow_changes: bool = field(default=False, metadata={"help": "with --resume: continue although flags differ from the run's (it is then no longer exact)"})
    report_to: str = field(default="auto", metadata={
        "help": "also log to these trackers, through accelerate (log.jsonl and curves.png are written either way; auto: "
                "TensorBoard where it is installed)", "choices": ["auto", "tensorboard", "wandb", "none"]})
    cuda_graph: bool = field(default=True, metadata={
        "help": "on one CUDA GPU, replay each training step's forward and backward pass as a CUDA graph (--no-cuda-graph: "
                "launch every kernel; the graph needs one process, no gradient accumulation and no fp16)"})
    overwrite: bool = field(default=False, metadata={"help": "start again, deleting this stage's checkpoints"})


def open_stage(config: LoopConfig, stage_dir: Path, what: str, also_written: tuple[Path, ...] = ()) -> tuple[Accelerator, "Checkpoints"]:
    """The accelerator and checkpoints of one stage, after refusing a bad start, seeded.
    --overwrite (without --resume) first removes everything the stage wrote: `stage_dir` and
    the folders in `also_written`, so that nothing of the old run is left to be mistaken for the new."""
    if config.keep_checkpoints < 1:
        raise UserError(f"--keep-checkpoints {config.keep_checkpoints} would leave nothing to --resume from; "
                        f"use 1 or more (the default 2 keeps the newest two)")
    accelerator = make_accelerator(config, stage_dir)
    if config.overwrite and not config.resume:
        if accelerator.is_main_process:
            for folder in (stage_dir, *also_written):
                shutil.rmtree(folder, ignore_errors=True)
        accelerator.wait_for_everyone()
    checkpoints = Checkpoints(stage_dir / "checkpoints", config.keep_checkpoints)
    check_can_start(checkpoints, config, what)
    set_seed(config.seed)
    return accelerator, checkpoints


def bf16_is_fast(device_type: str | None = None) -> bool:
    """True on a CUDA GPU with native bf16 (not the emulation T4 and V100 class cards offer,
    which is slower than fp32), or a CPU with AMX or AVX512-BF16 (about 1.8x faster here).
    With no device type: the GPU if there is one, else the CPU."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def make_accelerator(config: LoopConfig, project_dir: Path) -> Accelerator:
    if config.mixed_precision == "auto":  # reads the GPU's compute capability; allocates nothing on cuda:0
        config.mixed_precision = "bf16" if bf16_is_fast() else "no"
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=trackers(config.report_to),
        project_dir=str(project_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    use_all_cores(accelerator.device, accelerator.num_processes)
    return accelerator


def trackers(report_to: str) -> str | None:
    """--report-to -> accelerate's `log_with`; a tracker asked for by name must be installed."""
    if report_to == "auto":
        return "tensorboard" if is_tensorboard_available() else None
    if report_to == "none":
        return None
    if not {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[report_to]():
        raise UserError(f"--report-to {report_to} needs the {report_to} package, which is not installed here; "
                        f"`pip install {report_to}`, or leave the flag out (log.jsonl and curves.png are written either way)")
    return report_to


def use_all_cores(device: torch.device, num_processes: int = 1) -> None:
    """On a CPU, give each process its share of the cores.

    `accelerate launch` sets OMP_NUM_THREADS=1 even for a single CPU process, which halves
    the speed on two cores; we undo that here.
    """
    if torch.device(device).type != "cpu":
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // num_processes))


def loader_workers(asked: int | None, dataset, num_processes: int = 1) -> int:
    """--num-workers, else 0 for tensors already in memory (a worker would only copy them) and
    for code maps (a batch costs at most a millisecond), and, for images decoded as they are
    read, one worker per core this process does not train on."""
    if asked is not None:
        if asked < 0:
            raise UserError(f"--num-workers {asked} must be 0 (decode in the training process) or more")
        return asked
    if getattr(dataset, "cheap_to_read", False):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores // num_processes - 1))


def warmup_cosine(optimizer, lr_warmup_steps: int, total_steps: int, rewarm_at: int | None = None, rewarm_steps: int = 0) -> LambdaLR:
    """Linear warm-up to the peak rate, then a cosine decay to zero at `total_steps`, for the
    optimizer's first parameter group (the model's) and any group marked `"scheduled": True`;
    the other companions' groups keep their rate. From step `rewarm_at` the model's rate warms
    up again over `rewarm_steps`, from near zero back to the cosine: where a new loss term starts
    (stage one's discriminator), Adam's steps swell until its second moment has caught up."""
    lr_warmup_steps = min(lr_warmup_steps, max(total_steps // 4, 1))

    def cosine(step):
        if step < lr_warmup_steps:
            return (step + 1) / lr_warmup_steps
        progress = (step - lr_warmup_steps) / max(1, total_steps - lr_warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def model_factor(step):
        if rewarm_at is not None and rewarm_at <= step < rewarm_at + rewarm_steps:
            return cosine(step) * (step - rewarm_at + 1) / rewarm_steps
        return cosine(step)

    companions = optimizer.param_groups[1:]
    return LambdaLR(optimizer, [model_factor, *(cosine if group.get("scheduled") else (lambda step: 1.0) for group in companions)])


def batches_per_epoch(loader) -> int | None:
    """None for a stream, whose length is unknown."""
    return None if isinstance(loader.dataset, StreamedImages) else len(loader)


def total_steps(config: LoopConfig, batches_per_epoch: int | None) -> int:
    """--max-steps, else --epochs of the data but at least --min-steps: a model needs about as many
    updates on 1,000 images as on 60,000, which epochs alone would not give it."""
    if config.max_steps is not None:
        return config.max_steps
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    return max(1, config.min_steps, round(config.epochs * steps_per_epoch))


def describe_length(config: LoopConfig, steps: int, batches_per_epoch: int) -> str:
    """Why a run has the steps it has, for its summary line."""
    if config.max_steps is not None:
        return f"{steps} steps (--max-steps)"
    if steps > round(config.epochs * math.ceil(batches_per_epoch / config.gradient_accumulation_steps)):
        epochs = steps * config.gradient_accumulation_steps / max(1, batches_per_epoch)
        return f"{steps} steps ({epochs:.3g} epochs: --epochs {config.epochs:g} would give fewer than --min-steps {config.min_steps})"
    return f"{steps} steps ({config.epochs:g} epochs)"


def batches_from(accelerator: Accelerator, dataloader, start_step: int, accumulation: int):
    """Yield (epoch, batch) forever, starting where `start_step` optimizer steps left off.

    The seedable sampler makes each epoch's order a function of (seed, epoch), and skipping
    the batches already seen makes a resumed run see exactly what an uninterrupted one would.
    Starting an epoch draws a worker seed from the global RNG; a resumed run starts its first
    epoch at another step, so that draw is kept off the global RNG, which label dropout,
    dead-code restarts and dropout use and every checkpoint restores.
    """
    if isinstance(dataloader.dataset, StreamedImages):
        yield from stream_batches(accelerator, dataloader, start_step * accumulation)
        return
    steps_per_epoch = math.ceil(len(dataloader) / accumulation)
    epoch, step_in_epoch = divmod(start_step, steps_per_epoch)
    skip = step_in_epoch * accumulation
    while True:
        loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        loader.set_epoch(epoch)
        for batch in one_pass(loader):
            yield epoch, batch
        epoch, skip = epoch + 1, 0


def one_pass(loader):
    """The batches of one epoch. Starting the iterator draws worker seeds from the global RNG,
    at another step in a resumed run, so that draw is kept off it."""
    batches = iter(loader)
    with torch.random.fork_rng(devices=[]):
        batch = next(batches, None)
    while batch is not None:
        yield batch
        batch = next(batches, None)


def stream_batches(accelerator: Accelerator, dataloader, skip: int):
    """Yield (epoch, batch on the device) forever from this process's part of a stream, one
    pass per epoch, each shuffled anew. A stream cannot jump: a resumed run reads and drops
    the `skip` batches it had already trained on, and so sees what an uninterrupted run would."""
    epoch = 0
    while True:
        dataloader.dataset.set_epoch(epoch)
        empty = True
        for batch in one_pass(dataloader):
            empty = False
            if skip:
                skip -= 1
            else:
                yield epoch, send_to_device(batch, accelerator.device)
        if empty:
            raise UserError("this process's part of the stream holds less than one batch; lower --batch-size or use fewer processes")
        epoch += 1


class MetricsLog:
    """Metrics to accelerate's trackers (TensorBoard when installed) and to a JSONL file."""

    def __init__(self, accelerator: Accelerator, path: Path, project_name: str, config: dict):
        self.accelerator, self.path = accelerator, path
        accelerator.init_trackers(project_name, config={k: v for k, v in config.items() if v is not None})

    def log(self, metrics: dict, step: int) -> None:
        metrics = {k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
        self.accelerator.log(metrics, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as file:
                file.write(json.dumps({"step": step, "time": round(time.time(), 1), **metrics}) + "\n")


def read_log(path: Path) -> list[dict]:
    """The entries of a log.jsonl, in order; a line a kill left half written is not one."""
    path = Path(path)
    entries = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "step" in entry:
            entries.append(entry)
    return entries


def truncate_log(path: Path, step: int) -> None:
    """Keep the entries of steps up to `step`, where this run starts or resumes: a resumed run
    logs again what followed its checkpoint, and must not repeat it (nor append to a line
    the kill left half written)."""
    if not path.exists():
        return
    staging = path.with_suffix(".jsonl.tmp")
    staging.write_text("".join(json.dumps(entry) + "\n" for entry in read_log(path) if entry["step"] <= step))
    os.replace(staging, path)


class Checkpoints:
    """`<stage>/checkpoints/step_NNNNNNN`, each written under a temporary name, then renamed.

    A folder whose name starts with a dot is an unfinished write and is never resumed from.
    """

    def __init__(self, directory: Path, keep: int):
        self.directory, self.keep = Path(directory), keep

    def all(self) -> list[Path]:
        if not self.directory.exists():
            return []
        found = [p for p in self.directory.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / PROGRESS_FILE).exists()]
        return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))

    def newest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, accelerator: Accelerator, progress: dict) -> Path:
        """Save the accelerator's state plus `progress` (a JSON dict holding at least `step`)."""
        step = progress["step"]
        final = self.directory / f"{CHECKPOINT_PREFIX}{step:07d}"
        staging = self.directory / f".tmp-{final.name}"
        if accelerator.is_main_process and self.directory.exists():
            for unfinished in self.directory.glob(".tmp-*"):  # left by a killed save
                shutil.rmtree(unfinished, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (staging / PROGRESS_FILE).write_text(json.dumps(progress) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            for old in self.all()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def load(self, accelerator: Accelerator, checkpoint: Path) -> dict:
        accelerator.load_state(str(checkpoint))
        return json.loads((checkpoint / PROGRESS_FILE).read_text())


def check_can_start(checkpoints: Checkpoints, config: LoopConfig, what: str) -> None:
    """Refuse, before any work, to resume from nothing or to train over an existing run."""
    newest = checkpoints.newest()
    if config.resume and newest is None:
        raise UserError(f"--resume found no checkpoint in {checkpoints.directory}; run without --resume to start {what}")
    if newest is not None and not (config.resume or config.overwrite):
        raise UserError(
            f"{checkpoints.directory} already holds a run of {what} (checkpoint {newest.name}); pass --resume to "
            f"continue it, --overwrite to start again, or choose another --run-dir"
        )


# Flags that change what is logged, kept or evaluated, but not the weights a run trains.
BOOKKEEPING_FLAGS = {"run_dir", "resume", "overwrite", "allow_changes", "log_every", "eval_every", "patience", "checkpoint_every",
                     "keep_checkpoints", "dump", "grid_images", "grid_samples", "guidance_scales", "guidance_samples",
                     "num_workers", "cuda_graph", "map_transforms", "report_to"}  # how images are decoded or computed, not which


def changed_flags(saved: dict, config) -> dict:
    """{flag: (was, now)} for the flags that differ from a saved run's and change its training.
    A run saved before a flag existed trained as `config.FLAGS_ADDED_SINCE` says it did; a flag
    since renamed (`config.RENAMED_FLAGS`) is read under its new name. A flag that the run
    chooses from its data when left out (`config.CHOSEN_FROM_DATA`) matches on either side when
    left out (None): the same data makes the same choice."""
    renamed = {old[2:].replace("-", "_"): new[2:].replace("-", "_") for old, new in getattr(config, "RENAMED_FLAGS", {}).items()}
    saved = {**config.FLAGS_ADDED_SINCE, **{renamed.get(key, key): value for key, value in saved.items()}}
    from_data = getattr(config, "CHOSEN_FROM_DATA", ())
    return {key: (saved[key], value) for key, value in asdict(config).items()
            if key in saved and saved[key] != value and key not in BOOKKEEPING_FLAGS
            and not (key in from_data and None in (saved[key], value))}


def describe_changes(changes: dict) -> str:
    return ", ".join(f"--{key.replace('_', '-')} {now} (was {was})" for key, (was, now) in changes.items())


def check_resume_flags(config: LoopConfig, saved_config: Path, what: str) -> dict:
    """With --resume, refuse flags that differ from the run's (a new learning rate or horizon,
    another batch size: the optimizer and data order in the checkpoint no longer fit), unless
    --allow-changes says so; returns the changes allowed."""
    if not config.resume or not saved_config.exists():
        return {}
    changes = changed_flags(json.loads(saved_config.read_text()), config)
    if changes and not config.allow_changes:
        raise UserError(
            f"--resume would continue {what} with other flags than it was trained with: {describe_changes(changes)}; "
            f"resume with the flags in {saved_config}, or add --allow-changes to continue anyway (no longer exact)"
        )
    return changes


def record_config(config: LoopConfig, path: Path, step: int) -> None:
    """The flags in force, and, for every resume, the step it started from and what it changed."""
    resumes = []
    if config.resume and path.exists():
        saved = json.loads(path.read_text())
        changes = {key: {"was": was, "now": now} for key, (was, now) in changed_flags(saved, config).items()}
        resumes = saved.get("resumes", []) + [{"step": step, "changed": changes}]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**asdict(config), "resumes": resumes}, indent=2) + "\n")


def start_or_resume(accelerator: Accelerator, checkpoints: Checkpoints, config: LoopConfig, what: str) -> dict:
    """Load the newest checkpoint with --resume and return its progress; else start at step 0."""
    check_can_start(checkpoints, config, what)
    if config.resume:
        newest = checkpoints.newest()
        try:
            progress = checkpoints.load(accelerator, newest)
        except (RuntimeError, ValueError, KeyError) as error:
            saved = checkpoints.directory.parent / "train_config.json"
            changes = describe_changes(changed_flags(json.loads(saved.read_text()), config)) if saved.exists() else ""
            raise UserError(
                f"checkpoint {newest} does not fit the model these flags build ({changes or error}); "
                f"resume with the flags in {saved} or start again with --overwrite"
            ) from None
        accelerator.print(f"Resuming {what} from step {progress['step']} ({newest})")
        return progress
    if checkpoints.directory.exists() and accelerator.is_main_process:
        shutil.rmtree(checkpoints.directory)
    accelerator.wait_for_everyone()
    return {"step": 0}


@dataclass
class TrainingSetup:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: object
    test_loader: object
    scheduler: LambdaLR
    steps: int
    state: dict  # at least {"step": int}; saved in every checkpoint
    log: "MetricsLog"
    # modules trained beside the model, such as a discriminator: prepared, accumulated and
    # checkpointed with it, stepped by the same optimizer, never clipped, scheduled only where asked
    companions: list = field(default_factory=list)


def set_up_training(
    accelerator: Accelerator, config: LoopConfig, stage_dir: Path, checkpoints: Checkpoints,
    model, train_data, test_data, what: str, initial_state: dict, companions=(), checkpointed=(), betas=(0.9, 0.999),
    rewarm_at: int | None = None, rewarm_steps: int = 0,
) -> TrainingSetup:
    """Build the loaders and the optimizer, prepare everything with accelerate, then start at
    step 0 or resume from a checkpoint.

    `companions` are (module, {"lr": ..., "betas": ..., "scheduled": bool}) pairs trained alongside the model, each a
    parameter group of the one optimizer: under fp16 one gradient scaler then unscales every
    gradient once and steps once (two optimizers would have the second unscaled twice).
    `checkpointed` holds objects with a state_dict saved in every checkpoint (an EMA of the
    weights); they are restored too when the run resumes. `betas` are the model's AdamW betas;
    `rewarm_at` and `rewarm_steps` warm the model's rate up again mid-run (`warmup_cosine`).
    """
    # Drop a last, smaller batch only when every process still gets a full one: accelerate deals
    # whole batches out to the processes, so 64 images in batches of 40 on 2 processes would
    # leave both with none.
    workers = loader_workers(config.num_workers, train_data, accelerator.num_processes)
    test_loader = eval_loader(test_data, config.batch_size * 4)
    model.to(accelerator.device)
    modules = [module.to(accelerator.device) for module, _ in companions]
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    groups += [{"params": list(module.parameters()), "weight_decay": 0.0, **options} for module, options in companions]
    # On CUDA one fused kernel updates every weight, where the default (foreach) launches a dozen
    # and, under fp16, reads the scaler's overflow flag back to the host every step.
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=betas, weight_decay=config.weight_decay,
                                  fused=accelerator.device.type == "cuda")
    if isinstance(train_data, StreamedImages):  # each process reads its own part; accelerate must not split it again
        if config.max_steps is None:
            raise UserError(f"--streaming reads a stream whose length is unknown; give --max-steps (e.g. {config.min_steps}, "
                            "this stage's floor on a data set of known size)")
        train_loader = DataLoader(train_data.for_process(accelerator.process_index, accelerator.num_processes),
                                  batch_size=config.batch_size, collate_fn=collate_batches, drop_last=True,
                                  num_workers=workers, pin_memory=accelerator.device.type == "cuda")
        model, *companions, optimizer, test_loader = accelerator.prepare(model, *modules, optimizer, test_loader)
    else:
        train_loader = DataLoader(
            train_data, batch_size=config.batch_size, shuffle=True, collate_fn=collate_batches,
            drop_last=len(train_data) >= config.batch_size * accelerator.num_processes,
            num_workers=workers, persistent_workers=workers > 0, pin_memory=accelerator.device.type == "cuda",
        )
        model, *companions, optimizer, train_loader, test_loader = accelerator.prepare(
            model, *modules, optimizer, train_loader, test_loader)
    # checked here, after every choice made from the data (stage one's --min-steps), not in open_stage
    changes = check_resume_flags(config, stage_dir / "train_config.json", what)
    if changes:
        accelerator.print(f"Resuming {what} with changed flags (--allow-changes): {describe_changes(changes)}")
    steps = total_steps(config, batches_per_epoch(train_loader))
    scheduler = warmup_cosine(optimizer, config.lr_warmup_steps, steps, rewarm_at, rewarm_steps)
    for saved in (scheduler, *checkpointed):
        accelerator.register_for_checkpointing(saved)
    state = {**initial_state, **start_or_resume(accelerator, checkpoints, config, what)}
    if accelerator.is_main_process:
        record_config(config, stage_dir / "train_config.json", state["step"])
        truncate_log(stage_dir / "log.jsonl", state["step"])
    log = MetricsLog(accelerator, stage_dir / "log.jsonl", stage_dir.name, asdict(config))
    return TrainingSetup(model, optimizer, train_loader, test_loader, scheduler, steps, state, log, companions)


def cuda_graphs_apply(accelerator: Accelerator, config: LoopConfig) -> bool:
    """Whether a step can be replayed as a CUDA graph here: one CUDA process, one micro-batch a
    step, no fp16 (its loss scaler decides on the host whether a step counts)."""
    return (config.cuda_graph and accelerator.device.type == "cuda" and accelerator.num_processes == 1
            and config.gradient_accumulation_steps == 1 and accelerator.mixed_precision != "fp16")


def describe_graphs(captured: CapturedStep | None, why_not: str | None = None) -> str:
    """For a stage's summary line: how its steps ran, where they could be graphed; `why_not`:
    why a step that could have been graphed here was not."""
    if captured is None:
        return f", steps run without CUDA graphs ({why_not})" if why_not else ""
    if captured.failed:
        return ", steps run without a CUDA graph (its capture failed)"
    return (f", {captured.replays} of {captured.steps} steps replayed as CUDA graphs "
            f"({captured.captures} captured, the others warming them up)")


def run_training_loop(
    accelerator: Accelerator, config: LoopConfig, setup: TrainingSetup, checkpoints: Checkpoints,
    train_step, evaluate, desc: str, after_step=None, hint: str = "", estimate_also_at: tuple[int, ...] = (),
    graph_key=None,
) -> CapturedStep | None:
    """The loop both stages share: accumulate, clip, step, log, evaluate, checkpoint.

    `train_step(batch)` returns (loss, metrics to log, items in the batch); `evaluate(step)`
    returns a one-line summary and may record its best score in `state`, which is saved
    with every checkpoint, so a resumed run knows it too; where it sets `state["stopped"]` (why),
    the loop saves a checkpoint and ends there, and a resumed run stays stopped. `after_step(step)`, where given,
    runs after every optimizer step (an EMA of the weights follows them there). After a few
    steps, and again after each step of `estimate_also_at` (where the pace changes), it prints
    the time left at that pace, and `hint`: what would shorten it. With `graph_key(step)` (what
    the step computes at `step`, as far as Python decides it), forward and backward are replayed
    as a CUDA graph (captured_step.py); the CapturedStep is returned, to say how it went.
    """
    model, optimizer, scheduler, state, steps = setup.model, setup.optimizer, setup.scheduler, setup.state, setup.steps
    progress = tqdm(total=steps, initial=state["step"], desc=desc, disable=not accelerator.is_main_process)
    model.train()
    seen, clock = 0, time.time()
    time_left = TimeLeft(state["step"], steps, hint, estimate_also_at)

    def forward_backward(batch):
        loss, metrics, items = train_step(batch)
        accelerator.backward(loss)
        if config.grad_clip and accelerator.sync_gradients:  # the model's gradients only, not its companions'
            accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        # detached, so that nothing kept until the next step holds this step's autograd graph
        # (whose gradient nodes, kept alive, would belong to the last step's CUDA stream)
        return loss.detach(), {k: v.detach() if torch.is_tensor(v) else v for k, v in metrics.items()}, items

    captured = None
    if graph_key is not None:
        captured = CapturedStep(forward_backward, [p for group in optimizer.param_groups for p in group["params"]])
    for epoch, batch in batches_from(accelerator, setup.train_loader, state["step"], config.gradient_accumulation_steps):
        if state["step"] >= steps or "stopped" in state:
            break
        with accelerator.accumulate(model, *setup.companions):
            if captured is not None:
                loss, metrics, items = captured(batch, graph_key(state["step"]))
            else:
                loss, metrics, items = forward_backward(batch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seen += items * accelerator.num_processes
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        state["step"] = step = state["step"] + 1
        if after_step is not None:
            after_step(step)
        progress.update(1)
        estimate = time_left.step_done(step)
        if estimate and accelerator.is_main_process:
            progress.write(f"{desc}: {estimate}")
        if step % config.log_every == 0 or step == steps:
            metrics = {f"train/{k}": (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
            metrics.update({"train/lr": float(scheduler.get_last_lr()[0]), "train/items_per_s": seen / (time.time() - clock), "epoch": epoch})
            setup.log.log(metrics, step)
            progress.set_postfix({k[6:]: f"{v:.4g}" for k, v in metrics.items() if k.startswith("train/") and k != "train/lr"}, refresh=False)
            seen, clock = 0, time.time()
        if step % config.eval_every == 0 or step == steps:
            progress.write(f"step {step}: {evaluate(step)}")
            model.train()
        if step % config.checkpoint_every == 0 or step == steps or "stopped" in state:
            checkpoints.save(accelerator, state)
        if "stopped" in state:
            progress.write(f"{desc} stops at step {step} of {steps}: {state['stopped']}")
            break
        if step % config.eval_every == 0 or step % config.checkpoint_every == 0:
            seen, clock = 0, time.time()  # throughput counts training only
            time_left.resume()
    progress.close()
    return captured

