import json
import math
import subprocess
import sys

import pytest
import torch

from foundation.errors import UserError
from pipelines import benchmark
from tests.conftest import REPO, cpu_env


def test_the_benchmark_runs_end_to_end_and_every_row_has_a_number(tmp_path, capsys):
    out = tmp_path / "bench.json"
    benchmark.main(["--configs", "tiny", "--repeats", "1", "--device", "cpu", "--json", str(out)])
    results = json.loads(out.read_text())
    names = [r["name"] for r in results["rows"]]
    assert "train fp32" in names and "encode (dump, fp32)" in names
    assert {"loader, in memory", "loader, PNG files decoded as read, 0 workers", "loader, PNG files decoded as read, 2 workers",
            "loader, PNG in Arrow decoded as read, 1 worker", "loader, PNG files streamed, 2 workers"} <= set(names)
    assert any(n.startswith("train transformer") for n in names) and any(n.startswith("train pixelcnn") for n in names)
    assert {"2 images, transformer, static", "2 images, transformer, cache", "2 images, transformer, naive",
            "2 images, pixelcnn, cache", "2 images, pixelcnn, naive"} <= set(names)
    assert not any("graph" in n for n in names)  # the CUDA graph is timed on CUDA only
    assert any(n.startswith("train maskgit") for n in names) and "2 images, maskgit, 4 passes" in names
    for r in results["rows"]:
        for key in ("value", "low", "high", "seconds", "peak_memory_mb"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (r["name"], key)
        assert r["low"] <= r["value"] <= r["high"]
    assert set(results["speedup"]["tiny"]) == {
        "transformer: static over cache", "transformer: cache over naive", "pixelcnn: cache over naive",
        "maskgit over the transformer's cache, 2 images", "maskgit over the transformer's cache, 1 image",
    }
    assert "1 image, transformer, cache" in names and "1 image, maskgit, 4 passes" in names
    table = capsys.readouterr().out
    assert "tiny    sampling speed-up, maskgit over the transformer's cache, 1 image:" in table


def test_parts_and_priors_choose_what_is_timed(tmp_path):
    out = tmp_path / "bench.json"
    benchmark.main(["--configs", "tiny", "--repeats", "1", "--device", "cpu", "--parts", "sampling", "--priors", "transformer",
                    "--json", str(out)])
    names = [r["name"] for r in json.loads(out.read_text())["rows"]]
    assert names == ["2 images, transformer, static", "2 images, transformer, cache", "2 images, transformer, naive",
                     "1 image, transformer, cache"]
    with pytest.raises(UserError, match="--parts sampling,speed names no known part; choose from data, stage1, stage2, sampling"):
        benchmark.main(["--configs", "tiny", "--device", "cpu", "--parts", "sampling,speed"])


def test_an_unknown_configuration_is_a_clear_error():
    with pytest.raises(UserError, match="--configs huge names no known configuration"):
        benchmark.main(["--configs", "huge", "--device", "cpu"])


def test_quick_times_the_rows_a_user_checks_first(tmp_path):
    out = tmp_path / "bench.json"
    benchmark.main(["--quick", "--configs", "tiny", "--repeats", "1", "--device", "cpu", "--json", str(out)])
    names = [r["name"] for r in json.loads(out.read_text())["rows"]]
    best = "train bf16" if "train bf16" in names else "train fp32"
    assert names == [best, f"{best} with the discriminator", f"train transformer {best[6:]}", f"train maskgit {best[6:]}",
                     "2 images, transformer, cache", "2 images, maskgit, 4 passes",
                     "1 image, transformer, cache", "1 image, maskgit, 4 passes"]


def test_with_no_flags_a_cpu_times_large_in_cpu_sized_parts(tmp_path, capsys):
    out = tmp_path / "bench.json"
    benchmark.main(["--configs", "large", "--parts", "stage2", "--priors", "transformer", "--repeats", "1", "--device", "cpu",
                    "--json", str(out)])
    results = json.loads(out.read_text())
    assert [r["config"] for r in results["rows"]] == ["large"]
    assert results["sizes"] == {"large": benchmark.CPU_SIZED_LARGE}
    assert "large   sizes: train batch 4" in capsys.readouterr().out


def test_each_cpu_figure_reports_its_own_peak_memory():
    """A large allocation in one figure must not show up as the next figure's peak. In a fresh
    process: memory that earlier tests freed but the process kept would hide the allocation."""
    script = """
import json, torch
from pipelines import benchmark
timer = benchmark.Timer(torch.device("cpu"), repeats=1, warmup=0)
big = timer(lambda: torch.ones(100 * 2**20 // 4).sum())  # 100 MiB
small = timer(lambda: torch.ones(16).sum())
print(json.dumps([big, small]))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    big, small = json.loads(done.stdout.strip().splitlines()[-1])
    if small["memory_kind"] != "peak RSS of this figure":
        pytest.skip("this system cannot reset a process's peak RSS")
    assert big["peak_memory_mb"] - small["peak_memory_mb"] > 50


def test_gpu_timing_synchronises_and_reads_cuda_memory(monkeypatch):
    """The CUDA branch of the timer, run as far as a CPU allows: torch.cuda is stood in for."""
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**20)
    timing = benchmark.Timer(torch.device("cuda"), repeats=2, warmup=1)(lambda: calls.append("run"))
    assert calls == ["reset", "run", "sync", "run", "sync", "run", "sync"]
    assert timing["peak_memory_mb"] == 3.0 and timing["memory_kind"] == "cuda max allocated"


def test_the_gpu_check_says_in_one_sentence_that_there_is_no_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: `make gpu-check` runs for real")
    completed = subprocess.run(["bash", "scripts/gpu_check.sh"], env={**cpu_env(), "PYTHON": sys.executable},
                               capture_output=True, text=True, timeout=120, cwd=REPO)
    assert completed.returncode == 2
    assert completed.stderr.strip() == ("gpu-check: no CUDA GPU is visible to " + sys.executable + " (torch.cuda.is_available() "
                                        "is False); run this on a machine with an NVIDIA GPU")
