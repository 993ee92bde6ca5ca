"""The CUDA paths themselves, on a CUDA GPU only: skipped elsewhere, run by `make gpu-check`.

Without a GPU, `test_cuda_paths_as_far_as_a_cpu_allows` and the benchmark's timer test
stand in for `torch.cuda` as far as a CPU allows."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipelines import VQPipeline, benchmark, evaluate, sample
from stage1_vqvae import train as stage_one
from stage1_vqvae.quantizer import VectorQuantizer
from stage2_prior import static_decoding
from stage2_prior import train as stage_two
from tests.conftest import TINY_MODEL, reset_accelerate_state
from tests.test_maskgit import H, K, W, make_maskgit
from tests.test_priors import make_prior
from tests.test_stage2_training import TINY_PRIOR

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_autocast_on_the_gpu_keeps_the_nearest_codes():
    torch.manual_seed(1)
    quantizer = VectorQuantizer(codebook_size=512, dim=64, dead_code_steps=0).cuda().eval()
    quantizer.codebook.data = torch.randn(1, 64, device="cuda") + 1e-2 * torch.randn(512, 64, device="cuda")
    z = quantizer.codebook.data[:64].T.reshape(1, 64, 8, 8).clone() + 1e-5
    with torch.autocast("cuda", dtype=torch.bfloat16):
        indices = quantizer(z).indices
    assert torch.equal(indices.flatten().cpu(), torch.arange(64))


@pytest.mark.parametrize("kind", ["pixelcnn", "transformer", "transformer+inputs"])
def test_cached_sampling_on_the_gpu_draws_the_codes_of_the_whole_network(kind):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model = make_prior(kind, 2).cuda()
    labels = torch.tensor([0, 1, 2], device="cuda")
    fast = model.generate(3, labels, generator=torch.Generator("cuda").manual_seed(5), guidance=2.0)
    slow = model.generate(3, labels, generator=torch.Generator("cuda").manual_seed(5), guidance=2.0, decoding="naive")
    assert fast.device.type == "cuda" and torch.equal(fast, slow)


@pytest.mark.parametrize("n", [1, 7])
@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_the_captured_graph_draws_the_codes_of_the_uncaptured_steps(n, guidance):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model = make_prior("transformer+inputs", 2).cuda()
    labels = torch.arange(n, device="cuda") % 3
    draw = lambda decoding, seed=5, **options: model.generate(
        n, labels, generator=torch.Generator("cuda").manual_seed(seed), guidance=guidance, decoding=decoding, **options)
    graph = draw("graph")
    decoder = static_decoding.kept_decoders(model)[-1]
    assert decoder.graph is not None and not decoder.capture_failed
    assert torch.equal(graph, draw("static")) and torch.equal(graph, draw("cache"))
    again = draw("graph", seed=6, temperature=0.8, top_k=6)  # top-k is part of the key: a capture of its own
    assert torch.equal(again, draw("static", seed=6, temperature=0.8, top_k=6))
    assert torch.equal(draw("graph", seed=7, temperature=0.5), draw("cache", seed=7, temperature=0.5))  # temperature: read by the graph
    assert static_decoding.kept_decoders(model)[-1].graph is not None
    with torch.autocast("cuda", dtype=torch.bfloat16):  # as pipelines.sample decodes: the graph and its eager steps agree
        assert torch.equal(draw("graph"), draw("static"))


def test_the_graph_is_captured_once_and_kept_for_the_next_call():
    model = make_prior("transformer", 2).cuda()
    model.generate(4, decoding="graph")
    first = static_decoding.kept_decoders(model)[-1].graph
    model.generate(4, 1, decoding="graph", guidance=1.0)
    assert static_decoding.kept_decoders(model)[-1].graph is first
    model.generate(5, decoding="graph")  # another batch size: another capture, kept beside the first
    second = static_decoding.kept_decoders(model)[-1].graph
    assert second is not None and second is not first
    model.generate(4, decoding="graph")  # as drawing 64 then the rest of 80 images does, click after click
    model.generate(5, decoding="graph")
    assert [decoder.graph for decoder in static_decoding.kept_decoders(model)] == [first, second]


def test_maskgit_on_the_gpu_is_seeded_and_keeps_the_known_codes():
    model = make_maskgit().cuda()
    labels = torch.tensor([0, 1, 2], device="cuda")
    known = torch.randint(0, K, (3, H, W), device="cuda")
    keep = torch.rand(3, H, W, device="cuda") < 0.5
    draws = [model.generate(3, labels, generator=torch.Generator("cuda").manual_seed(5), guidance=2.0, known=known, keep=keep)
             for _ in range(2)]
    assert draws[0].device.type == "cuda" and torch.equal(draws[0], draws[1])
    assert torch.equal(draws[0][keep], known[keep])


def test_both_stages_train_sample_and_evaluate_on_the_gpu(tiny_fashion, tmp_path, capsys):
    stage_one.main(["--run-dir", str(tmp_path), *TINY_MODEL, "--max-steps", "10", "--disc-start", "5", "--disc-channels", "8"])
    reset_accelerate_state()
    stage_two.main(["--run-dir", str(tmp_path), *TINY_PRIOR, "--max-steps", "6"])
    reset_accelerate_state()
    sample.main(["--run-dir", str(tmp_path), "--n", "20", "--device", "cuda"])
    assert np.load(tmp_path / "samples" / "codes.npy").shape == (20, 8, 8)
    pipe = VQPipeline.from_run(tmp_path, device="cuda")
    assert pipe.device.type == "cuda" and np.array_equal(pipe(n=20).codes.numpy(), np.load(tmp_path / "samples" / "codes.npy"))
    metrics = evaluate.evaluate_run(evaluate.EvaluateConfig(run_dir=str(tmp_path), n=8, batch_size=8, device="cuda", inception="off"))
    assert metrics["device"].startswith("cuda") and metrics["samples"]["fd"] >= 0


def train_eager_then_graphed(main, tmp_path, flags, capsys) -> str:
    """A stage's `main` into tmp_path/eager with --no-cuda-graph, then into tmp_path/graph; what both printed."""
    main(["--run-dir", str(tmp_path / "eager"), *flags, "--no-cuda-graph"])
    reset_accelerate_state()
    main(["--run-dir", str(tmp_path / "graph"), *flags])
    return capsys.readouterr().out


def relative_difference(eager_dir, graph_dir) -> float:
    """|graph - eager| / |eager| over all the weights each run kept at its last step."""
    eager, graph = (load_file(directory / "final" / "model.safetensors") for directory in (eager_dir, graph_dir))
    difference = sum((graph[name].float() - eager[name].float()).norm() ** 2 for name in eager) ** 0.5
    return (difference / sum(eager[name].float().norm() ** 2 for name in eager) ** 0.5).item()


def test_stage_one_replayed_as_cuda_graphs_trains_as_the_eager_loop(tiny_fashion, tmp_path, capsys):
    """Nothing random in these steps (no discriminator, no restarts), so the two runs differ only
    by the GPU's order of floating-point sums."""
    flags = [*TINY_MODEL, "--disc-start", "-1", "--dead-code-steps", "0", "--max-steps", "12", "--eval-every", "100",
             "--no-dump", "--mixed-precision", "no"]
    out = train_eager_then_graphed(stage_one.main, tmp_path, flags, capsys)
    assert "9 of 12 steps replayed as CUDA graphs (1 captured" in out and out.count("CUDA graph") == 1
    assert relative_difference(tmp_path / "eager" / "vqvae", tmp_path / "graph" / "vqvae") < 1e-3


def test_stage_one_with_the_discriminator_is_captured_again_when_its_phase_changes(tiny_fashion, tmp_path, capsys):
    stage_one.main(["--run-dir", str(tmp_path), *TINY_MODEL, "--disc-start", "6", "--disc-head-start", "0", "--disc-channels", "8",
                    "--max-steps", "12", "--eval-every", "100", "--no-dump", "--log-every", "1"])
    assert "6 of 12 steps replayed as CUDA graphs (2 captured" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "vqvae" / "log.jsonl").read_text().splitlines()]
    adversarial = [entry for entry in log if "train/disc_loss" in entry]
    assert len(adversarial) == 6 and all(np.isfinite(entry["train/disc_loss"]) for entry in adversarial)
    assert len({entry["train/disc_loss"] for entry in adversarial}) == 6  # every replay computed its own step


def test_stage_one_with_r1_every_fourth_step_replays_both_keys(tiny_fashion, tmp_path, capsys):
    """R1's steps and the others take turns faster than a key warms up: each keeps its own graph."""
    stage_one.main(["--run-dir", str(tmp_path), *TINY_MODEL, "--disc-start", "0", "--disc-head-start", "0", "--disc-channels", "8",
                    "--r1-weight", "1", "--r1-every", "4", "--max-steps", "24", "--eval-every", "100", "--no-dump", "--log-every", "1"])
    replayed, steps, captured = map(int, re.search(r"(\d+) of (\d+) steps replayed as CUDA graphs \((\d+) captured",
                                                   capsys.readouterr().out).groups())
    assert steps == 24 and captured >= 2 and replayed >= 24 - 3 * captured
    log = [json.loads(line) for line in (tmp_path / "vqvae" / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(entry["train/r1"]) for entry in log if "train/r1" in entry)


def test_stage_two_replayed_as_cuda_graphs_trains_as_the_eager_loop(tiny_fashion, tmp_path, capsys):
    stage_one.main(["--run-dir", str(tmp_path / "graph"), *TINY_MODEL, "--max-steps", "4", "--disc-start", "-1"])
    reset_accelerate_state()
    shutil.copytree(tmp_path / "graph", tmp_path / "eager")
    capsys.readouterr()  # stage one's summary says how its own steps ran
    flags = [*TINY_PRIOR, "--max-steps", "12", "--dropout", "0", "--label-dropout", "0", "--mixed-precision", "no"]
    out = train_eager_then_graphed(stage_two.main, tmp_path, flags, capsys)
    assert "9 of 12 steps replayed as CUDA graphs (1 captured" in out and out.count("CUDA graph") == 1
    assert relative_difference(tmp_path / "eager" / "prior", tmp_path / "graph" / "prior") < 1e-3


def test_the_benchmark_times_the_gpu(tmp_path):
    out = tmp_path / "bench.json"
    benchmark.main(["--configs", "tiny", "--repeats", "1", "--device", "cuda", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(row["memory_kind"] == "cuda max allocated" and row["seconds"] > 0 for row in rows)
