"""Finite scalar quantization (`--quantizer fsq`): its codes, its gradient, and a run through
both stages and the pipeline on it."""

import json
import shutil

import pytest
import torch

from foundation.errors import UserError
from pipelines import VQPipeline
from stage1_vqvae import train as stage_one
from stage1_vqvae.fsq import FiniteScalarQuantizer, levels_for
from stage1_vqvae.model import VQVAE, load_vqvae
from stage2_prior import train as stage_two
from tests.conftest import TINY_MODEL, reset_accelerate_state
from tests.test_stage2_training import TINY_PRIOR
from tests.test_training import read_log


def test_every_code_is_a_tuple_of_levels_and_back():
    quantizer = FiniteScalarQuantizer([8, 5, 5, 5], dim=16)
    codes = quantizer.codebook
    assert quantizer.codebook_size == 1000 and codes.shape == (1000, 4)
    assert len(torch.unique(codes, dim=0)) == 1000 and codes.min() == -1 and codes.max() == 1
    every = torch.arange(1000)
    assert torch.equal(quantizer.to_indices(quantizer.to_codes(every)), every)
    assert levels_for(512) == [8, 8, 8] and levels_for(1000) is None


def test_rounding_passes_the_gradient_through_and_nearest_and_lookup_agree_with_the_forward():
    torch.manual_seed(0)
    quantizer = FiniteScalarQuantizer([8, 8, 8], dim=16)
    z = torch.randn(2, 16, 4, 4, requires_grad=True)
    out = quantizer(z)
    out.quantized.pow(2).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0 and out.loss == 0
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 16)
    assert torch.equal(quantizer.nearest(flat).reshape(2, 4, 4), out.indices)
    torch.testing.assert_close(quantizer.lookup(out.indices), out.quantized.detach())


def test_wide_inputs_reach_every_level_of_every_channel():
    """No code is out of reach: the bounds put each channel's extreme levels within rounding."""
    quantizer = FiniteScalarQuantizer([8, 5], dim=2)
    with torch.no_grad():
        quantizer.project_in.weight.copy_(torch.eye(2))
        quantizer.project_in.bias.zero_()
    grid = torch.stack(torch.meshgrid(torch.linspace(-6, 6, 200), torch.linspace(-6, 6, 200), indexing="ij"), -1).reshape(-1, 2)
    assert len(torch.unique(quantizer.nearest(grid))) == 40


def test_a_run_on_fsq_trains_dumps_and_draws(tiny_fashion, tmp_path, capsys):
    run = tmp_path / "run"
    stage_one.main(["--run-dir", str(run), *TINY_MODEL, "--quantizer", "fsq", "--fsq-levels", "4,4", "--max-steps", "6",
                    "--disc-start", "-1"])
    reset_accelerate_state()
    vqvae = VQVAE.from_pretrained(str(run / "vqvae"))
    assert isinstance(vqvae.quantizer, FiniteScalarQuantizer) and vqvae.codebook_size == 16
    stage_two.main(["--run-dir", str(run), *TINY_PRIOR, "--max-steps", "4"])
    reset_accelerate_state()
    pipe = VQPipeline.from_run(run, device="cpu")
    assert pipe.prior.code_vectors.shape == (16, 2)  # the level tuples, as the prior's code vectors
    samples = pipe(n=4, seed=1, output_type="pt")
    assert samples.images.shape == (4, 1, 32, 32) and samples.codes.max() < 16


@pytest.mark.parametrize("flags, message", [
    (["--fsq-levels", "8,5,5,5"], "--fsq-levels 8,5,5,5 sets the levels of --quantizer fsq, but this run's quantizer is vq"),
    (["--quantizer", "fsq", "--codebook-size", "1000"], "--quantizer fsq has no levels of its own for --codebook-size 1000"),
    (["--quantizer", "fsq", "--fsq-levels", "8,x"], "--fsq-levels 8,x is not a comma-separated list"),
    (["--quantizer", "fsq", "--fsq-levels", "4,4", "--vq-gradient", "rotation"], "--vq-gradient rotation changes how the vector quantizer"),
    (["--quantizer", "fsq", "--fsq-levels", "4,4", "--dead-code-share", "0.25"], r"--dead-code-share tunes the vector quantizer's codebook"),
    (["--quantizer", "fsq", "--fsq-levels", "4,4", "--beta", "0.5", "--codebook", "loss"], r"--codebook, --beta tune the vector quantizer's codebook"),
])
def test_bad_fsq_flags_are_one_sentence_before_anything_is_written(tiny_fashion, tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        stage_one.main(["--run-dir", str(tmp_path / "run"), *TINY_MODEL, *flags])
    assert not (tmp_path / "run").exists()


def test_a_vq_run_saved_before_these_flags_loads_as_vq_and_resumes(tiny_fashion, tmp_path):
    """Runs saved before --quantizer, --fsq-levels and --vq-gradient existed name none of them in
    their configs: they load as the vector quantizer passing gradients straight through, and
    --resume goes on without calling them changed, and refuses a change of quantizer."""
    flags = ["--run-dir", str(tmp_path), *TINY_MODEL, "--max-steps", "4", "--checkpoint-every", "2", "--eval-every", "100",
             "--no-dump", "--log-every", "1"]
    stage_one.main(flags)
    shutil.rmtree(tmp_path / "vqvae" / "checkpoints" / "step_0000004")  # as if killed after step 2
    configs = list((tmp_path / "vqvae").rglob("*config.json"))
    for path in configs:
        saved = json.loads(path.read_text())
        path.write_text(json.dumps({key: value for key, value in saved.items()
                                    if key not in ("quantizer", "fsq_levels", "vq_gradient")}))
    assert not any("quantizer" in path.read_text() for path in configs)
    model = load_vqvae(tmp_path)
    assert not isinstance(model.quantizer, FiniteScalarQuantizer) and model.quantizer.rotation_trick is False
    assert model.encode(torch.rand(2, 1, 32, 32)).shape == (2, 8, 8)
    with pytest.raises(UserError, match=r"other flags than it was trained with: --quantizer fsq \(was vq\)"):
        stage_one.main([*flags, "--resume", "--quantizer", "fsq", "--fsq-levels", "4,4"])
    stage_one.main([*flags, "--resume"])
    assert max(row["step"] for row in read_log(tmp_path)) == 4
