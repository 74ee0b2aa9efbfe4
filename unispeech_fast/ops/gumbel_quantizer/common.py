"""The limits of ``gumbel_quantizer`` that its Triton kernels (``unispeech_fast.kernels.gumbel_quantizer``) and its
triton backend's reasons share, kept once. It imports neither triton nor the rest of the package, so that answering
"can the triton backend run this call?" never imports triton while the kernels' launch table reads the same number.
"""

from __future__ import annotations

__all__ = ["MAX_CODES"]

#: The largest number of codes per group ``V`` the Triton launch table serves (``BLOCK_V`` of its widest entry).
MAX_CODES = 512
