"""Build script for unispeech_fast.

Metadata lives in pyproject.toml; this file only lists the packages, because the top-level
``kernels/`` folder (Triton kernels) must install as the subpackage ``unispeech_fast.kernels`` and
never as a top-level ``kernels`` module (a PyPI package owns that name). tests/ and benchmarks/ are
not packaged.

No compiled extension is built yet. The C++/CUDA extension ``unispeech_fast._C`` will be built from
``csrc/`` (see csrc/README.md); when it is, this file will read the usual switches
``UNISPEECH_FAST_SKIP_CUDA_BUILD``, ``FORCE_CUDA`` and ``TORCH_CUDA_ARCH_LIST``. Until then it reads
none of them, and ``python -m unispeech_fast info`` reports the extension as not built.

Install with ``pip install --no-build-isolation -e .`` (torch must already be installed).
"""

from setuptools import find_packages, setup

# unispeech_fast and every subpackage of it (ops, models, ...), nothing else from the repo root.
PACKAGES = find_packages(include=["unispeech_fast", "unispeech_fast.*"])
# kernels/ and any subfolders it grows, installed under unispeech_fast.kernels.
PACKAGES += ["unispeech_fast.kernels"] + [
    f"unispeech_fast.kernels.{sub}" for sub in find_packages(where="kernels")
]

setup(
    packages=PACKAGES,
    package_dir={"unispeech_fast.kernels": "kernels"},
)
