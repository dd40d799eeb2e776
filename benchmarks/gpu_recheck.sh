#!/usr/bin/env bash
# The GPU measurements still owed to issues #15 and #16, in two device calls of at most 10 minutes
# each. Run from the repository root on a GPU machine, pydicom and pydicom-data on the path
# (benchmarks/README.md says how on a machine without network), with OUT set to a folder for the
# logs and JSON (bench_speed's JSON in OUT/<model>/):
#
#     OUT=/some/folder bash benchmarks/gpu_recheck.sh 1     # then, on the same machine:
#     OUT=/some/folder bash benchmarks/gpu_recheck.sh 2
#
# Part 1 (MedGemma; #16's goal is its ratio to the floor with the vision tower's attention):
#   1. the GPU tests, among them those written without a GPU: a launched pass is read without
#      waiting for the work queued after it (the runner's overlapped passes), the gradient passes
#      make no host sync until their maps are read, and --overlap_tower runs the next tower beside
#      queued work with the same scores to the bit
#   2. bench_speed for MedGemma, default and compiled, with its exactness against the float32
#      eager reference and the A/B of overlapped passes against each pass read before the next
#      launch and against the tower on its own stream (overlap_ab: three rounds, alternated, in
#      one process; the compiled path's tower_stream_ab likewise)
#   3. profile_pass's ways (prepared in line, in a thread with and without overlap, the device
#      side alone with and without overlap, and with the tower on its own stream)
# Part 2:
#   4. gradient x input (#15) at the defaults, and a shared row's questions in one vmapped
#      backward (questions_per_backward 3 and 6; MedGemma shared too), with the forward-only baselines
#      (the sync-free passes)
#   5. bench_speed for LLaVA-Rad, default and compiled, with its overlap A/B
set -uo pipefail
: "${OUT:?set OUT to the folder for the logs}"
part="${1:?say which part: 1 or 2}"
export PYTHONUNBUFFERED=1
quiet() { grep -v "Warn\|Loading\|Writing\|warn"; }
if [ "$part" = 1 ]; then
    timeout 120 python -m pytest -q tests/test_gpu.py tests/test_fused_norms.py 2>&1 | tail -6 | tee "$OUT/gpu-tests.log"
    timeout 250 python benchmarks/bench_speed.py --models medgemma --n_studies 48 --sweep_studies 16 --studies_per_pass 8 \
        --naive_studies 0 --exactness_studies 1 --compile --overlap_rounds 3 --out "$OUT/medgemma" 2>&1 | quiet | tee "$OUT/speed-medgemma.log"
    timeout 150 python benchmarks/profile_pass.py --model medgemma --studies_per_pass 8 --n 32 --torch_threads 16 2>&1 \
        | quiet | tee "$OUT/three-ways-medgemma.log"
elif [ "$part" = 2 ]; then
    mkdir -p "$OUT/f"
    timeout 230 python benchmarks/bench_faithfulness.py --models llava_rad medgemma --only gradxinput --grad_studies 4 \
        --grad_questions 6 --repeats 2 --grad_rows llava_rad:6 medgemma:8 --grad_uncheckpointed llava_rad:1,4 medgemma:1 \
        --grad_share llava_rad:1 medgemma:0,1 --grad_together llava_rad:1,3,6 medgemma:6 --out "$OUT/f" 2>&1 | quiet \
        | tee "$OUT/gradxinput.log"
    timeout 330 python benchmarks/bench_speed.py --models llava_rad --n_studies 48 --sweep_studies 16 --studies_per_pass 8 \
        --naive_studies 0 --exactness_studies 1 --compile --overlap_rounds 3 --no_validity --out "$OUT/llava_rad" 2>&1 | quiet \
        | tee "$OUT/speed-llava_rad.log"
else
    echo "part must be 1 or 2" >&2
    exit 2
fi
