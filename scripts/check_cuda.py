#!/usr/bin/env python
"""Compile-check the CUDA sources of ``unispeech_fast._C`` without a GPU and without a CUDA torch.

For every ``csrc/cuda/*.cu`` (or the files given on the command line) this runs ``nvcc -fatbin`` for
sm_80 and sm_90 against torch's include directories, with the flags torch's own CUDA builds use
(C++20, the ``__CUDA_NO_HALF_*`` defines, ``UNISPEECH_FAST_WITH_CUDA``). That checks host and device
code (templates instantiated, ptxas run, static_asserts on shared memory) but links nothing and runs
nothing. ptxas warnings such as register spills are printed but do not fail the check.

A CPU wheel of torch lacks the CMake-generated ``c10/cuda/impl/cuda_cmake_macros.h``; a stand-in is
written to a temporary directory and passed to the host preprocessor (which nvcc uses for both the
host and the device pass) with ``-idirafter``, so a real header (CUDA torch) wins. The stand-in never
enters the real build (setup.py).

Usage: ``python scripts/check_cuda.py [--jobs 2] [--nvcc PATH] [files ...]``. Prints one status line
per file with its time, and nvcc's message for each failure; exits 1 on any failure, 2 when nvcc is
missing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
CUDA_DIR = REPO / "csrc" / "cuda"

ARCHS = ("80", "90")
TORCH_FLAGS = (
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
)
STAND_IN_HEADER = """\
// Stand-in for the CMake-generated header that CPU wheels of torch lack. Compile checks only.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
#define TORCH_CUDA_VERSION_MAJOR 13
#define TORCH_CUDA_VERSION_MINOR 0
#define TORCH_CUDA_VERSION_PATCH 0
#define TORCH_CUDA_VERSION_BUILD 0
"""


def find_nvcc(explicit: str | None = None) -> str | None:
    """nvcc from --nvcc, $CUDA_HOME/bin, PATH, or /usr/local/cuda/bin (first that exists)."""
    candidates = [explicit] if explicit else []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    found = shutil.which("nvcc")
    if found:
        candidates.append(found)
    candidates.append("/usr/local/cuda/bin/nvcc")
    for cand in candidates:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def torch_include_dirs() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    return list(include_paths())


def nvcc_command(nvcc: str, source: pathlib.Path, out_dir: pathlib.Path, stand_in_dir: pathlib.Path) -> list[str]:
    cmd = [nvcc, "-fatbin", "-std=c++20", "-O2", "-DUNISPEECH_FAST_WITH_CUDA", *TORCH_FLAGS, "-Xptxas=-warn-spills"]
    for arch in ARCHS:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    for inc in torch_include_dirs():
        cmd += ["-isystem", inc]
    # nvcc has no -idirafter of its own; the host preprocessor (used for both passes) takes it.
    cmd += ["-I", str(REPO / "csrc"), f"-Xcompiler=-idirafter,{stand_in_dir}"]
    cmd += ["-o", str(out_dir / (source.stem + ".fatbin")), str(source)]
    return cmd


def check_one(
    nvcc: str, source: pathlib.Path, out_dir: pathlib.Path, stand_in_dir: pathlib.Path
) -> tuple[bool, float, str]:
    """Compile ``source``; returns (ok, seconds, nvcc's combined output)."""
    start = time.monotonic()
    proc = subprocess.run(
        nvcc_command(nvcc, source, out_dir, stand_in_dir), capture_output=True, text=True, check=False
    )
    return proc.returncode == 0, time.monotonic() - start, (proc.stdout + proc.stderr).strip()


def write_stand_in(root: pathlib.Path) -> pathlib.Path:
    header = root / "stand_in" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    header.parent.mkdir(parents=True, exist_ok=True)
    header.write_text(STAND_IN_HEADER)
    return root / "stand_in"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=pathlib.Path, help="sources (default: csrc/cuda/*.cu)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel nvcc processes (default 2)")
    parser.add_argument("--nvcc", default=None, help="path to nvcc")
    args = parser.parse_args(argv)

    nvcc = find_nvcc(args.nvcc)
    if nvcc is None:
        print("check_cuda: nvcc not found (set CUDA_HOME, put nvcc on PATH, or pass --nvcc)", file=sys.stderr)
        return 2
    sources = [p.resolve() for p in args.files] or sorted(CUDA_DIR.glob("*.cu"))
    if not sources:
        print(f"check_cuda: no .cu files found in {CUDA_DIR}", file=sys.stderr)
        return 1
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        print(f"check_cuda: no such file(s): {', '.join(missing)}", file=sys.stderr)
        return 1

    failures = 0
    with tempfile.TemporaryDirectory(prefix="check_cuda_") as tmp:
        root = pathlib.Path(tmp)
        stand_in = write_stand_in(root)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {pool.submit(check_one, nvcc, src, root, stand_in): src for src in sources}
            for fut in concurrent.futures.as_completed(futures):
                src = futures[fut]
                ok, seconds, output = fut.result()
                name = os.path.relpath(src, REPO) if src.is_relative_to(REPO) else str(src)
                print(f"{'ok  ' if ok else 'FAIL'} {name} ({seconds:.1f} s, sm_{'/sm_'.join(ARCHS)})", flush=True)
                if not ok:
                    failures += 1
                    print(output, flush=True)
                elif "warning" in output.lower():  # e.g. register spills: worth seeing, not fatal
                    print(output, flush=True)
    print(f"check_cuda: {len(sources) - failures} of {len(sources)} file(s) compiled", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
