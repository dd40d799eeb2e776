#!/usr/bin/env bash
# The GPU measurements of 2026-12-08's changes, in one device call of at most 10 minutes. Run from
# the repository root on a GPU machine, pydicom on the path (README: Speed and exactness), with
# OUT set to a folder the logs and JSON go to:
#
#     OUT=/some/folder bash benchmarks/gpu_recheck.sh
#
# 1. The GPU tests (the cast-free bf16 norms write nothing of the hidden states' size in float32
#    and stay within 1.5 bf16 ulps; the gradient maps on CUDA against the eager reference).
# 2. benchmarks/ab_norms.py: the cast-free norms against the float32 copy, both models, one process.
# 3. bench_speed for MedGemma (#16), default and compiled, with its exactness against the float32
#    eager reference (bf16 fast path vs bf16 eager, for scale).
# 4. Gradient x input at the defaults (#15): its forward-only baseline now has the cast-free norms.
set -uo pipefail
: "${OUT:?set OUT to the folder for the logs}"
export PYTHONUNBUFFERED=1
quiet() { grep -v "Warn\|Loading\|Writing\|warn"; }
timeout 80 python -m pytest -q tests/test_gpu.py tests/test_fused_norms.py 2>&1 | tail -4 | tee "$OUT/gpu-tests.log"
timeout 150 python benchmarks/ab_norms.py --models medgemma llava_rad --rounds 2 2>&1 | quiet | tee "$OUT/ab-norms.log"
timeout 240 python benchmarks/bench_speed.py --models medgemma --n_studies 48 --sweep_studies 16 --studies_per_pass 8 \
    --naive_studies 0 --exactness_studies 1 --compile --out "$OUT" 2>&1 | quiet | tee "$OUT/speed.log"
mkdir -p "$OUT/f"
timeout 100 python benchmarks/bench_faithfulness.py --models llava_rad medgemma --only gradxinput --grad_studies 4 \
    --grad_questions 4 --repeats 3 --grad_rows llava_rad:2 medgemma:8 --grad_uncheckpointed 1 --out "$OUT/f" 2>&1 \
    | quiet | tee "$OUT/gradxinput.log"
