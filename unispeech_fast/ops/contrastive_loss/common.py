"""The limits of ``contrastive_loss`` that its Triton kernels (``unispeech_fast.kernels.contrastive_loss``) and its
triton backend's reasons share, kept once. It imports neither triton nor the rest of the package, so that answering
"can the triton backend run this call?" never imports triton while the kernel reads the same number.
"""

from __future__ import annotations

__all__ = ["MAX_D"]

#: The widest feature axis ``D`` one program of the Triton kernels holds in registers.
MAX_D = 1024
