"""The measured order of ``backend("auto")``: generated, do not edit.

Made by ``python -m unispeech_fast.bench.auto_order`` (see :mod:`unispeech_fast.bench.auto_order`)
from the benchmark results in ``SOURCES``. Keys are (device type, op, dtype, mode); values are our
backends, fastest first. Where a key is absent, dispatch uses its default order.
"""

SOURCES: tuple[str, ...] = (
    'benchmarks/results/cpu_ops_2026-11-29/results.json',
)

ORDERS: dict[tuple[str, str, str, str], tuple[str, ...]] = {
    ('cpu', 'feature_extractor', 'float32', 'fwd'): ('eager', 'cpp'),
    ('cpu', 'feature_extractor', 'float32', 'fwd_bwd'): ('eager', 'cpp'),
    ('cpu', 'gumbel_quantizer', 'float32', 'fwd'): ('cpp', 'eager'),
    ('cpu', 'gumbel_quantizer', 'float32', 'fwd_bwd'): ('cpp', 'eager'),
    ('cpu', 'linear', 'float32', 'fwd'): ('cpp', 'eager'),
    ('cpu', 'pos_conv', 'float32', 'fwd'): ('eager', 'cpp'),
    ('cpu', 'pos_conv', 'float32', 'fwd_bwd'): ('cpp', 'eager'),
}
