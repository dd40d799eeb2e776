"""Where a gradient x input pass spends its time (GPU): host or device, forward or backward, which kernels.

    python benchmarks/profile_attribution.py --model llava_rad --rows 2 --uncheckpointed 1
    python benchmarks/profile_attribution.py --model medgemma --rows 8 --questions 16
    python benchmarks/profile_attribution.py --smoke          # tiny shapes on the CPU: checks the script

For R rows per pass and u uncheckpointed layers (medvlm.core.attribution.attribution_maps) it prints
the wall time per question of gradient x input and of the same rows' forward alone
(attribution_margins), then, under torch.profiler for one call: the GPU's busy time (sum of
kernel times) against the wall time, the kernel launches, the device time inside the forward
and inside the backward (its recomputation included), and the top kernels. A pass whose
busy time is well under its wall time is bound by the host (Python, autograd, launches).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_speed import DEVICE, PARAPHRASES, build, images, sync  # noqa: E402

from medvlm.core import attribution  # noqa: E402
from medvlm.core.config import MedicalAttentionConfig  # noqa: E402


def wall(fn, repeats: int) -> float:
    """The least seconds of repeats synchronised runs of fn."""
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def kernel_events(prof):
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llava_rad", choices=("llava_rad", "medgemma"))
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--uncheckpointed", type=int, default=1)
    p.add_argument("--questions", type=int, default=8, help="questions per timed call (4 per study)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    if a.smoke:
        DEVICE.update(name="cpu", full_size=False)
        a.questions, a.repeats, a.top = 4, 1, 5
    elif not torch.cuda.is_available():
        raise SystemExit("this profile needs a CUDA GPU (or --smoke)")
    dtype = torch.bfloat16 if DEVICE["name"] == "cuda" else torch.float32
    attention = MedicalAttentionConfig(attention_head_mode="mean", layers="all", query_mode="answer")
    backend, _ = build(a.model, dtype, attention)
    q = 4
    items = [(im, PARAPHRASES[:q], None) for im in images(-(-a.questions // q))]
    n_q = len(items) * q

    def grad():
        return attribution.attribution_maps(backend, items, ("gradxinput",), rows_per_pass=a.rows,
                                            uncheckpointed=a.uncheckpointed)  # fmt: skip

    def forward():
        return attribution.attribution_margins(backend, items, rows_per_pass=a.rows)

    grad(), forward()  # warm-up at these shapes
    t_g, t_f = wall(grad, a.repeats), wall(forward, a.repeats)
    print(f"{a.model} R={a.rows} u={a.uncheckpointed}: gradxinput {t_g / n_q * 1e3:.1f} ms/question, forward alone "
          f"{t_f / n_q * 1e3:.1f} ms/question, {t_g / t_f:.2f}x ({DEVICE['name']}, {n_q} questions)", flush=True)

    # device time inside the forward and the backward: ranges around the two halves
    real_forward, real_grad = attribution._forward_rows, torch.autograd.grad

    def ranged_forward(*args, **kw):
        with torch.profiler.record_function("medvlm_forward"):
            return real_forward(*args, **kw)

    def ranged_grad(*args, **kw):
        with torch.profiler.record_function("medvlm_backward"):
            return real_grad(*args, **kw)

    acts = [torch.profiler.ProfilerActivity.CPU]
    if DEVICE["name"] == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    attribution._forward_rows, torch.autograd.grad = ranged_forward, ranged_grad
    try:
        with torch.profiler.profile(activities=acts) as prof:
            sync()
            t0 = time.perf_counter()
            grad()
            sync()
            prof_wall = time.perf_counter() - t0
    finally:
        attribution._forward_rows, torch.autograd.grad = real_forward, real_grad
    kernels = kernel_events(prof)
    busy = sum(e.device_time_total for e in kernels) / 1e3 if kernels else float("nan")
    launches = sum(1 for e in prof.events() if e.name in ("cudaLaunchKernel", "cuLaunchKernelEx", "cuLaunchKernel"))
    print(f"under the profiler: wall {prof_wall * 1e3:.1f} ms, GPU kernels busy {busy:.1f} ms "
          f"({busy / (prof_wall * 1e3):.0%}), {launches} launches, {launches / n_q:.0f} per question")
    for e in prof.key_averages():
        if e.key.startswith("medvlm_"):
            print(f"  {e.key}: host {e.cpu_time_total / 1e3:.1f} ms, device {e.device_time_total / 1e3:.1f} ms")
    by_kind: dict[str, float] = defaultdict(float)
    for e in kernels:
        n = e.name.lower()
        kind = ("attention" if "flash" in n or "fmha" in n or "sdpa" in n or "attention" in n else
                "matmul" if "gemm" in n or "nvjet" in n or "sm90_xmma" in n or "cutlass" in n else
                "norm" if "norm" in n else "elementwise/other")  # fmt: skip
        by_kind[kind] += e.device_time_total / 1e3
    print("device ms by kind:", {k: round(v, 1) for k, v in sorted(by_kind.items(), key=lambda x: -x[1])})
    sort = "cuda_time_total" if DEVICE["name"] == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=a.top, max_name_column_width=90))
    return 0


if __name__ == "__main__":
    sys.exit(main())
