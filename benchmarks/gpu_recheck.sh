#!/usr/bin/env bash
# The GPU measurements still owed (no GPU could be started after 2026-12-07's changes), in two
# parts that each fit one device call of at most 10 minutes. Run from the repository root on a
# GPU machine, pydicom on the path (README: Speed and exactness), with OUT set to a folder the
# logs and JSON go to:
#
#     OUT=/some/folder bash benchmarks/gpu_recheck.sh 1   # GPU tests; gradient x input (#15)
#     OUT=/some/folder bash benchmarks/gpu_recheck.sh 2   # MedGemma's pass and speed (#16)
#
# Part 1: the differentiated RMS norms now run fused with a closed-form backward
# (fused_norms._FusedRMSNorm). The GPU tests check it (and the maps on CUDA) against autograd;
# bench_kernels' rmsnorm_grad times it against F.rms_norm's composite form and torch's CUDA
# backward kernel (adopt the kernel if it is faster and as exact); then the gradient x input
# sweep with the fused norms, and the same rows with the old norms on the same machine (A/B).
# Set attribution.DEFAULT_ROWS / DEFAULT_UNCHECKPOINTED from the sweep's gradxinput_choice if it
# meets both goals (<= 3x its rows' forward, peak <= 1.15x the weights).
# Part 2: MedGemma's preparation against the processor path on the same machine, then
# bench_speed's results JSON, default and compiled.
set -uo pipefail
: "${OUT:?set OUT to the folder for the logs}"
export PYTHONUNBUFFERED=1
part=${1:?part 1 or 2}
quiet() { grep -v "Warn\|Loading\|Writing"; }
if [ "$part" = 1 ]; then
    timeout 120 python -m pytest -q tests/test_gpu.py tests/test_fused_norms.py tests/test_prepare.py 2>&1 | tail -5 \
        | tee "$OUT/gpu-tests.log"
    timeout 60 python benchmarks/bench_kernels.py --parts rmsnorm_grad 2>&1 | quiet | tee "$OUT/rmsnorm-grad.log"
    sweep="--models llava_rad medgemma --only gradxinput --grad_studies 4 --grad_questions 4 --repeats 3"
    timeout 220 python benchmarks/bench_faithfulness.py $sweep --grad_rows llava_rad:1,2 medgemma:8 \
        --grad_uncheckpointed llava_rad:1,4,6 medgemma:1,4 --out "$OUT" 2>&1 | quiet | tee "$OUT/gradxinput-sweep.log"
    mkdir -p "$OUT/old-norms"
    timeout 120 python -c "
import runpy, sys, torch.nn.functional as F, medvlm.core.fused_norms as f
f.rms_norm = lambda x, w, e: F.rms_norm(x, (x.shape[-1],), w, e)  # the norms as before 2026-12-07
sys.argv = ['bench_faithfulness.py'] + sys.argv[1:]
runpy.run_path('benchmarks/bench_faithfulness.py', run_name='__main__')" $sweep --grad_rows llava_rad:2 medgemma:8 \
        --grad_uncheckpointed 1 --out "$OUT/old-norms" 2>&1 | quiet | sed 's/^/[old norms] /' | tee "$OUT/gradxinput-old-norms.log"
elif [ "$part" = 2 ]; then
    timeout 200 python benchmarks/bench_prepare.py --gpu_passes 4 --gpu_repeats 2 2>&1 | quiet \
        | tee "$OUT/prepare-ab.log"
    timeout 380 python benchmarks/bench_speed.py --models medgemma --n_studies 48 --sweep_studies 16 \
        --studies_per_pass 8 --naive_studies 0 --skip_exactness --compile --out "$OUT" 2>&1 | quiet | tee "$OUT/speed.log"
else
    echo "part 1 or 2" >&2
    exit 2
fi
