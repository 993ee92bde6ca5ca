import copy
import json
import subprocess

import pytest
import torch

from stage1_vqvae import quantizer as quantizer_module
from stage1_vqvae.quantizer import VectorQuantizer
from tests.conftest import REPO, accelerate_command, cpu_env


def test_indices_are_the_brute_force_nearest_codes():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(codebook_size=37, dim=6, dead_code_steps=0)
    z = torch.randn(3, 6, 5, 4)
    output = quantizer.eval()(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 6)
    expected = torch.cdist(flat, quantizer.codebook).argmin(1).view(3, 5, 4)
    assert torch.equal(output.indices, expected)
    assert torch.allclose(output.quantized, quantizer.codebook[expected].permute(0, 3, 1, 2))


def test_distances_stay_fp32_under_bf16_autocast():
    torch.manual_seed(1)
    quantizer = VectorQuantizer(codebook_size=512, dim=64, dead_code_steps=0).eval()
    # Codes close together: bf16 distances (8 bits of mantissa) would pick wrong neighbours.
    quantizer.codebook.data = torch.randn(1, 64) + 1e-3 * torch.randn(512, 64)
    z = quantizer.codebook.data[:64].T.reshape(1, 64, 8, 8).clone() + 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        indices = quantizer(z).indices
    assert torch.equal(indices.flatten(), torch.arange(64))


def test_the_straight_through_gradient_of_the_quantized_map_is_the_identity():
    """d(quantized)/dz = I: the encoder receives the decoder's gradient unchanged (no loss term added)."""
    quantizer = VectorQuantizer(codebook_size=8, dim=4, dead_code_steps=0)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    upstream = torch.randn(2, 4, 3, 3)
    (quantizer(z).quantized * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream, rtol=0, atol=0)


def test_the_rotation_trick_keeps_the_code_and_turns_the_gradient_by_the_angle_to_it():
    """Forward: the code itself. Backward: the gradient reaching z is the decoder's gradient
    rotated by the rotation that takes z's direction onto its code's, scaled by |code| / |z|."""
    torch.manual_seed(2)
    quantizer = VectorQuantizer(codebook_size=8, dim=4, dead_code_steps=0, rotation_trick=True).eval()
    z = torch.randn(1, 4, 1, 1, requires_grad=True)
    upstream = torch.randn(1, 4, 1, 1)
    output = quantizer(z)
    code = quantizer.codebook[output.indices.flatten()][0]
    torch.testing.assert_close(output.quantized.flatten(), code, rtol=0, atol=0)
    (output.quantized * upstream).sum().backward()

    # The rotation written out as a matrix: Householder across (z_unit + code_unit), then z_unit -> code_unit.
    z_unit, code_unit = z.detach().flatten() / z.detach().norm(), code / code.norm()
    mirror = (z_unit + code_unit) / (z_unit + code_unit).norm()
    rotation = torch.eye(4) - 2 * torch.outer(mirror, mirror) + 2 * torch.outer(code_unit, z_unit)
    torch.testing.assert_close(rotation @ z_unit, code_unit)  # it does carry z onto its code
    expected = (code.norm() / z.detach().norm()) * rotation.T @ upstream.flatten()
    torch.testing.assert_close(z.grad.flatten(), expected)
    assert not torch.allclose(z.grad.flatten(), upstream.flatten(), atol=1e-3)  # not the straight-through copy


def test_loss_based_codebook_gets_gradients():
    quantizer = VectorQuantizer(codebook_size=8, dim=4, ema=False, dead_code_steps=0)
    output = quantizer(torch.randn(2, 4, 3, 3))
    output.loss.backward()
    assert quantizer.codebook.grad.abs().sum() > 0


def test_one_ema_step_equals_the_formula_written_out():
    torch.manual_seed(2)
    K, D, decay, eps = 5, 3, 0.9, 1e-5
    quantizer = VectorQuantizer(codebook_size=K, dim=D, decay=decay, eps=eps, dead_code_steps=0).train()
    old_size, old_avg = quantizer.cluster_size.clone(), quantizer.embed_avg.clone()
    z = torch.randn(1, D, 4, 4)
    flat = z.permute(0, 2, 3, 1).reshape(-1, D)
    assigned = torch.cdist(flat, quantizer.codebook.detach()).argmin(1)
    onehot = torch.nn.functional.one_hot(assigned, K).float()

    quantizer(z)

    size = decay * old_size + (1 - decay) * onehot.sum(0)
    avg = decay * old_avg + (1 - decay) * onehot.T @ flat
    n = size.sum()
    smoothed = (size + eps) / (n + K * eps) * n
    assert torch.allclose(quantizer.cluster_size, size)
    assert torch.allclose(quantizer.embed_avg, avg, atol=1e-6)
    assert torch.allclose(quantizer.codebook, avg / smoothed[:, None], atol=1e-6)


@pytest.mark.parametrize("without_a_stall", [False, True])
def test_a_dead_code_is_restarted_from_encoder_outputs(without_a_stall, monkeypatch):
    """Both ways: the CPU's, and the CUDA one that never reads back to the host (run here on the CPU)."""
    if without_a_stall:
        monkeypatch.setattr(quantizer_module, "RESTART_WITHOUT_A_STALL", {"cpu"})
    quantizer = VectorQuantizer(codebook_size=4, dim=2, dead_code_steps=3).train()
    quantizer.steps_unused.zero_()
    quantizer.codebook.data = torch.tensor([[0.0, 0.0], [100.0, 100.0], [-100.0, 100.0], [100.0, -100.0]])
    quantizer.embed_avg.copy_(quantizer.codebook.data)
    z = 0.01 * torch.randn(1, 2, 4, 4)  # every vector is nearest to code 0
    for _ in range(3):
        quantizer(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    for code in (1, 2, 3):
        distances = (flat - quantizer.codebook[code]).norm(dim=1)
        assert distances.min() < 1e-6, f"code {code} was not re-seeded from an encoder output"
    assert quantizer.steps_unused[1:].eq(0).all()
    assert torch.equal(quantizer.embed_avg[1:], quantizer.codebook.data[1:]) and quantizer.cluster_size[1:].eq(1).all()
    assert quantizer.cluster_size[0] > 1.1  # the live code kept its EMA count: it was not restarted


@pytest.mark.parametrize("without_a_stall", [False, True])
@pytest.mark.parametrize("share", [0.0, 0.25])
def test_a_code_that_keeps_only_a_stray_vector_is_restarted_when_a_share_is_given(share, without_a_stall, monkeypatch):
    """Code 1 keeps one position of 16 each step (a quarter of an even share of 4): used, so
    kept under share 0, but restarted after `dead_code_steps` steps under share 0.25."""
    if without_a_stall:
        monkeypatch.setattr(quantizer_module, "RESTART_WITHOUT_A_STALL", {"cpu"})
    quantizer = VectorQuantizer(codebook_size=4, dim=2, dead_code_steps=3, dead_code_share=share).train()
    quantizer.steps_unused.zero_()
    quantizer.codebook.data = torch.tensor([[0.0, 0.0], [100.0, 100.0], [-100.0, 100.0], [100.0, -100.0]])
    quantizer.embed_avg.copy_(quantizer.codebook.data)
    quantizer.cluster_size.fill_(5.0)
    z = 0.01 * torch.randn(1, 2, 4, 4)
    z[0, :, 0, 0] = torch.tensor([100.0, 100.0])  # the stray vector, nearest to code 1
    for _ in range(2):
        quantizer(z)
    assert quantizer.cluster_size[1] > 4.8, "restarted before `dead_code_steps` steps"
    quantizer(z)
    restarted = quantizer.cluster_size[1] == 1.0
    assert restarted == (share > 0)
    assert quantizer.cluster_size[0] > 4.8  # the code of every other vector is never restarted


def test_two_ddp_processes_end_with_identical_codebooks(tmp_path):
    result = tmp_path / "result.json"
    command = accelerate_command(2) + [str(REPO / "tests" / "ddp_quantizer_worker.py"), str(result)]
    completed = subprocess.run(command, env=cpu_env(), capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(result.read_text())
    assert report["world_size"] == 2
    assert report["inputs_differ"], "the two ranks must see different data for the test to mean anything"
    assert report["restarts"] > 0, "the run must exercise the broadcast of restarted codes"
    assert report["max_codebook_difference"] == 0.0
    assert report["max_buffer_difference"] == 0.0
    assert report["lone_eval_returned"]


def test_under_accumulation_the_codebook_learns_once_per_optimizer_step_as_with_the_whole_batch():
    torch.manual_seed(0)
    whole = VectorQuantizer(codebook_size=8, dim=4, dead_code_steps=0).train()
    split = copy.deepcopy(whole)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):  # three optimizer steps of two micro-batches each
        z = torch.randn(4, 4, 2, 2, generator=generator)
        whole(z)
        split.defer_updates = True
        split(z[:2])
        split.defer_updates = False
        split(z[2:])
    for name in ("codebook", "cluster_size", "embed_avg"):
        torch.testing.assert_close(getattr(split, name), getattr(whole, name), msg=name)
    assert torch.equal(split.steps_unused, whole.steps_unused) and whole.steps_unused.max() <= 3
    assert split.pending_counts.sum() == 0 and "pending_sums" not in split.state_dict()
