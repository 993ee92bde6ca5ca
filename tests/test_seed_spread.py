import json

import pytest

from foundation.errors import UserError
from stage1_vqvae import seed_spread
from tests.conftest import TINY_MODEL

FLAGS = [*TINY_MODEL, "--max-steps", "6", "--disc-start", "3", "--disc-channels", "8", "--eval-every", "3"]


def test_the_spread_of_two_seeds_is_summarised_finished_seeds_are_kept_and_stopped_ones_resume(tiny_fashion, tmp_path, capsys):
    root = tmp_path / "spread"
    seed_spread.main(["--seeds", "0,1", "--run-dir", str(root), "--n", "10", "--", *FLAGS])
    result = json.loads((root / "seed_spread.json").read_text())
    assert result["seeds"] == [0, 1] and result["flags"]["disc_start"] == 3
    runs = result["runs"]
    for name in ("mse", "ssim", "codebook_usage", "lowest_codebook_usage", "rfd_ratio"):
        values = [runs[seed][name] for seed in ("0", "1")]
        summary = result["summary"][name]
        assert summary["min"] == min(values) and summary["max"] == max(values)
        assert summary["mean"] == pytest.approx(sum(values) / 2)
    assert runs["0"]["mse"] != runs["1"]["mse"]  # two seeds, two runs
    assert "| mean |" in (root / "seed_spread.md").read_text()
    weights = (root / "seed_0" / "vqvae" / "model.safetensors").read_bytes()

    capsys.readouterr()
    seed_spread.main(["--seeds", "0,1", "--run-dir", str(root), "--n", "10", "--", *FLAGS])
    out = capsys.readouterr().out
    assert out.count("already trained with these flags") == 2
    assert json.loads((root / "seed_spread.json").read_text())["summary"] == result["summary"]

    # a seed stopped after its last checkpoint (no final weights yet) resumes instead of refusing
    (root / "seed_1" / "vqvae" / "final" / "model.safetensors").unlink()
    seed_spread.main(["--seeds", "0,1", "--run-dir", str(root), "--n", "10", "--", *FLAGS])
    assert "seed 1: resuming the unfinished run" in capsys.readouterr().out
    assert json.loads((root / "seed_spread.json").read_text())["runs"]["1"]["mse"] == pytest.approx(runs["1"]["mse"], rel=1e-5)

    # other flags over a finished run: stage one refuses, and the run is kept as it was
    with pytest.raises(UserError, match="stage one with seed 0 stopped"):
        seed_spread.main(["--seeds", "0", "--run-dir", str(root), "--", *FLAGS, "--lr", "1e-3"])
    assert (root / "seed_0" / "vqvae" / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize("argv,message", [
    (["--seeds", "0,0"], "is not a list of distinct whole numbers"),
    (["--seeds", "a"], "is not a list of distinct whole numbers"),
    (["--", "--seed", "3"], "--seed is set by seed_spread for each run"),
    (["--", "--no-such-flag"], "stage one does not take the flags '--no-such-flag'"),
])
def test_bad_arguments_are_one_sentence_before_any_training(tmp_path, argv, message):
    with pytest.raises(UserError, match=message):
        seed_spread.main(["--run-dir", str(tmp_path / "spread"), *argv])
    assert not (tmp_path / "spread").exists()
