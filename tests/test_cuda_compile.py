"""Compile-check the CUDA sources (csrc/cuda/*.cu) with nvcc for sm_80/sm_90, without a GPU.

Runs scripts/check_cuda.py once for all files (in parallel) and reports one test per file. Where nvcc
is missing the tests skip, except under CI (``$CI`` set), where they fail: CI must compile the kernels.
A negative test checks that the checker does fail on a broken source.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "check_cuda.py"
CU_FILES = sorted((REPO / "csrc" / "cuda").glob("*.cu"))

sys.path.insert(0, str(SCRIPT.parent))
try:
    import check_cuda  # noqa: E402
finally:
    sys.path.pop(0)


def _require_nvcc() -> str:
    nvcc = check_cuda.find_nvcc()
    if nvcc is None:
        message = "nvcc not found (set CUDA_HOME or put nvcc on PATH): the CUDA sources cannot be compile-checked"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail("CI: " + message)
        pytest.skip(message)
    return nvcc


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def check_all() -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    _require_nvcc()
    proc = _run("--jobs", "2")
    status = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^(ok  |FAIL) (\S+) \(", line)
        if m:
            status[m.group(2)] = m.group(1).strip()
    return proc, status


def test_there_are_cuda_sources():
    names = {p.name for p in CU_FILES}
    assert {"attention.cu", "feature_extractor.cu", "gumbel_quantizer.cu", "pos_conv.cu"} <= names


@pytest.mark.parametrize("source", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cuda_source_compiles(check_all, source):
    proc, status = check_all
    name = str(source.relative_to(REPO))
    assert name in status, f"checker did not report {name}:\n{proc.stdout}\n{proc.stderr}"
    assert status[name] == "ok", f"{name} failed to compile:\n{proc.stdout}\n{proc.stderr}"


def test_checker_exit_status_matches(check_all):
    proc, status = check_all
    assert proc.returncode == (0 if all(s == "ok" for s in status.values()) else 1), proc.stdout + proc.stderr
    assert len(status) == len(CU_FILES)


def test_checker_fails_on_broken_source(tmp_path):
    _require_nvcc()
    broken = tmp_path / "broken.cu"
    broken.write_text("__global__ void broken_kernel(float* y) { y[threadIdx.x] = not_declared_anywhere; }\n")
    proc = _run(str(broken))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout and "broken.cu" in proc.stdout
    assert "not_declared_anywhere" in proc.stdout  # nvcc's message is shown


def test_checker_reports_missing_nvcc(monkeypatch, capsys):
    monkeypatch.setattr(check_cuda, "find_nvcc", lambda explicit=None: None)
    assert check_cuda.main([]) == 2
    assert "nvcc not found" in capsys.readouterr().err


def test_stand_in_header_is_only_a_fallback():
    """The stand-in for c10/cuda/impl/cuda_cmake_macros.h goes behind the real include dirs."""
    cmd = check_cuda.nvcc_command("nvcc", REPO / "x.cu", pathlib.Path("/tmp/out"), pathlib.Path("/tmp/stand_in"))
    joined = " ".join(cmd)
    assert "-idirafter,/tmp/stand_in" in joined and "-I /tmp/stand_in" not in joined
    for flag in ("-std=c++20", "arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90",
                 "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__"):
        assert flag in joined
