#!/usr/bin/env bash
# `make gpu-check`: one check of the CUDA paths on a machine with an NVIDIA GPU.
#
# It runs the tests that need CUDA, `pipelines.benchmark --device cuda` (small, and the large
# maps' sampling), a profile of stage one's step, the whole job with its defaults (stage one,
# stage two, `pipelines.sample --n 64`, `pipelines.evaluate`), then writes every figure and the
# GPU targets, met or not, to one JSON: $GPU_CHECK_DIR/gpu_check.json.
#
# It works offline on a machine that has torch but not `datasets`: carry wheels of what is
# missing in a folder and name it in $WHEELS (made elsewhere with
# `pip download datasets pytest scipy 'torchmetrics[image]' -d wheels`), and the four
# Fashion-MNIST IDX files in $VQ_DATA_DIR. It says what it lacks before it starts.
#
#   GPU_CHECK_DIR   where the run, the logs and gpu_check.json go (default: runs/gpu_check)
#   PYTHON          the interpreter (default: python3)
#   STAGE1_FLAGS, STAGE2_FLAGS   extra flags for the two stages (e.g. "--max-steps 300")
#   BENCHMARK_PARTS              the small benchmark's parts (default: data,stage1,stage2,sampling)
#   TESTS_TIMEOUT                seconds the CUDA tests may take (default 900)
set -euo pipefail

python=${PYTHON:-python3}
out=${GPU_CHECK_DIR:-runs/gpu_check}
run="$out/run"
fail() { echo "gpu-check: $*" >&2; exit 2; }

"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
    fail "no CUDA GPU is visible to $python (torch.cuda.is_available() is False); run this on a machine with an NVIDIA GPU"

missing() { "$python" - <<'EOF'
import importlib.util
need = ["torch", "torchvision", "accelerate", "einops", "datasets", "safetensors", "huggingface_hub", "pytest", "scipy", "torchmetrics"]
print(" ".join(name for name in need if importlib.util.find_spec(name) is None))
EOF
}
lacking=$(missing)
if [ -n "$lacking" ] && [ -n "${WHEELS:-}" ]; then
    echo "gpu-check: installing $lacking from $WHEELS"
    # shellcheck disable=SC2086
    "$python" -m pip install -q --no-index --find-links "$WHEELS" $(echo "$lacking" | sed 's/torchmetrics/torchmetrics[image]/')
    lacking=$(missing)
fi
[ -z "$lacking" ] || fail "missing Python packages: $lacking; install them, or carry their wheels and set WHEELS to that folder"
"$python" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 ||
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

found=""
for dir in "${VQ_DATA_DIR:-}" /usr/share/datasets/fashion-mnist; do
    if [ -n "$dir" ] && [ -f "$dir/train-images-idx3-ubyte.gz" ]; then found=$dir; break; fi
done
[ -n "$found" ] || "$python" -c "import datasets; datasets.load_dataset('zalando-datasets/fashion_mnist')" >/dev/null 2>&1 ||
    fail "Fashion-MNIST is neither in \$VQ_DATA_DIR nor in /usr/share/datasets/fashion-mnist, nor reachable on the Hub; carry its four IDX .gz files and set VQ_DATA_DIR"

mkdir -p "$out"
seconds() { local start=$1; echo $(( $(date +%s) - start )); }
launch=("$python" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)

# Each part runs whatever came before it failed: a one-off GPU session gets every figure it can.
status=0
part() {  # part NAME LOG COMMAND...: run, time, and record the exit status in $out/parts.txt
    local name=$1 log=$2 start rc=0; shift 2
    echo "gpu-check: $name"
    start=$(date +%s)
    "$@" > "$out/$log" 2>&1 || rc=$?
    echo "$name $rc $(seconds "$start")" >> "$out/parts.txt"
    [ "$rc" = 0 ] || { status=1; echo "gpu-check: $name failed ($rc); see $out/$log"; tail -n 5 "$out/$log"; }
}
: > "$out/parts.txt"
part "CUDA tests" tests.log timeout "${TESTS_TIMEOUT:-900}" "$python" -m pytest -q -m cuda -p no:cacheprovider tests
tail -n 1 "$out/tests.log"
# The targets: 64 maps drawn by the transformer as CUDA graphs, small and large, and stage one's
# training steps (eager, as CUDA graphs, channels-last, compiled, with the discriminator).
part "benchmark, small" benchmark.log "$python" -m pipelines.benchmark --device cuda --configs small \
    --parts "${BENCHMARK_PARTS:-data,stage1,stage2,sampling}" --json "$out/benchmark.json"
part "benchmark, large sampling" benchmark_large.log "$python" -m pipelines.benchmark --device cuda --configs large \
    --parts sampling --priors transformer,maskgit --repeats 2 --json "$out/benchmark_large.json"
part "profile of stage one's step" profile.log "$python" scripts/profile_stage_one.py --json "$out/profile.json"
# shellcheck disable=SC2086
part "stage one" stage1.log "${launch[@]}" stage1_vqvae/train.py --run-dir "$run" --overwrite ${STAGE1_FLAGS:-}
# shellcheck disable=SC2086
part "stage two" stage2.log "${launch[@]}" stage2_prior/train.py --run-dir "$run" --overwrite ${STAGE2_FLAGS:-}
part "sample --n 64" sample.log "$python" -m pipelines.sample --run-dir "$run" --n 64 --device cuda
part "evaluate" evaluate.log "$python" -m pipelines.evaluate --run-dir "$run" --device cuda

"$python" - "$out" <<'EOF'
import json, re, sys
from pathlib import Path
import torch
out = Path(sys.argv[1])
read = lambda name: json.loads((out / name).read_text()) if (out / name).exists() else None
parts = {" ".join(line.split()[:-2]): {"status": int(line.split()[-2]), "seconds": int(line.split()[-1])}
         for line in (out / "parts.txt").read_text().splitlines()}
benchmarks = [b for b in (read("benchmark.json"), read("benchmark_large.json")) if b]
rows = {(r["config"], r["name"]): r for b in benchmarks for r in b["rows"] if "failed" not in r}
seconds = lambda config, name: rows[config, name]["seconds"] if (config, name) in rows else None
training = {name: r["value"] for (config, name), r in rows.items()
            if config == "small" and r["stage"] == "stage1" and name.startswith("train") and "discriminator" not in name
            and not name.endswith("first step")}
fastest = max(training, key=training.get) if training else None
target = lambda value, limit, at_most: {"value": value, "target": limit, "met": value is not None and (value <= limit if at_most else value >= limit)}
sample_lines = [line for line in (out / "sample.log").read_text().splitlines() if line.startswith("Wrote")] if (out / "sample.log").exists() else []
figures = {
    "gpu": torch.cuda.get_device_name(0),
    "torch": torch.__version__,
    "parts": parts,
    "targets": {
        "64 small images, transformer, graph (s)": target(seconds("small", "64 images, transformer, graph"), 0.05, True),
        "64 large images, transformer, graph (s)": target(seconds("large", "64 images, transformer, graph"), 2.0, True),
        f"stage one small, fastest step ({fastest}), images/s": target(training.get(fastest), 30000, False),
        "64 small images, maskgit (s)": {"value": seconds("small", "64 images, maskgit, 4 passes")},
        "64 large images, maskgit (s)": {"value": seconds("large", "64 images, maskgit, 4 passes")},
    },
    "stage_one_steps": {name: r["value"] for (config, name), r in rows.items() if config == "small" and r["stage"] == "stage1"},
    "sample": {"line": sample_lines[0], "seconds": float(re.search(r"in ([\d.]+) ?s", sample_lines[0]).group(1))} if sample_lines else None,
    "metrics": read("run/metrics.json"),
    "profile": read("profile.json"),
    "benchmark": benchmarks,
}
(out / "gpu_check.json").write_text(json.dumps(figures, indent=2) + "\n")
print(f"gpu-check: {figures['gpu']}: " + ", ".join(f"{name} {'ok' if part['status'] == 0 else 'FAILED'} ({part['seconds']}s)"
                                                  for name, part in parts.items()))
for name, result in figures["targets"].items():
    print(f"  {name}: {result['value']}" + (f" (target {result['target']}: {'met' if result['met'] else 'NOT met'})" if "target" in result else ""))
print(f"figures in {out / 'gpu_check.json'}")
EOF
exit $status
