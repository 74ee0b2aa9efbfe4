"""Triton kernels for unispeech_fast, installed as the subpackage ``unispeech_fast.kernels``.

This folder holds private ``@triton.jit`` kernels only. Their launchers, autograd functions and
dispatch registrations live in ``unispeech_fast/ops``; importing this package imports nothing and
registers nothing. It is never importable as a top-level ``kernels`` module once installed (a PyPI
package owns that name).
"""
