#!/usr/bin/env bash
# The GPU measurements of 2026-12-08's changes, in one device call of at most 10 minutes. Run from
# the repository root on a GPU machine, pydicom on the path (README: Speed and exactness), with
# OUT set to a folder the logs and JSON go to:
#
#     OUT=/some/folder bash benchmarks/gpu_recheck.sh
#
# 1. The GPU tests (the cast-free bf16 norms write nothing of the hidden states' size in float32
#    and stay within 1.5 bf16 ulps; the gradient maps on CUDA against the eager reference, with
#    LLaVA-Rad's shared-prefix passes on the split attention).
# 2. Gradient x input (#15): LLaVA-Rad's shared-prefix passes (6 questions of a study per pass,
#    u layers uncheckpointed) and MedGemma's both ways; their forward-only baselines.
# 3. benchmarks/ab_norms.py: the cast-free norms against the float32 copy, both models, one process.
# 4. bench_speed for MedGemma (#16), default and compiled, with its exactness against the float32
#    eager reference (bf16 eager for scale).
set -uo pipefail
: "${OUT:?set OUT to the folder for the logs}"
export PYTHONUNBUFFERED=1
quiet() { grep -v "Warn\|Loading\|Writing\|warn"; }
timeout 90 python -m pytest -q tests/test_gpu.py tests/test_fused_norms.py 2>&1 | tail -4 | tee "$OUT/gpu-tests.log"
mkdir -p "$OUT/f"
timeout 170 python benchmarks/bench_faithfulness.py --models llava_rad medgemma --only gradxinput --grad_studies 4 \
    --grad_questions 6 --repeats 2 --grad_rows llava_rad:6 medgemma:8 --grad_uncheckpointed llava_rad:1,4,8 medgemma:1 \
    --grad_share llava_rad:1 medgemma:0,1 --out "$OUT/f" 2>&1 | quiet | tee "$OUT/gradxinput.log"
timeout 120 python benchmarks/ab_norms.py --models medgemma llava_rad --rounds 2 2>&1 | quiet | tee "$OUT/ab-norms.log"
timeout 190 python benchmarks/bench_speed.py --models medgemma --n_studies 48 --sweep_studies 16 --studies_per_pass 8 \
    --naive_studies 0 --exactness_studies 1 --compile --out "$OUT" 2>&1 | quiet | tee "$OUT/speed.log"
