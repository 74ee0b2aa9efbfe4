"""Every Triton kernel variant a launcher can choose compiles for sm_80 and sm_90, without a GPU.

``python -m unispeech_fast.kernels.aot`` runs Triton's whole pipeline down to ptxas for real GPU
targets and fails variants that do not compile, exceed the target's shared memory or spill registers
beyond ``aot.SPILL_BUDGET_BYTES``; it prints registers and spills for every variant. It needs a
process without ``TRITON_INTERPRET`` (the test session sets it), hence the subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from unispeech_fast.kernels import aot


def _env(cache_dir=None) -> dict[str, str]:
    """This environment without ``TRITON_INTERPRET`` (the checker compiles for real GPUs); with ``cache_dir``, Triton's
    cache there (an empty cache: the first compile is fresh, the second could hit)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = str(cache_dir)
    return env


def _python(code: str, cache_dir=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=_env(cache_dir), capture_output=True, text=True, timeout=600)


def _check_toy_kernel(tmp_path, name: str, body: str, block: int, warps: int, stages: int, arch: int):
    """Run the checker on ``def name(X, Y, BLOCK)`` with ``body`` (fp32 pointers, BLOCK = ``block``) for sm_``arch``
    in a fresh process with an empty cache; it exits 0 when the checker fails the variant, and prints its row."""
    (tmp_path / f"{name}.py").write_text(
        f"import triton, triton.language as tl\n@triton.jit\ndef {name}(X, Y, BLOCK: tl.constexpr):\n{body}")
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
        f"from {name} import {name}\n"
        "from unispeech_fast.kernels.aot import AotVariant, compile_variant\n"
        f"v = AotVariant({name!r}, {name}, {{'X': '*fp32', 'Y': '*fp32', 'BLOCK': 'constexpr'}}, {{'BLOCK': {block}}}, "
        f"{warps}, {stages})\n"
        f"row = compile_variant(v, {arch}); print(row); sys.exit(0 if not row['ok'] else 1)\n"
    )
    return _python(code, tmp_path)


@pytest.mark.parametrize("module", aot.KERNEL_MODULES)
def test_every_variant_compiles_for_sm80_and_sm90(module):
    proc = subprocess.run(
        [sys.executable, "-m", "unispeech_fast.kernels.aot", "--module", module],
        env=_env(), capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, f"AOT compile failed for {module}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert "variants compiled" in proc.stdout
    assert " sm_80 " in proc.stdout and " sm_90 " in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert rows and all(" regs " in line and " spill " in line for line in rows)


def test_checker_fails_a_kernel_that_does_not_fit(tmp_path):
    """The checker can fail: a variant needing more shared memory than sm_80 has is reported."""
    body = ("    r = tl.arange(0, BLOCK)\n"
            "    a = tl.load(X + r[:, None] * BLOCK + r[None, :])\n"
            "    tl.store(Y + r[:, None] * BLOCK + r[None, :], tl.dot(a, a))\n")
    proc = _check_toy_kernel(tmp_path, "too_big", body, block=256, warps=8, stages=3, arch=80)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bytes of shared memory, sm_80 allows 166912" in proc.stdout


def test_ptxas_log_parser():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    1032 bytes stack frame, 1020 bytes spill stores, 1016 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 41472 bytes smem, 400 bytes cmem[0]\n")
    assert aot.parse_ptxas_log(log) == {"registers": 255, "spill_stores": 1020, "spill_loads": 1016}
    with pytest.raises(ValueError, match="no register/spill report"):
        aot.parse_ptxas_log("ptxas fatal: nothing")


def test_checker_fails_a_kernel_that_spills(tmp_path):
    """Issue 16 item 8: the checker reports registers and spills, and fails a variant over the budget (one
    warp holding 16384 fp32 values live across a reduction: 512 per thread; ptxas spilled about 6 KB)."""
    body = ("    r = tl.arange(0, BLOCK)\n"
            "    x = tl.load(X + r)\n"
            "    tl.store(Y + r, x * tl.sum(x * x) + tl.exp(x))\n")
    proc = _check_toy_kernel(tmp_path, "spills", body, block=16384, warps=1, stages=1, arch=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bytes of registers" in proc.stdout and "'ok': False" in proc.stdout and "'registers': " in proc.stdout


def test_known_spills_name_existing_variants():
    """Every allowance in aot.KNOWN_SPILLS names a variant the launchers can pick (stale ones must go), allows
    more than the budget and gives its reason."""
    code = ("from unispeech_fast.kernels import aot\n"
            "names = {v.name for v in aot._variants(aot.KERNEL_MODULES)}\n"
            "stale = [k for k in aot.KNOWN_SPILLS if k[0] not in names or k[1] not in aot.SMEM_LIMIT_BYTES]\n"
            "stale += [k for k, (size, reason) in aot.KNOWN_SPILLS.items() if size <= aot.SPILL_BUDGET_BYTES\n"
            "          or not reason.strip()]  # an entry allows more than the budget, and says why\n"
            "print(stale); raise SystemExit(1 if stale else 0)\n")
    proc = _python(code)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_report_is_the_same_on_a_second_compile(tmp_path):
    """The report is Triton's own ptxas run every time. A second compile of a variant used to hit Triton's cache,
    and the checker then ran ptxas itself without Triton's flags (``--regAllocOptLevel=2``): this sm_90 variant
    reported 215 registers fresh and 233 cached, and spills likewise differed between runs."""
    code = ("from unispeech_fast.kernels import aot\n"
            "v = {v.name: v for v in aot._variants(('gumbel_quantizer',))}['gumbel_bwd_logits_fp32_fp32_v128_ieee']\n"
            "rows = [aot.compile_variant(v, 90) for _ in range(2)]\n"
            "keys = ('ok', 'registers', 'spill_stores', 'spill_loads', 'shared_bytes')\n"
            "print([[r.get(k) for k in keys] for r in rows])\n"
            "raise SystemExit(0 if rows[0]['ok'] and [rows[0][k] for k in keys] == [rows[1][k] for k in keys] else 1)\n")
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
