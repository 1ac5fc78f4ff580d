#!/usr/bin/env bash
# The GPU checks of one session on a lent CUDA machine (docs/performance.md "On a GPU"): the CUDA tests,
# the masked-attention table and the end-to-end table, then the whole suite. Results go to $OUT.
# Run from the repository root: OUT=gpu-out bash benchmarks/gpu_session.sh
# Each step's time limit can be set (seconds; 0 skips the step): CUDA_SECONDS, ATTENTION_SECONDS, END_TO_END_SECONDS,
# SUITE_SECONDS, FAILURES_SECONDS.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/gpu.txt"
[ "${CUDA_SECONDS:-170}" != 0 ] && timeout "${CUDA_SECONDS:-170}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test-cuda.log" | tail -40
[ "${ATTENTION_SECONDS:-110}" != 0 ] && timeout "${ATTENTION_SECONDS:-110}" python3 -m benchmarks.attention_gpu --sizes 8192 --masks window,document,causal,prefix,padding \
    --repeats 5 --json "$OUT/gpu-attention.json" 2>&1 | tee "$OUT/attention.log"
[ "${END_TO_END_SECONDS:-120}" != 0 ] && timeout "${END_TO_END_SECONDS:-120}" python3 -m benchmarks.end_to_end --device cuda --parts train,generate --modes eager --bf16 \
    --layers 12 --width 768 --heads 12 --batch 8 --json "$OUT/gpu-end-to-end.json" 2>&1 | tee "$OUT/end-to-end.log"
# the whole suite (training tests train on the GPU: the trainer picks CUDA where it is), failures named as they come
[ "${SUITE_SECONDS:-120}" != 0 ] && OMP_NUM_THREADS=1 timeout "${SUITE_SECONDS:-120}" python3 -m pytest -v -p no:cacheprovider -n 12 --dist loadfile --timeout 120 tests \
    2>&1 | grep -E "FAILED|ERROR|[0-9]+ (passed|failed)" > "$OUT/full-suite.log"
touch "$OUT/full-suite.log"; cat "$OUT/full-suite.log"
# the files of the failures, again, one process, with tracebacks (test ids may hold spaces; file names do not)
failed=$(grep -oE "tests/[a-z_0-9]+\.py" "$OUT/full-suite.log" | sort -u | head -8)
[ -n "$failed" ] && [ "${FAILURES_SECONDS:-200}" != 0 ] && timeout "${FAILURES_SECONDS:-200}" python3 -m pytest -q -p no:cacheprovider --tb=short $failed 2>&1 \
    | grep -vE "^(\.|s|F|E)+ *\[" | tail -150 | tee "$OUT/failures.log"
true
