"""`python -m pipelines.benchmark`: how fast each stage runs on this machine, side by side.

It needs no trained run: models are built at the sizes of each configuration with random
weights and fed synthetic inputs of the right shapes. Every figure is the median of several
timed repetitions after a warm-up (synchronised on the GPU), shown with its spread, and the
peak memory of that figure alone. With no flags it measures every row, "large" in CPU-sized
parts on a CPU (its full sizes take hours there).

    python -m pipelines.benchmark --quick          # the rows a user checks first: a few minutes on a laptop CPU
    python -m pipelines.benchmark                  # every row (about ten minutes on two cores)
"""

import json
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from foundation.captured_step import CapturedStep
from foundation.cli import parse_config
from foundation.data import DataConfig, StreamedImages, collate_batches, from_hf_dataset, from_streams
from foundation.errors import UserError, run_cli
from foundation.training import bf16_is_fast, use_all_cores
from pipelines.pipeline import pick_device
from stage1_vqvae.model import VQVAE
from stage2_prior import static_decoding
from stage2_prior.maskgit import MaskGITPrior
from stage2_prior.pixelcnn import GatedPixelCNN
from stage2_prior.priors import training_loss
from stage2_prior.quality import autocast_for
from stage2_prior.transformer import TransformerPrior

# Sizes of each configuration. "small" is the default run on the built-in data set; "large"
# the scale of the VQ-VAE paper's ImageNet model (128x128x3 images, 32x32 maps, K=1024).
CONFIGS = {
    "small": dict(
        channels=1, image_size=32, downsample=4, codebook_size=512, code_dim=64, hidden=128, res_blocks=2,
        transformer=dict(width=128, layers=4, heads=2), pixelcnn=dict(channels=128, layers=8),
        train_batch=128, encode_batch=512, prior_batch=128, samples=64, data_images=2048,
    ),
    "large": dict(
        channels=3, image_size=128, downsample=4, codebook_size=1024, code_dim=64, hidden=128, res_blocks=2,
        transformer=dict(width=512, layers=12, heads=8), pixelcnn=dict(channels=128, layers=16),  # 16 x 2 codes: sees all 32x32
        train_batch=32, encode_batch=64, prior_batch=16, samples=64, data_images=512,
    ),
    "tiny": dict(  # for the test of the benchmark itself
        channels=1, image_size=16, downsample=4, codebook_size=16, code_dim=8, hidden=16, res_blocks=1,
        transformer=dict(width=32, layers=1, heads=2), pixelcnn=dict(channels=8, layers=2),
        train_batch=4, encode_batch=4, prior_batch=4, samples=2, data_images=16,
    ),
}
# "large" on a CPU: smaller batches, and no naive sampling of its maps (1024 full-prefix passes
# per map would take hours).
CPU_SIZED_LARGE = dict(train_batch=4, encode_batch=8, prior_batch=2, samples=2)
# --quick: the rows a user checks first, on "small": the training speed of both stages (stage
# one with its discriminator too) and 64 images drawn by the transformer and MaskGIT, each
# their default way.
QUICK = dict(configs="small", parts="stage1,stage2,sampling", priors="transformer,maskgit")


@dataclass
class BenchmarkConfig:
    configs: str | None = field(default=None, metadata={"help": "comma-separated: small, large, tiny (default: small,large; "
                                                                   "small with --quick)"})
    device: str = field(default="auto", metadata={"help": "where to measure", "choices": ["auto", "cuda", "mps", "cpu"]})
    quick: bool = field(default=False, metadata={"help": "only the rows a user checks first (both stages' training speed, "
                                                       "64 images drawn), fewer repetitions: a few minutes on a laptop CPU"})
    repeats: int | None = field(default=None, metadata={"help": "timed repetitions per figure (default: 5, 3 with --quick)"})
    json: str | None = field(default=None, metadata={"help": "also write the results to this JSON file"})
    parts: str | None = field(default=None, metadata={"help": "comma-separated: which parts to time, of data, stage1, "
                                                               "stage2, sampling (default: all; all but data with --quick)"})
    priors: str | None = field(default=None, metadata={"help": "comma-separated: which priors to time, of transformer, "
                                                                "pixelcnn, maskgit (default: all; not pixelcnn with --quick)"})


def reset_peak_rss() -> bool:
    """Linux lets a process reset its peak RSS to the current one (5 into /proc/self/clear_refs),
    so that each figure reports its own peak; False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    """Median and spread of `repeats` runs of fn after `warmup` runs, and the peak memory."""

    def __init__(self, device: torch.device, repeats: int, warmup: int = 3):
        # On a CPU the first few calls are slow (oneDNN builds its kernels): one warm-up call
        # under-reported stage-one training by 15% here, three did not.
        self.device, self.repeats, self.warmup = device, repeats, warmup

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def __call__(self, fn) -> dict:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rss_per_row = self.device.type != "cuda" and reset_peak_rss()
        for _ in range(self.warmup):  # a call longer than a second has warmed itself up
            start = time.perf_counter()
            fn()
            self._sync()
            if time.perf_counter() - start > 1.0:
                break
        seconds = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            fn()
            self._sync()
            seconds.append(time.perf_counter() - start)
        if self.device.type == "cuda":
            memory, kind = torch.cuda.max_memory_allocated() / 2**20, "cuda max allocated"
        elif rss_per_row:
            memory, kind = peak_rss_since_reset_mb(), "peak RSS of this figure"
        else:
            memory, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS so far"
        return {"seconds": statistics.median(seconds), "min": min(seconds), "max": max(seconds),
                "peak_memory_mb": round(memory, 1), "memory_kind": kind}


def row(config, stage, name, unit, items, timing) -> dict:
    """Throughput in `unit` from a timing of `items` items, with the spread over repetitions."""
    return {
        "config": config, "stage": stage, "name": name, "unit": unit,
        "value": items / timing["seconds"], "low": items / timing["max"], "high": items / timing["min"],
        "seconds": timing["seconds"], "peak_memory_mb": timing["peak_memory_mb"], "memory_kind": timing["memory_kind"],
    }


def build_vqvae(sizes, device) -> VQVAE:
    return VQVAE(
        in_channels=sizes["channels"], image_size=sizes["image_size"], downsample=sizes["downsample"],
        codebook_size=sizes["codebook_size"], code_dim=sizes["code_dim"], hidden_channels=sizes["hidden"],
        res_blocks=sizes["res_blocks"],
    ).to(device)


def build_priors(sizes, device) -> dict:
    side = sizes["image_size"] // sizes["downsample"]
    common = dict(codebook_size=sizes["codebook_size"], map_height=side, map_width=side, num_classes=10)
    return {
        "transformer": TransformerPrior(**common, **sizes["transformer"], dropout=0.0, label_every_code=True,
                                        code_vector_dim=sizes["code_dim"]).to(device),  # as stage two builds it, with the VQ-VAE's codebook
        "pixelcnn": GatedPixelCNN(**common, **sizes["pixelcnn"]).to(device),
        # the transformer's sizes, so that the two sampling schemes compare on one network
        "maskgit": MaskGITPrior(**common, **sizes["transformer"], dropout=0.0).to(device),
    }


def data_rows(name, sizes, timer) -> list[dict]:
    """How fast the loader delivers training batches, to set beside stage one's training rows:
    images held in memory, and images decoded as they are read (a split over --max-memory-gb)
    by the training process itself or by 1 or 2 DataLoader workers: PNG files of a folder,
    PNG bytes stored in Arrow, as a Hub data set holds them, and the files read as a stream
    (--streaming), shuffled among its buffer as training reads it."""
    import datasets
    import numpy as np
    from PIL import Image

    rows, count, side = [], sizes["data_images"], sizes["image_size"]
    generator = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i in range(count + 2):  # smooth shapes plus noise: PNGs about as hard to decode as photos
            pixels = np.clip(np.linspace(0, 255, side)[None, :, None] + generator.normal(0, 40, (side, side, sizes["channels"])), 0, 255)
            image = Image.fromarray(pixels.astype(np.uint8).squeeze(-1) if sizes["channels"] == 1 else pixels.astype(np.uint8))
            paths.append(f"{folder}/{i}.png")
            image.save(paths[-1])
        files = datasets.Dataset.from_dict({"image": paths}).cast_column("image", datasets.Image())
        splits = datasets.DatasetDict({"train": files.select(range(count)), "test": files.select(range(count, count + 2))})
        config = DataConfig(image_size=side)
        stored = datasets.Dataset.from_dict({"image": [{"bytes": Path(path).read_bytes(), "path": None} for path in paths]},
                                            features=datasets.Features({"image": datasets.Image()}))
        in_arrow = datasets.DatasetDict({"train": stored.select(range(count)), "test": stored.select(range(count, count + 2))})
        sources = {
            "in memory": from_hf_dataset(splits, config, "benchmark").train,
            "PNG files decoded as read": from_hf_dataset(splits, replace(config, max_memory_gb=0), "benchmark").train,
            "PNG in Arrow decoded as read": from_hf_dataset(in_arrow, replace(config, max_memory_gb=0), "benchmark").train,
            "PNG files streamed": from_streams({split: files.to_iterable_dataset(num_shards=min(64, len(files)))
                                                for split, files in splits.items()}, config, "benchmark").train.for_process(0, 1),
        }
        runs = [("in memory", 0)] + [(label, workers) for label in list(sources)[1:] for workers in (0, 1, 2)]
        for label, workers in runs:
            streamed = isinstance(sources[label], StreamedImages)  # a stream shuffles itself and starts its workers each pass, as training does
            loader = DataLoader(sources[label], batch_size=sizes["train_batch"], shuffle=not streamed,
                                collate_fn=collate_batches, drop_last=True, num_workers=workers,
                                persistent_workers=workers > 0 and not streamed)

            def one_pass():
                for _ in loader:
                    pass

            what = f"loader, {label}" + (f", {workers} worker{'' if workers == 1 else 's'}" if label != "in memory" else "")
            images = count // sizes["train_batch"] * sizes["train_batch"]
            rows.append(row(name, "data", what, "images/s", images, timer(one_pass)))
    return rows


def stage_one_rows(name, sizes, device, timer, autocast_modes, quick: bool = False) -> list[dict]:
    """Training steps as stage one takes them (gradients clipped, AdamW fused on CUDA): the
    VQ-VAE alone in each precision; on CUDA also replayed as a CUDA graph (as training does
    there), channels-last and compiled (each compile's first step, which pays for it, timed
    apart); and with the discriminator's terms and its update, the adversarial phase's step.
    `quick`: the steps as training takes them by default only."""
    rows, channels_last = [], torch.channels_last
    images = torch.rand(sizes["train_batch"], sizes["channels"], sizes["image_size"], sizes["image_size"], device=device)
    best_label, best_dtype = autocast_modes[-1]
    variants = [(f"train {label}", dtype, {}) for label, dtype in autocast_modes[-1 if quick else 0:]]
    if device.type == "cuda" and quick:
        variants = [(f"train {best_label}, CUDA graph", best_dtype, dict(graph=True))]
    elif device.type == "cuda":
        variants += [(f"train {best_label}, CUDA graph", best_dtype, dict(graph=True)),
                     (f"train {best_label}, channels-last", best_dtype, dict(memory_format=channels_last)),
                     (f"train {best_label}, compiled", best_dtype, dict(compile="default")),
                     (f"train {best_label}, compiled reduce-overhead", best_dtype, dict(compile="reduce-overhead"))]
    variants.append((f"train {best_label} with the discriminator", best_dtype, dict(discriminator=True)))
    if device.type == "cuda":
        variants.append((f"train {best_label} with the discriminator, CUDA graph", best_dtype, dict(discriminator=True, graph=True)))
    for what, dtype, options in variants:
        try:
            step = stage_one_step(sizes, device, images, dtype, **options)
            if "compile" in options:
                rows.append(row(name, "stage1", f"{what}, first step", "images/s", len(images), Timer(device, 1, warmup=0)(step)))
            # a graph is captured after the training loop's warm-up steps: time the replays
            timing = Timer(device, timer.repeats, warmup=CapturedStep.EAGER_STEPS_BEFORE_CAPTURE + 2)(step) if "graph" in options else timer(step)
            rows.append(row(name, "stage1", what, "images/s", len(images), timing))
        except Exception as error:  # noqa: BLE001  (a figure that cannot be had is reported, the others still measured)
            rows.append({"config": name, "stage": "stage1", "name": what, "failed": f"{type(error).__name__}: {error}"[:300]})
    if quick:
        return rows
    model = build_vqvae(sizes, device).eval()
    encode_batch = torch.rand(sizes["encode_batch"], *images.shape[1:], device=device)
    with torch.inference_mode():  # in fp32, as the dump encodes, so that code maps never depend on the hardware
        rows.append(row(name, "stage1", "encode (dump, fp32)", "images/s", len(encode_batch), timer(lambda: model.encode(encode_batch))))
    return rows


def stage_one_step(sizes, device, images, dtype, memory_format=torch.contiguous_format, compile=None, discriminator=False,
                   graph=False):
    """One optimizer step of a fresh VQ-VAE (and discriminator) on `images`, as a function."""
    from stage1_vqvae.gan_loss import GANLoss, LossConfig, build_discriminator

    model = build_vqvae(sizes, device).to(memory_format=memory_format)
    images = images.contiguous(memory_format=memory_format)
    config = LossConfig(disc_start=0 if discriminator else -1, disc_channels=32)
    critic = build_discriminator(config, sizes["channels"])
    critic = critic.to(device, memory_format=memory_format) if critic is not None else None
    if compile:
        for network in (model.encoder, model.decoder, critic):
            if network is not None:
                network.compile(mode=None if compile == "default" else compile)
    autocast = lambda: torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)  # noqa: E731
    loss = GANLoss(config, critic, None, autocast)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    groups += [{"params": list(critic.parameters()), "lr": config.disc_lr, "betas": (0.5, 0.9)}] if critic is not None else []
    optimizer = torch.optim.AdamW(groups, lr=1e-4, fused=device.type == "cuda")
    last_layer = model.decoder[-1].weight

    def forward_backward(batch):
        with autocast():
            output = model(batch["images"])
        total, _ = loss(batch["images"], output.reconstruction.float(), last_layer, step=0)
        (total + output.quantizer.loss).backward()
        torch.nn.utils.clip_grad_norm_(groups[0]["params"], 1.0)
        return total

    captured = CapturedStep(forward_backward, [p for group in groups for p in group["params"]]) if graph else None

    def train_step():
        if captured is not None:
            captured({"images": images}, key=0)
        else:
            forward_backward({"images": images})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train_step


def stage_two_rows(name, sizes, device, timer, dtype, kinds) -> list[dict]:
    rows = []
    side = sizes["image_size"] // sizes["downsample"]
    codes = torch.randint(0, sizes["codebook_size"], (sizes["prior_batch"], side, side), device=device)
    labels = torch.randint(0, 10, (len(codes),), device=device)
    for kind, prior in build_priors(sizes, device).items():
        if kind not in kinds:
            continue
        optimizer = torch.optim.AdamW(prior.parameters(), lr=1e-4)

        def train_step():
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = training_loss(prior, codes, labels, kind)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        precision = "bf16" if dtype else "fp32"
        rows.append(row(name, "stage2", f"train {kind} {precision}", "codes/s", codes.numel(), timer(train_step)))
    return rows


def decodings(kind: str, device: torch.device, naive: bool) -> list[str]:
    """The ways each prior draws its codes: the transformer's CUDA graph (CUDA only), static and
    growing caches, the PixelCNN's layer caches, and each one's naive loop (the whole prefix per
    code). The static cache uncaptured is the graph's twin on CUDA; elsewhere it is timed only
    beside the naive loop (on a CPU the growing cache is the faster and the default)."""
    if kind == "maskgit":
        return ["passes"]
    cuda = device.type == "cuda"
    loops = (["graph"] if kind == "transformer" and cuda else [])
    loops += (["static"] if kind == "transformer" and (cuda or naive) else []) + ["cache"]
    return loops + (["naive"] if naive else [])


def sampling_rows(name, sizes, device, timer, naive: bool, kinds, quick: bool = False) -> tuple[list[dict], dict]:
    """End to end: `samples` code maps from each prior, then the decoder, in every way the prior
    can decode (`decodings`); MaskGIT in its default passes. On CUDA also the first call of the
    graph, its capture included. Speed-ups: the graph over the uncaptured steps, the caches over
    the naive loop, MaskGIT over the transformer's default way. `quick`: each prior's default way only."""
    rows, speedups, seconds = [], {}, {}
    vqvae = build_vqvae(sizes, device).eval()
    n = sizes["samples"]
    labels = torch.arange(n, device=device) % 10
    priors = {kind: prior for kind, prior in build_priors(sizes, device).items() if kind in kinds}
    default = {"maskgit": "passes", "transformer": "graph" if device.type == "cuda" else "cache", "pixelcnn": "cache"}
    for kind, prior in priors.items():
        prior.eval()
        loops = [default[kind]] if quick else decodings(kind, device, naive)
        for loop in loops:
            options = {} if kind == "maskgit" else dict(decoding=loop)

            def sample_and_decode():
                with torch.inference_mode(), autocast_for(device):
                    vqvae.decode(prior.generate(n, labels, **options))

            if loop == "graph" and not quick:  # a fresh capture, timed once: what the first call of a session pays
                static_decoding.forget_decoders(prior)
                rows.append(row(name, "sampling", f"{n} images, {kind}, graph, first call", "images/s", n,
                                Timer(device, repeats=1, warmup=0)(sample_and_decode)))
            what = f"{prior.default_steps} passes" if kind == "maskgit" else loop
            result = row(name, "sampling", f"{n} images, {kind}, {what}", "images/s", n, timer(sample_and_decode))
            seconds[kind, loop] = result["seconds"]
            rows.append(result)
        for faster, slower in (("graph", "static"), ("graph", "cache"), ("static", "cache"), ("cache", "naive")):
            if faster in loops and slower in loops:
                speedups[f"{kind}: {faster} over {slower}"] = seconds[kind, slower] / seconds[kind, faster]
    if {"maskgit", "transformer"} <= set(priors):
        speedups[f"maskgit over the transformer's {default['transformer']}, {n} images"] = (
            seconds["transformer", default["transformer"]] / seconds["maskgit", "passes"])
    # One image alone: the latency a user waits for, where MaskGIT's few passes pay most. At
    # large batches a CPU is bound by arithmetic, and MaskGIT does `passes` times the
    # KV-cache loop's (every pass runs every position), so there it can be the slower one.
    single = {}
    for kind in [kind for kind in ("transformer", "maskgit") if kind in priors]:
        prior = priors[kind]

        def sample_one():
            with torch.inference_mode(), autocast_for(device):
                vqvae.decode(prior.generate(1, labels[:1]))

        what = f"{prior.default_steps} passes" if kind == "maskgit" else default[kind]
        result = row(name, "sampling", f"1 image, {kind}, {what}", "images/s", 1, timer(sample_one))
        single[kind] = result["seconds"]
        rows.append(result)
    if len(single) == 2:
        speedups[f"maskgit over the transformer's {default['transformer']}, 1 image"] = single["transformer"] / single["maskgit"]
    return rows, speedups


PARTS = ("data", "stage1", "stage2", "sampling")


def choose(listed: str, known, flag: str) -> list[str]:
    names = [name.strip() for name in listed.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        noun = {"configs": "configuration", "parts": "part", "priors": "prior"}[flag]
        raise UserError(f"--{flag} {listed} names no known {noun}; choose from {', '.join(known)}")
    return names


def run_benchmark(config: BenchmarkConfig) -> dict:
    device = pick_device(config.device)
    use_all_cores(device)
    chosen = {"configs": "small,large", "parts": ",".join(PARTS), "priors": "transformer,pixelcnn,maskgit"}
    if config.quick:
        chosen.update(QUICK)
    names, parts, kinds = (choose(getattr(config, flag) or chosen[flag], known, flag) for flag, known in (
        ("configs", CONFIGS), ("parts", PARTS), ("priors", ("transformer", "pixelcnn", "maskgit"))))
    repeats = config.repeats or (3 if config.quick else 5)
    timer = Timer(device, repeats)
    fast_bf16 = bf16_is_fast(device.type)
    results = {"device": describe(device), "torch": torch.__version__, "quick": config.quick, "repeats": repeats,
               "rows": [], "speedup": {}, "sizes": {}}
    for name in names:
        sizes = dict(CONFIGS[name])
        if name == "large" and device.type == "cpu":
            sizes.update(CPU_SIZED_LARGE)
        results["sizes"][name] = {key: value for key, value in sizes.items() if key in CPU_SIZED_LARGE}
        modes = [("fp32", None)]
        if fast_bf16:
            modes.append(("bf16", torch.bfloat16))
        if "data" in parts:
            results["rows"] += data_rows(name, sizes, timer)
        if "stage1" in parts:
            results["rows"] += stage_one_rows(name, sizes, device, timer, modes, config.quick)
        if "stage2" in parts:
            results["rows"] += stage_two_rows(name, sizes, device, timer, torch.bfloat16 if fast_bf16 else None, kinds)
        if "sampling" in parts:
            # the naive loops of the large maps rerun up to 1,023 codes for each of 1,024: hours on a
            # CPU, a minute of a GPU's time for figures known (docs/measurements.md)
            sampling, speedups = sampling_rows(name, sizes, device, timer, naive=name != "large", kinds=kinds, quick=config.quick)
            results["rows"] += sampling
            if speedups:
                results["speedup"][name] = speedups
    return results


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def format_table(results: dict) -> str:
    lines = [f"device: {results['device']}, torch {results['torch']}, median of {results['repeats']} (low-high)"]
    lines.append(f"{'config':<7} {'stage':<9} {'figure':<40} {'value':>22} {'seconds':>9} {'peak MB':>9}")
    for r in results["rows"]:
        if "failed" in r:
            lines.append(f"{r['config']:<7} {r['stage']:<9} {r['name']:<40} failed: {r['failed']}")
            continue
        value = f"{r['value']:.4g} ({r['low']:.3g}-{r['high']:.3g})"
        lines.append(f"{r['config']:<7} {r['stage']:<9} {r['name']:<40} {value:>22} {r['seconds']:>9.4f} {r['peak_memory_mb']:>9.0f}  {r['unit']}")
    for name, speedups in results["speedup"].items():
        for kind, factor in speedups.items():
            lines.append(f"{name:<7} sampling speed-up, {kind}: {factor:.1f}x")
    for name, sizes in results["sizes"].items():
        lines.append(f"{name:<7} sizes: " + ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in sizes.items()))
    return "\n".join(lines)


def main(argv=None):
    config = parse_config(BenchmarkConfig, argv, description=__doc__.splitlines()[0])
    started = time.time()
    results = run_benchmark(config)
    print(format_table(results))
    if config.json:
        Path(config.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"Wrote {config.json}")
    print(f"Benchmark took {time.time() - started:.0f}s")


if __name__ == "__main__":
    run_cli(main)
