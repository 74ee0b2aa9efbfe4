"""Register spills allowed above :data:`.aot.SPILL_BUDGET_BYTES` in shipped Triton variants:
(variant name, arch) -> (ptxas "bytes spill stores", the one-line reason it is allowed).

:mod:`.aot` fails a variant that spills more than its entry here (or, without an entry, more than
``SPILL_BUDGET_BYTES``), so a new or a larger spill fails CI. Empty: on 2026-11-30 (Triton 3.9, ptxas of
CUDA 13) no variant of the five kernel modules spilled more than the budget on sm_80 or sm_90 (issue 16 item 8:
the attention, feature-extractor, positional-conv and contrastive-loss configs were changed to fit; their
comments give the spills they replaced). An entry needs its measured size and a reason, e.g. "no config of this
block size fits; the smaller one costs ...".
"""

KNOWN_SPILLS: dict[tuple[str, int], tuple[int, str]] = {}
