"""The encoder's dense layers: ``y = x W^T + b``.

Backends: ``eager`` (:func:`linear_ref`, ``F.linear``: on CPU that is MKL's sgemm) and ``cpp`` (CPU
float32 inference through oneDNN's matmul, ``torch.ops.mkldnn._linear_pointwise``, which ships with
torch; on the AMD EPYC development machine MKL's sgemm ran at about 210 GFLOP/s against oneDNN's
about 460 at the base model's shapes, see ``benchmarks/results/``).

The models route their plain ``nn.Linear`` layers through this op only under ``backend("auto")`` and
``backend("cpp")`` (:func:`unispeech_fast.modules.dense`); under a forced ``eager``, ``triton`` or
``cuda`` backend the dense layers are ``F.linear``, as they are not among those backends' kernels.

Accuracy: a plain oneDNN matmul accumulates the whole reduction dim in one fp32 sum; measured against
fp64, its max error at K = 3072 was about 3x MKL's, which blocks the reduction. The ``cpp`` backend
therefore splits K into chunks of at most :data:`K_CHUNK` (each with its own accumulator, summed in
fp32), which brings the error to within about 2x of MKL's at every base-model shape
(``tests/ops/test_linear.py`` checks this against an fp64 reference).
"""

from __future__ import annotations

import torch

from ... import dispatch
from ...dispatch import Capabilities
from . import extension
from .extension import K_CHUNK
from .reference import linear_ref

__all__ = ["CAPABILITIES", "linear", "linear_ref", "K_CHUNK"]

#: What each backend supports, as data: dispatch's one base check reads it; the backend's own
#: ``not_supported_reasons`` adds only the limits of the call (no backward, shapes).
CAPABILITIES = {
    "cpp": Capabilities("the oneDNN linear", devices=("cpu",), dtypes=extension.DTYPES),
}

dispatch.register("linear", "eager")(linear_ref)
dispatch.register("linear", "cpp", capabilities=CAPABILITIES["cpp"],
                  not_supported_reasons=extension._cpp_reasons)(extension.linear_cpp)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b`` on the current backend (see :mod:`unispeech_fast.dispatch`)."""
    return dispatch.call("linear", x=x, weight=weight, bias=bias)
