#!/usr/bin/env bash
# The GPU measurements the 2026-12-07 changes still owe (no GPU was lent that session), in two
# parts that each fit one device call of at most 10 minutes. Run from the repository root on a
# GPU machine, pydicom on the path (README: Speed and exactness), with OUT set to a folder the
# logs and JSON go to:
#
#     OUT=/some/folder bash benchmarks/gpu_recheck.sh 1   # GPU tests; gradient x input sweep (#15)
#     OUT=/some/folder bash benchmarks/gpu_recheck.sh 2   # MedGemma's pass with the new preparation (#16)
#
# Part 1: the lean uncheckpointed layers let more layers run without checkpointing within the
# memory goal: the sweep says which (rows, layers) now gives gradient x input <= 3x its rows'
# forward at peak <= 1.15x the weights (then set attribution.DEFAULT_ROWS / DEFAULT_UNCHECKPOINTED
# from its gradxinput_choice), and the profile whether a pass waits on the host.
# Part 2: MedGemma's preparation (direct resize, the stand-in image for the prompt check) against
# the processor path on the same machine, three ways, then bench_speed's results JSON.
set -uo pipefail
: "${OUT:?set OUT to the folder for the logs}"
export PYTHONUNBUFFERED=1
part=${1:?part 1 or 2}
quiet() { grep -v "Warn\|Loading\|Writing"; }
if [ "$part" = 1 ]; then
    timeout 120 python -m pytest -q tests/test_gpu.py tests/test_prepare.py 2>&1 | tail -5 | tee "$OUT/gpu-tests.log"
    timeout 330 python benchmarks/bench_faithfulness.py --models llava_rad medgemma --only gradxinput \
        --grad_rows llava_rad:1,2 medgemma:8 --grad_uncheckpointed llava_rad:1,6,10,14 medgemma:1,4 \
        --grad_studies 4 --grad_questions 4 --repeats 3 --out "$OUT" 2>&1 | quiet | tee "$OUT/gradxinput-sweep.log"
    timeout 120 python benchmarks/profile_attribution.py --model llava_rad --rows 2 --uncheckpointed 1 \
        --questions 8 --top 30 2>&1 | quiet | tee "$OUT/profile-attribution.log"
elif [ "$part" = 2 ]; then
    timeout 200 python benchmarks/bench_prepare.py --gpu_passes 4 --gpu_repeats 2 2>&1 | quiet \
        | tee "$OUT/prepare-ab.log"
    timeout 380 python benchmarks/bench_speed.py --models medgemma --n_studies 48 --sweep_studies 16 \
        --studies_per_pass 8 --naive_studies 0 --skip_exactness --out "$OUT" 2>&1 | quiet | tee "$OUT/speed.log"
else
    echo "part 1 or 2" >&2
    exit 2
fi
