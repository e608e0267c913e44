"""The command line itself: every shipped config parses, options are grouped by concern in `--help`, an unknown
option is one clear error."""

import re
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


def help_options(text: str) -> list[str]:
    """The options of a `--help` text's usage block, each with its choices
    (`--model.lora.bias {none,all,lora_only}`)."""
    usage = text.split("\n\n", 1)[0]
    return sorted({" ".join(filter(None, m)) for m in re.findall(r"\[(--[\w.]+)(?: (\{[^}]*\}))?", usage)})


@pytest.mark.parametrize("subcommand", ["fit", "validate", "predict", "export"])
def test_help_lists_the_same_options_as_the_snapshot(subcommand, capsys):
    """A renamed, removed or added option (or choice) shows here; if meant, update tests/fixtures/<sub>_help_options.txt
    (and `config.RENAMED` for a rename, so old configs still run)."""
    with pytest.raises(SystemExit):
        run_cli(subcommand, "--help")
    snapshot = ROOT / "tests" / "fixtures" / f"{subcommand}_help_options.txt"
    assert help_options(capsys.readouterr().out) == snapshot.read_text().splitlines()


def test_unknown_option_exits_2_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lit_mistral", "fit", "--model.no_such_option", "1"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "no_such_option" in result.stderr and "Traceback" not in result.stderr


def test_argument_errors_come_first_and_alone_with_every_bad_key(tmp_path, capsys):
    """Unknown keys in a --config and on the command line: all of them, each with its file:line and closest valid
    name, a runnable `--help` command, and no usage dump (which used to come first, naming only one key)."""
    from conftest import cli_fails

    config = tmp_path / "run.yaml"
    config.write_text("model:\n  lora:\n    rr: 4\ntrainer:\n  max_step: 3\n")
    err = cli_fails(capsys, "fit", "--config", config, "--data.max_lenght", "5")
    assert err.startswith("lit_mistral: error: 3 problems with the options:\n"), err
    assert f"{config}:3: 'model.lora.rr' is not an option; did you mean 'model.lora.r'?" in err
    assert f"{config}:5: 'trainer.max_step' is not an option; did you mean 'trainer.max_steps'?" in err
    assert "command line: --data.max_lenght is not an option; did you mean --data.max_length?" in err
    assert "`python -m lit_mistral fit --help`" in err and "usage:" not in err and "__main__" not in err
    assert len(err.splitlines()) == 5

    config.write_text("model:\n  quantization:\n    method: nf5\n")
    err = cli_fails(capsys, "fit", "--config", config)
    assert f"{config}:3: Parser key \"model.quantization.method\": 'nf5' is not one of: 'nf4', 'fp4', null" in err
    assert "usage:" not in err
