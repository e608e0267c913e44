"""The command line itself: every shipped config parses, options are grouped by concern in `--help`, an unknown
option is one clear error."""

import subprocess
import sys

import pytest
from conftest import ROOT, run_cli

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", config, "--print_config")
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed and "trainer:" in printed


def test_help_groups_options_by_concern(capsys):
    with pytest.raises(SystemExit):
        run_cli("fit", "--help")
    out = capsys.readouterr().out
    for section, option in [("Quantization of the frozen base", "--model.quantization.method"),
                            ("The LoRA adapters", "--model.lora.r"),
                            ("How forward and backward run", "--model.compute.gradient_checkpointing"),
                            ("Optimizer, schedule, non-finite losses", "--model.optimization.learning_rate"),
                            ("How `predict` generates", "--model.generation.max_new_tokens"),
                            ("Evaluation on the validation split", "--evaluation.compare_base")]:
        start = out.index(section)
        assert option in out[start: start + 3000], (section, option)


def test_unknown_option_exits_2_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lit_mistral", "fit", "--model.no_such_option", "1"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "no_such_option" in result.stderr and "Traceback" not in result.stderr
