#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool's `run`): build the CUDA extension with the
# machine's own torch, run the gpu-marked tests, then the op benchmarks, and leave every log and JSON
# file under $OUT. Written for a 15-minute device budget: each step has its own time limit, a failed
# step does not stop the next, and a short summary is printed last (the tool returns the output's tail).
#
#   bash scripts/gpu_session.sh            # on the device machine, from the repository root
#
# Afterwards, on the development machine: copy $OUT/bench/results.json (and the gpu test log) under
# benchmarks/results/<device>_<date>/ and regenerate the README tables. Nothing here has run on a GPU
# yet (no session of this project has been lent one): expect to fix the first run.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/unispeech_fast_gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BIN="$(dirname "$(command -v "$PY")")"
summary=()

step() {  # step NAME SECONDS LOGFILE COMMAND...: run with a time limit, record the exit status
    local name=$1 limit=$2 log=$3
    shift 3
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$log" 2>&1
    local rc=$?
    summary+=("$(printf '%-12s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$log")")
    return $rc
}

{
    nvidia-smi
    "$PY" -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
    nvcc --version
} >"$OUT/env.txt" 2>&1

# The extension: CPU and CUDA ops, for this GPU only (one arch halves the build). No index: the machine
# has no network, and --no-deps keeps the image's packages as they are.
export MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
step build 420 build.log "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
"$PY" -m unispeech_fast info >"$OUT/info.txt" 2>&1

# First the GPU tests added for issue 16 (the fixes a line-by-line review found: empty attention rows,
# NaN in padded K/V, the group-norm apply pass, Philox noise, dropout across blocks, the int64 paths at
# real lengths), so that a short session answers them before anything else. Through the pytest
# executable, never `python -m pytest` (it would put the repository root, and so the top-level
# kernels/, on sys.path).
ISSUE16=(
    "tests/ops/test_attention.py::test_cuda_zero_length_row_attends_uniformly"
    "tests/ops/test_feature_extractor.py::test_cuda_conv_norm_gelu_layer0"
    "tests/ops/test_gumbel_quantizer.py::test_cuda_philox_noise_finite_at_real_size"
    "tests/ops/test_attention.py::test_dropout_gpu"
    "tests/ops/test_gumbel_quantizer.py::test_gpu_memory_and_philox_statistics_at_real_size"
    "tests/ops/test_gumbel_quantizer.py::test_cuda_no_row_gives_nan_perplexity"
    "tests/test_triton_common.py"
)
step issue16 240 gpu_issue16.log "$BIN/pytest" -q "${ISSUE16[@]}" -p no:cacheprovider -rfE \
    --junitxml="$OUT/gpu_issue16.xml"
# The int64 paths at real lengths (22-minute rows, 50k-frame attention, 2^31 Gumbel logits): gpu + slow.
step int64 300 gpu_int64.log "$BIN/pytest" -q -m "gpu and slow" tests -p no:cacheprovider -rfE \
    --junitxml="$OUT/gpu_int64.xml"

# The other gpu-marked tests (real sizes, bf16, CUDA kernels).
step gpu-tests 300 gpu_tests.log "$BIN/pytest" -q -m "gpu and not slow" tests -p no:cacheprovider -rfE \
    --junitxml="$OUT/gpu_tests.xml"

# The op benchmarks on the GPU grid (fp16 by default on CUDA), JSON/CSV/PNG under $OUT/bench.
step bench 360 bench.log "$BIN/unispeech-fast" bench --op attention --op pos_conv \
    --op feature_extractor --op gumbel_quantizer --out "$OUT/bench"

echo "== env";        head -n 20 "$OUT/env.txt" | grep -E "H100|H200|torch|triton|release" || true
echo "== issue 16";   tail -n 15 "$OUT/gpu_issue16.log" 2>/dev/null || true
echo "== int64";      tail -n 10 "$OUT/gpu_int64.log" 2>/dev/null || true
echo "== gpu tests";  tail -n 15 "$OUT/gpu_tests.log" 2>/dev/null || true
echo "== bench";      tail -n 40 "$OUT/bench.log" 2>/dev/null || true
echo "== steps";      printf '%s\n' "${summary[@]}"
