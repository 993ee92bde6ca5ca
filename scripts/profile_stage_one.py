"""Where a stage-one training step spends its time on this machine: `python scripts/profile_stage_one.py`.

Profiles steps of the benchmark's "small" configuration (the default run's sizes) with and
without the discriminator, and prints per step: wall time, the GPU's busy time (the sum of its
kernels), kernels launched, host waits (synchronisations and copies back), and the operators
that cost most. A step whose wall time far exceeds the GPU's busy time is bound by launches
(the host), not by arithmetic. Writes the figures to --json too.
"""

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from pipelines.benchmark import CONFIGS, stage_one_step


def profile_step(step, steps: int, device: torch.device) -> dict:
    for _ in range(5):  # warm-up: cuDNN's choices, the allocator
        step()
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as trace:
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device) if device.type == "cuda" else None
    wall = (time.perf_counter() - started) / steps
    events = trace.key_averages()
    count = lambda names: sum(e.count for e in events if e.key in names) / steps  # noqa: E731
    kernels = [e for e in trace.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1e6 / steps  # device_time is in microseconds
    top = sorted(events, key=lambda e: e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total, reverse=True)[:12]
    return {
        "wall_ms": 1000 * wall,  # under the profiler, which slows the host a little
        "gpu_busy_ms": 1000 * busy,
        "kernels": len(kernels) / steps,
        "launches": count({"cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"}),
        "host_waits": count({"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"}),
        "copies": count({"cudaMemcpyAsync", "cudaMemcpy"}),
        "top": [{"op": e.key, "calls": e.count / steps, "self_device_ms": e.self_device_time_total / 1000 / steps,
                 "self_cpu_ms": e.self_cpu_time_total / 1000 / steps} for e in top],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args()
    device, sizes = torch.device(args.device), CONFIGS["small"]
    images = torch.rand(sizes["train_batch"], sizes["channels"], sizes["image_size"], sizes["image_size"], device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    results = {}
    for what, options in (("VQ-VAE", {}), ("with the discriminator", dict(discriminator=True))):
        results[what] = figures = profile_step(stage_one_step(sizes, device, images, dtype, **options), args.steps, device)
        print(f"{what}: {figures['wall_ms']:.2f} ms a step, GPU busy {figures['gpu_busy_ms']:.2f} ms, "
              f"{figures['kernels']:.0f} kernels, {figures['host_waits']:.1f} host waits and {figures['copies']:.1f} copies a step")
        for op in figures["top"]:
            print(f"    {op['op'][:60]:<60} {op['calls']:6.1f} calls  {op['self_device_ms']:7.3f} ms GPU  {op['self_cpu_ms']:7.3f} ms host")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
