"""The command line: ``python -m unispeech_fast info`` / ``demo`` and the ``unispeech-fast`` script.

Commands run in a subprocess whose working directory is a temporary folder, so the repository root
is not on ``sys.path`` and the installed package (``pip install -e .``) is what runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import unispeech_fast
from unispeech_fast import cli
from unispeech_fast.dispatch import OPS

# Variables that change what the commands print; each test sets the ones it wants.
_CONTROLLED_ENV = ("TRITON_INTERPRET", "UNISPEECH_FAST_BACKEND", "UNISPEECH_FAST_VERIFY",
                   "UNISPEECH_FAST_DISABLE_EXTENSION")


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, exe: list[str] | None = None):
    full_env = {k: v for k, v in os.environ.items() if k not in _CONTROLLED_ENV}
    full_env.update(env or {})
    cmd = (exe or [sys.executable, "-m", "unispeech_fast"]) + args
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)


def lines_starting(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


# ---------------------------------------------------------------------------------------------- info
def test_info_reports_versions_devices_extension_and_backends(tmp_path):
    res = run_cli(["info"], tmp_path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert lines_starting(out, "unispeech_fast ")[0].split()[1] == unispeech_fast.__version__
    for name in ("python", "torch", "triton", "numpy", "transformers"):
        assert len(lines_starting(out, name + " ")) == 1, f"no {name} version line in:\n{out}"
    import torch

    assert torch.__version__ in lines_starting(out, "torch ")[0]
    assert "devices:" in out
    assert lines_starting(out, "  cpu ")[0].startswith(f"  cpu   {torch.get_num_threads()} torch threads")
    cuda_line = lines_starting(out, "  cuda ")[0]
    assert ("not available" in cuda_line) != torch.cuda.is_available(), cuda_line
    assert "unset" in lines_starting(out, "TRITON_INTERPRET")[0]
    assert len(lines_starting(out, "extension ")) == 1
    assert "device cpu:" in out and "auto picks" in out
    for op in OPS:
        assert lines_starting(out, f"  {op} "), f"no backend-table row for {op}"
    assert "implemented backends: " in out


def test_info_table_says_eager_runs_every_op_on_cpu(tmp_path):
    # With the extension disabled and no interpreter, only eager can run anything on CPU.
    res = run_cli(["info"], tmp_path, env={"UNISPEECH_FAST_DISABLE_EXTENSION": "1"})
    assert res.returncode == 0, res.stderr
    assert "not loaded: disabled by UNISPEECH_FAST_DISABLE_EXTENSION" in res.stdout
    cpu_table = res.stdout.split("device cpu:")[1].split("device cuda:")[0]
    for op in OPS:
        row = lines_starting(cpu_table, f"  {op} ")[0].split()
        assert row[1:6] == ["no", "no", "no", "yes", "eager"], row  # then "(measured order)" where measured


def test_info_reports_triton_interpret(tmp_path):
    res = run_cli(["info"], tmp_path, env={"TRITON_INTERPRET": "1"})
    assert res.returncode == 0, res.stderr
    assert "'1' (on:" in lines_starting(res.stdout, "TRITON_INTERPRET")[0]


# ---------------------------------------------------------------------------------------------- demo
def test_demo_tiny(tmp_path):
    res = run_cli(["demo", "--model", "tiny", "--seconds", "1"], tmp_path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    hidden = cli.tiny_config().hidden_size
    assert "UniSpeechSatModel" in lines_starting(out, "model ")[0]
    assert int(lines_starting(out, "parameters ")[0].split()[1].replace(",", "")) > 0
    assert "[1, 16000] float32" in lines_starting(out, "input_values ")[0]
    assert f"last_hidden_state [1, 49, {hidden}]" in lines_starting(out, "output ")[0]
    assert lines_starting(out, "frames ")[0].split()[1] == "49"
    assert lines_starting(out, "backend ")[0].split()[1] == "auto"
    assert lines_starting(out, "timing [cpu, ")
    assert lines_starting(out, "  warm-up run ")
    assert lines_starting(out, "  median of 3 runs ")
    assert "device cpu:" in out


def test_demo_batch_threads_and_forced_eager(tmp_path):
    res = run_cli(["demo", "--model", "tiny", "--seconds", "0.5", "--batch", "2", "--threads", "1",
                   "--runs", "1", "--backend", "eager"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "[2, 8000] float32" in res.stdout
    assert lines_starting(res.stdout, "timing [cpu, 1 thread]")
    assert lines_starting(res.stdout, "backend ")[0].split()[1] == "eager"
    assert lines_starting(res.stdout, "  median of 1 runs ")


def test_demo_backend_from_environment(tmp_path):
    res = run_cli(["demo", "--model", "tiny", "--seconds", "0.5", "--runs", "1"], tmp_path,
                  env={"UNISPEECH_FAST_BACKEND": "eager"})
    assert res.returncode == 0, res.stderr
    assert lines_starting(res.stdout, "backend ")[0].split()[1] == "eager"


def test_demo_forced_backend_that_cannot_run_fails_with_reasons(tmp_path):
    res = run_cli(["demo", "--model", "tiny", "--seconds", "0.5", "--backend", "cpp"], tmp_path,
                  env={"UNISPEECH_FAST_DISABLE_EXTENSION": "1"})
    assert res.returncode == 1
    assert "backend 'cpp' cannot run" in res.stderr
    assert "disabled by UNISPEECH_FAST_DISABLE_EXTENSION" in res.stderr


# ---------------------------------------------------------------------------------------------- usage
@pytest.mark.parametrize(
    "args",
    [
        [],
        ["bogus"],
        ["demo", "--seconds", "0"],
        ["demo", "--seconds", "nan"],
        ["demo", "--seconds", "abc"],
        ["demo", "--model", "huge"],
        ["demo", "--batch", "0"],
        ["demo", "--threads", "-1"],
        ["demo", "--backend", "fastest"],
        ["demo", "--model", "tiny", "--seconds", "0.01"],  # shorter than the receptive field
    ],
)
def test_usage_errors_exit_2(args, capsys):
    try:
        code = cli.main(args)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    assert code == 2
    assert capsys.readouterr().err


def test_bad_backend_environment_variable_is_a_usage_error(tmp_path):
    res = run_cli(["demo", "--model", "tiny"], tmp_path, env={"UNISPEECH_FAST_BACKEND": "bogus"})
    assert res.returncode == 2
    assert "UNISPEECH_FAST_BACKEND" in res.stderr


def test_bad_verify_environment_variable_is_a_usage_error(tmp_path):
    res = run_cli(["demo", "--model", "tiny"], tmp_path, env={"UNISPEECH_FAST_VERIFY": "bogus"})
    assert res.returncode == 2
    assert "UNISPEECH_FAST_VERIFY" in res.stderr and "Traceback" not in res.stderr


def test_help(tmp_path):
    res = run_cli(["--help"], tmp_path)
    assert res.returncode == 0
    assert "info" in res.stdout and "demo" in res.stdout
    res = run_cli(["demo", "--help"], tmp_path)
    assert res.returncode == 0
    for option in ("--seconds", "--model", "--batch", "--threads"):
        assert option in res.stdout


def test_console_script(tmp_path):
    script = Path(sys.executable).with_name("unispeech-fast")
    assert script.exists(), f"{script} missing: install the package with `pip install --no-build-isolation -e .`"
    res = run_cli(["--version"], tmp_path, exe=[str(script)])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"unispeech_fast {unispeech_fast.__version__}"
