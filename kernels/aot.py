"""Ahead-of-time compilation of every Triton kernel variant for real GPU targets, without a GPU.

Each kernel module in this package lists, in ``aot_variants()``, every (kernel, signature,
constexprs, num_warps, num_stages) combination that its launcher can choose. :func:`check_all`
compiles each one with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, which
runs the whole pipeline down to ptxas with no driver, and fails a variant that does not compile or
needs more shared memory than its target offers, and reports each variant's registers and register
spills (ptxas ``-v``, which Triton runs and logs on request): a variant that spills more than
:data:`SPILL_BUDGET_BYTES` fails, since spills in a shipped kernel cost far more than the check. CI runs it through ``python -m
unispeech_fast.kernels.aot`` in a process with ``TRITON_INTERPRET`` unset (the interpreter replaces
``@triton.jit`` functions with objects that cannot be compiled).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import sys
import time
from typing import Any, Callable

from ._known_spills import KNOWN_SPILLS as _KNOWN_SPILLS

__all__ = ["AotVariant", "SMEM_LIMIT_BYTES", "SPILL_BUDGET_BYTES", "KNOWN_SPILLS", "KERNEL_MODULES", "compile_variant",
           "check_all", "parse_ptxas_log", "main"]

#: Largest shared memory one block may use (opt-in maximum), by compute capability: A100 (sm_80)
#: 163 KiB, H100 (sm_90) 227 KiB (CUDA C Programming Guide, compute capability tables).
SMEM_LIMIT_BYTES: dict[int, int] = {80: 163 * 1024, 90: 227 * 1024}

#: Largest register spill (ptxas "bytes spill stores") a shipped variant may have. The shipped configs are
#: chosen not to spill; this leaves room for a few bytes a future ptxas might add, no more.
SPILL_BUDGET_BYTES = 64

#: Spills allowed above the budget, each with its reason: (variant name, arch) -> (spill-store bytes, reason)
#: (``_known_spills.py``). Such a variant fails only when it spills more than its entry; every other variant fails
#: above :data:`SPILL_BUDGET_BYTES`. The report is deterministic (always Triton's own ptxas run, see
#: :func:`compile_variant`), so an entry is the measured value, with no headroom.
KNOWN_SPILLS = _KNOWN_SPILLS

#: Modules of this package that define ``aot_variants()``.
KERNEL_MODULES: tuple[str, ...] = ("attention", "feature_extractor", "pos_conv", "gumbel_quantizer", "contrastive_loss")


@dataclasses.dataclass(frozen=True)
class AotVariant:
    """One compilable specialisation of a kernel, exactly as a launcher would launch it.

    ``signature`` maps every argument name to its Triton type (``"*fp16"``, ``"i32"``, ``"fp32"``,
    ...) and constexpr arguments to ``"constexpr"``; ``constexprs`` gives their values.
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3


def parse_ptxas_log(log: str) -> dict[str, int]:
    """``registers``, ``spill_stores`` and ``spill_loads`` (bytes) from a ``ptxas -v`` log of one kernel."""
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spills:
        raise ValueError(f"no register/spill report in the ptxas log: {log[-500:]!r}")
    return {"registers": max(int(r) for r in regs), "spill_stores": max(int(s) for s, _ in spills),
            "spill_loads": max(int(l) for _, l in spills)}


def compile_variant(variant: AotVariant, arch: int) -> dict[str, Any]:
    """Compile ``variant`` for ``sm_<arch>``; returns a result row (``ok`` False with ``error`` on failure)
    with the shared memory, registers and spill bytes."""
    import contextlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row: dict[str, Any] = {"kernel": variant.name, "arch": f"sm_{arch}", "num_warps": variant.num_warps,
                           "num_stages": variant.num_stages}
    start = time.perf_counter()
    log = io.StringIO()
    try:
        src = ASTSource(variant.fn, dict(variant.signature), dict(variant.constexprs))
        # Always Triton's own ptxas run (``always_compile``: a cache hit runs no ptxas): the report is that of
        # the cubin Triton ships, with its ptxas flags (``-lineinfo``, ``--regAllocOptLevel=2``, ...). A
        # separate ptxas run on a cached kernel's PTX without those flags reported other register counts and
        # spills on sm_90 (the run-to-run differences the spill table once needed 25% headroom for).
        with triton.knobs.compilation.scope(), triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            triton.knobs.compilation.always_compile = True
            triton.knobs.nvidia.dump_ptxas_log = True  # Triton prints the log of its ptxas -v run
            compiled = triton.compile(
                src,
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": variant.num_warps, "num_stages": variant.num_stages},
            )
        report = parse_ptxas_log(log.getvalue())
    except Exception as exc:  # any compiler error is a failed variant, reported with its message
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip()[:2000]}")
        return row
    shared = int(compiled.metadata.shared)
    limit = SMEM_LIMIT_BYTES[arch]
    row.update(shared_bytes=shared, **report, seconds=round(time.perf_counter() - start, 2))
    errors = []
    if shared > limit:
        errors.append(f"needs {shared} bytes of shared memory, sm_{arch} allows {limit}")
    allowed = max(SPILL_BUDGET_BYTES, KNOWN_SPILLS.get((variant.name, arch), (0, ""))[0])
    if report["spill_stores"] > allowed:
        errors.append(f"spills {report['spill_stores']} bytes of registers ({report['registers']} registers used), "
                      f"budget {allowed}: pick a config that does not spill")
    elif report["spill_stores"] > SPILL_BUDGET_BYTES:
        row["known_spill"] = allowed
        row["known_spill_reason"] = KNOWN_SPILLS[(variant.name, arch)][1]
    row.update(ok=not errors, **({"error": "; ".join(errors)} if errors else {}))
    return row


def _variants(modules: tuple[str, ...]) -> list[AotVariant]:
    out: list[AotVariant] = []
    for name in modules:
        module = importlib.import_module(f"{__package__}.{name}")
        fn: Callable[[], list[AotVariant]] = getattr(module, "aot_variants")
        out.extend(fn())
    return out


def _selected(module: str, match: str | None) -> list[int]:
    return [i for i, v in enumerate(_variants((module,))) if match is None or match in v.name]


def _compile_task(task: tuple[str, int, int]) -> dict[str, Any]:
    module, index, arch = task
    return compile_variant(_variants((module,))[index], arch)


def check_all(
    archs: tuple[int, ...] = (80, 90), modules: tuple[str, ...] = KERNEL_MODULES, jobs: int | None = None,
    match: str | None = None,
) -> list[dict[str, Any]]:
    """Compile every variant of ``modules`` (whose name contains ``match``, if given) for every arch, ``jobs``
    processes at a time (default: one per CPU); returns one row per (variant, arch), in order."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (the interpreter's functions cannot be compiled)")
    tasks = [(m, i, arch) for m in modules for i in _selected(m, match) for arch in archs]
    jobs = max(1, jobs or os.cpu_count() or 1)
    if jobs == 1:
        return [_compile_task(t) for t in tasks]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_task, tasks, chunksize=4))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 80 or 90 (repeatable)")
    parser.add_argument("--module", action="append", choices=KERNEL_MODULES, help="only these kernel modules")
    parser.add_argument("--match", help="only the variants whose name contains this text")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPU count)")
    args = parser.parse_args(argv)
    rows = check_all(tuple(args.arch or (80, 90)), tuple(args.module or KERNEL_MODULES), args.jobs, args.match)
    for row in rows:
        status = "ok " if row["ok"] else "FAIL"
        detail = (f"shared {row['shared_bytes']:>6} B regs {row['registers']:>3} spill {row['spill_stores']:>5} B"
                  if "shared_bytes" in row else "")
        print(f"{status} {row['arch']} {row['kernel']:<60} warps={row['num_warps']} stages={row['num_stages']} {detail}")
        if not row["ok"]:
            print(f"     {row['error']}")
        elif "known_spill" in row:
            print(f"     known spill (aot.KNOWN_SPILLS allows {row['known_spill']} B): {row['known_spill_reason']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} variants compiled")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
