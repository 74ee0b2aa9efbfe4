"""Packaging and import hygiene.

``import unispeech_fast`` must not initialise CUDA, import Triton or load the compiled extension;
``kernels/`` installs as ``unispeech_fast.kernels`` (never as a top-level ``kernels``) and importing
it registers nothing. Subprocesses run from a temporary folder so the repository root is not on
``sys.path``.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import unispeech_fast

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object as its last line."""
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_import_does_not_initialise_cuda_or_load_triton_or_extension(tmp_path):
    result = run_python(
        """
        import json, sys
        import torch
        import unispeech_fast
        print(json.dumps({
            "cuda_initialized": torch.cuda.is_initialized(),
            "triton": sorted(m for m in sys.modules if m == "triton" or m.startswith("triton.")),
            "extension": sorted(m for m in sys.modules if m.startswith("unispeech_fast._C")),
            "top_level_kernels": "kernels" in sys.modules,
        }))
        """,
        tmp_path,
    )
    assert result == {"cuda_initialized": False, "triton": [], "extension": [], "top_level_kernels": False}


def test_cpu_forward_does_not_initialise_cuda(tmp_path):
    result = run_python(
        """
        import json
        import torch
        import unispeech_fast as uf
        from unispeech_fast.cli import tiny_config
        model = uf.UniSpeechSatModel(tiny_config()).eval()
        with torch.inference_mode():
            model(torch.randn(1, 4000))
        uf.available_backends("cpu")
        print(json.dumps({"cuda_initialized": torch.cuda.is_initialized()}))
        """,
        tmp_path,
    )
    assert result == {"cuda_initialized": False}


def test_kernels_is_a_subpackage_and_importing_it_registers_nothing(tmp_path):
    result = run_python(
        """
        import importlib, importlib.util, json, sys
        import torch
        from unispeech_fast import dispatch
        import unispeech_fast.ops  # importing the ops registers their backends
        def registry():
            return {op: sorted(impls) for op, impls in dispatch._REGISTRY.items()}
        before_registry = registry()
        before_ops = len(torch._C._dispatch_get_all_op_names())
        before_modules = set(sys.modules)
        kernels = importlib.import_module("unispeech_fast.kernels")
        top = importlib.util.find_spec("kernels")
        print(json.dumps({
            "name": kernels.__name__,
            "file": kernels.__file__,
            "new_modules": sorted(set(sys.modules) - before_modules),
            "registry_changed": registry() != before_registry,
            "torch_ops_added": len(torch._C._dispatch_get_all_op_names()) - before_ops,
            "top_level_kernels": None if top is None else top.origin,
        }))
        """,
        tmp_path,
    )
    assert result["name"] == "unispeech_fast.kernels"
    assert Path(result["file"]).parts[-2:] == ("kernels", "__init__.py")
    assert result["new_modules"] == ["unispeech_fast.kernels"]
    assert not result["registry_changed"]
    assert result["torch_ops_added"] == 0
    # A top-level `kernels` may exist (a PyPI package of that name) but must never be ours.
    if result["top_level_kernels"] is not None:
        assert Path(result["top_level_kernels"]).resolve() != (REPO / "kernels" / "__init__.py").resolve()


def test_installed_metadata_matches_package():
    dist = importlib.metadata.distribution("unispeech_fast")
    assert dist.version == unispeech_fast.__version__
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"unispeech-fast": "unispeech_fast.cli:main"}
    requires = dist.requires or []
    torch_reqs = [r for r in requires if r.replace(" ", "").startswith("torch") and "extra" not in r]
    # A lower bound only: an installed CPU or CUDA torch must satisfy it without reinstalling.
    assert [r.replace(" ", "") for r in torch_reqs] == ["torch>=2.4"]
    assert not any(r.replace(" ", "").startswith("torch") and "extra" in r for r in requires)
    triton = [r for r in requires if r.startswith("triton")]
    assert len(triton) == 1 and "platform_system" in triton[0] and "extra" not in triton[0]


def test_wheel_contents(tmp_path):
    """A regular (non-editable) wheel holds unispeech_fast.kernels and no tests, benchmarks or top-level kernels."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for name in ("unispeech_fast", "kernels", "tests", "benchmarks", "csrc"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=ignore)
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index", "-q",
         "-w", str(tmp_path / "dist"), str(src)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = (tmp_path / "dist").glob("unispeech_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_levels = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_levels == {"unispeech_fast"}, top_levels
    for required in ("unispeech_fast/__init__.py", "unispeech_fast/__main__.py", "unispeech_fast/cli/__init__.py",
                     "unispeech_fast/ops/__init__.py", "unispeech_fast/models/__init__.py",
                     "unispeech_fast/kernels/__init__.py"):
        assert required in names, f"{required} missing from {wheel.name}"
