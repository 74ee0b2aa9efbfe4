"""The measured order of ``backend("auto")``: generated, do not edit.

Made by ``python -m unispeech_fast.bench.auto_order`` (see :mod:`unispeech_fast.bench.auto_order`)
from the benchmark results in ``SOURCES``. Keys are (device key, op, dtype, mode), the device key
being ``cpu:<ISA>`` or the device type; values are our backends, fastest first. Where a key is
absent, dispatch uses its default order.
"""

SOURCES: tuple[str, ...] = (
    'benchmarks/results/cpu_ops_2026-11-29/results.json',
    'benchmarks/results/cpu_attention_2026-11-30T14/results.json',
    'benchmarks/results/cpu_contrastive_loss_2026-11-30/results.json',
)

ORDERS: dict[tuple[str, str, str, str], tuple[str, ...]] = {
    ('cpu:AVX512', 'attention', 'bfloat16', 'fwd'): ('cpp', 'eager'),
    ('cpu:AVX512', 'attention', 'bfloat16', 'fwd_bwd'): ('eager', 'cpp'),
    ('cpu:AVX512', 'attention', 'float32', 'fwd'): ('eager', 'cpp'),
    ('cpu:AVX512', 'attention', 'float32', 'fwd_bwd'): ('eager', 'cpp'),
    ('cpu:AVX512', 'contrastive_loss', 'float32', 'fwd'): ('cpp', 'eager'),
    ('cpu:AVX512', 'contrastive_loss', 'float32', 'fwd_bwd'): ('cpp', 'eager'),
    ('cpu:AVX512', 'feature_extractor', 'float32', 'fwd'): ('eager', 'cpp'),
    ('cpu:AVX512', 'feature_extractor', 'float32', 'fwd_bwd'): ('eager', 'cpp'),
    ('cpu:AVX512', 'gumbel_quantizer', 'float32', 'fwd'): ('cpp', 'eager'),
    ('cpu:AVX512', 'gumbel_quantizer', 'float32', 'fwd_bwd'): ('cpp', 'eager'),
    ('cpu:AVX512', 'linear', 'float32', 'fwd'): ('cpp', 'eager'),
    ('cpu:AVX512', 'pos_conv', 'float32', 'fwd'): ('eager', 'cpp'),
    ('cpu:AVX512', 'pos_conv', 'float32', 'fwd_bwd'): ('cpp', 'eager'),
}
