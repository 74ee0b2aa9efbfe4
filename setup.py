"""Build script for unispeech_fast.

Metadata lives in pyproject.toml; this file lists the packages (the top-level ``kernels/`` folder of
Triton kernels installs as the subpackage ``unispeech_fast.kernels``, never as a top-level
``kernels`` module: a PyPI package owns that name; tests/ and benchmarks/ are not packaged) and
builds the compiled extension ``unispeech_fast._C`` from ``csrc/`` (see csrc/README.md):

* always the C++ CPU ops (``csrc/schemas.cpp``, ``csrc/cpu/*.cpp``, ``csrc/module.cpp``) as a
  ``CppExtension``, compiled for baseline x86-64 (hot loops carry an AVX2+FMA copy chosen at run
  time, so the binary runs on any x86-64 CPU);
* plus the CUDA ops (``csrc/cuda/*.cu``) as a ``CUDAExtension`` when torch is a CUDA build and a
  CUDA toolkit is found, or when ``FORCE_CUDA=1``.

Switches (environment variables, read at build time; no network is used):

``UNISPEECH_FAST_SKIP_BUILD=1``        no extension at all (pure-Python install; cpp/cuda backends off)
``UNISPEECH_FAST_SKIP_CUDA_BUILD=1``   build the CPU ops only, even with a CUDA torch and toolkit
``FORCE_CUDA=1``                       build the CUDA ops even when no GPU/toolkit is detected
``TORCH_CUDA_ARCH_LIST``               GPU architectures (default ``"8.0;9.0"``)
``MAX_JOBS``                           parallel compile jobs (ninja)

Install with ``pip install --no-build-isolation -e .`` (torch must already be installed; without it
the build stops with a message saying so, and without a C++ compiler with torch's message).
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# unispeech_fast and every subpackage of it (ops, models, ...), nothing else from the repo root.
PACKAGES = find_packages(include=["unispeech_fast", "unispeech_fast.*"])
# kernels/ and any subfolders it grows, installed under unispeech_fast.kernels.
PACKAGES += ["unispeech_fast.kernels"] + [
    f"unispeech_fast.kernels.{sub}" for sub in find_packages(where="kernels")
]

# Codes for csrc/module.cpp (UNISPEECH_FAST_CUDA_STATUS): why CUDA was or was not compiled in.
CUDA_BUILT, CUDA_SKIPPED_BY_ENV, CUDA_CPU_TORCH, CUDA_NO_TOOLKIT, CUDA_NO_SOURCES = 1, 2, 3, 4, 5


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _extensions():
    """(ext_modules, cmdclass) for unispeech_fast._C, or ([], {}) for a pure-Python install."""
    if _flag("UNISPEECH_FAST_SKIP_BUILD"):
        print("unispeech_fast: UNISPEECH_FAST_SKIP_BUILD=1, building no extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise RuntimeError(
            "building unispeech_fast._C needs torch: install torch first and then "
            "`pip install --no-build-isolation .` (or set UNISPEECH_FAST_SKIP_BUILD=1 for a pure-Python install)"
        ) from exc

    cpu_sources = _rel(
        [os.path.join(ROOT, "csrc", "schemas.cpp"), os.path.join(ROOT, "csrc", "module.cpp")]
        + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    )
    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))

    if _flag("UNISPEECH_FAST_SKIP_CUDA_BUILD"):
        cuda_status = CUDA_SKIPPED_BY_ENV
    elif not cuda_sources:
        cuda_status = CUDA_NO_SOURCES
    elif _flag("FORCE_CUDA"):
        cuda_status = CUDA_BUILT
    elif torch.version.cuda is None:
        cuda_status = CUDA_CPU_TORCH
    elif cpp_extension.CUDA_HOME is None:
        cuda_status = CUDA_NO_TOOLKIT
    else:
        cuda_status = CUDA_BUILT

    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wno-unused-parameter"]
    macros = [("UNISPEECH_FAST_CUDA_STATUS", str(cuda_status))]
    kwargs = dict(
        name="unispeech_fast._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_link_args=["-fopenmp"],
    )
    if cuda_status == CUDA_BUILT:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = cpp_extension.CUDAExtension(
            sources=cpu_sources + cuda_sources,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
            },
            **kwargs,
        )
    else:
        ext = cpp_extension.CppExtension(sources=cpu_sources, extra_compile_args={"cxx": cxx_flags}, **kwargs)
    print(f"unispeech_fast: building unispeech_fast._C (CUDA status code {cuda_status})", file=sys.stderr)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


EXT_MODULES, CMDCLASS = _extensions()

setup(
    packages=PACKAGES,
    package_dir={"unispeech_fast.kernels": "kernels"},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)
