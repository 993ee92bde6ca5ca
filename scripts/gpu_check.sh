#!/usr/bin/env bash
# `make gpu-check`: one check of the CUDA paths on a machine with an NVIDIA GPU.
#
# It runs the tests that need CUDA, the whole job with its defaults (stage one, stage two,
# `pipelines.sample --n 64`, `pipelines.evaluate`) and `pipelines.benchmark --device cuda`,
# then writes every figure to one JSON: $GPU_CHECK_DIR/gpu_check.json.
#
# It works offline on a machine that has torch but not `datasets`: carry wheels of what is
# missing in a folder and name it in $WHEELS (made elsewhere with
# `pip download datasets pytest scipy 'torchmetrics[image]' -d wheels`), and the four
# Fashion-MNIST IDX files in $VQ_DATA_DIR. It says what it lacks before it starts.
#
#   GPU_CHECK_DIR   where the run, the logs and gpu_check.json go (default: runs/gpu_check)
#   PYTHON          the interpreter (default: python3)
#   STAGE1_FLAGS, STAGE2_FLAGS   extra flags for the two stages (e.g. "--max-steps 300")
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

echo "gpu-check: CUDA tests"
start=$(date +%s)
tests_status=0
"$python" -m pytest -q -m cuda -p no:cacheprovider tests > "$out/tests.log" 2>&1 || tests_status=$?
tests_seconds=$(seconds "$start")
tail -n 1 "$out/tests.log"

echo "gpu-check: stage one"
start=$(date +%s)
# shellcheck disable=SC2086
"${launch[@]}" stage1_vqvae/train.py --run-dir "$run" --overwrite ${STAGE1_FLAGS:-} > "$out/stage1.log" 2>&1
stage1_seconds=$(seconds "$start")
echo "gpu-check: stage two"
start=$(date +%s)
# shellcheck disable=SC2086
"${launch[@]}" stage2_prior/train.py --run-dir "$run" --overwrite ${STAGE2_FLAGS:-} > "$out/stage2.log" 2>&1
stage2_seconds=$(seconds "$start")
echo "gpu-check: sample --n 64, evaluate, benchmark"
"$python" -m pipelines.sample --run-dir "$run" --n 64 --device cuda > "$out/sample.log" 2>&1
"$python" -m pipelines.evaluate --run-dir "$run" --device cuda > "$out/evaluate.log" 2>&1
"$python" -m pipelines.benchmark --device cuda --json "$out/benchmark.json" > "$out/benchmark.log" 2>&1

"$python" - "$out" "$tests_status" "$tests_seconds" "$stage1_seconds" "$stage2_seconds" <<'EOF'
import json, re, sys
from pathlib import Path
import torch
out, tests_status, tests_seconds, stage1_seconds, stage2_seconds = Path(sys.argv[1]), *map(int, sys.argv[2:])
last_line = lambda name: (out / name).read_text(errors="replace").strip().splitlines()[-1]
sample_line = next(line for line in (out / "sample.log").read_text().splitlines() if line.startswith("Wrote"))
figures = {
    "gpu": torch.cuda.get_device_name(0),
    "torch": torch.__version__,
    "cuda_tests": {"passed": tests_status == 0, "summary": last_line("tests.log"), "seconds": tests_seconds},
    "stage1_seconds": stage1_seconds,
    "stage2_seconds": stage2_seconds,
    "sample": {"line": sample_line, "seconds": float(re.search(r"in ([\d.]+) ?s", sample_line).group(1))},
    "metrics": json.loads((out / "run" / "metrics.json").read_text()),
    "benchmark": json.loads((out / "benchmark.json").read_text()),
}
(out / "gpu_check.json").write_text(json.dumps(figures, indent=2) + "\n")
print(f"gpu-check: {figures['gpu']}: CUDA tests {'passed' if tests_status == 0 else 'FAILED'}, "
      f"stage one {stage1_seconds}s, stage two {stage2_seconds}s; figures in {out / 'gpu_check.json'}")
sys.exit(0 if tests_status == 0 else 1)
EOF
