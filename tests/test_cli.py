"""Every command's flags, as `--help` shows them."""

import importlib
import re

import pytest

from foundation.cli import build_parser

COMMANDS = ["stage1_vqvae.train", "stage2_prior.train", "stage1_vqvae.dump_codes", "stage1_vqvae.seed_spread",
            "pipelines.sample", "pipelines.complete", "pipelines.evaluate", "pipelines.benchmark", "pipelines.app"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_says_each_flags_default_once(command):
    """A default chosen from the data is said in the flag's own help; argparse's "(default: None)"
    beside it read as a second, contradicting default."""
    module = importlib.import_module(command)
    config = next(value for name, value in vars(module).items() if name.endswith("Config") and value.__module__ == command)
    for action in build_parser(config, "")._actions:
        assert len(re.findall(r"\(default:", action.help or "")) <= 1, action.option_strings
