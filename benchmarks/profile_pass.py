"""Where one backend pass spends its time (GPU): phase timings and a kernel profile.

    python benchmarks/profile_pass.py --model medgemma --studies_per_pass 8 16 --n 16
    python benchmarks/profile_pass.py --model llava_rad --studies_per_pass 2 --n 8
    python benchmarks/profile_pass.py --model medgemma --studies_per_pass 8 --n 16 --compile
    python benchmarks/profile_pass.py --model medgemma --studies_per_pass 8 --find_syncs --torch_threads 16

It prints, per pass: wall time; the time of each phase with the GPU synchronised around it
(host preparation, vision tower, decoder, the rest); then, without those synchronisations,
the GPU's busy time (sum of kernel times) against the wall time, the kernel launches and
host synchronisations per pass, and the top kernels and host ops. --find_syncs first lists
where one pass's device half makes the host wait on the GPU (torch.cuda.set_sync_debug_mode).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_speed import DEVICE, PARAPHRASES, build, images, sync, time_pass  # noqa: E402

from medvlm.core.config import MedicalAttentionConfig  # noqa: E402


def phase_modules(backend) -> dict:
    """{phase: module} whose forward is timed (one decoder forward per pass)."""
    if backend.name == "medgemma":
        return {"vision": backend.model.model.vision_tower, "decoder": backend.model.model.language_model}
    return {"vision": backend.vision, "decoder": backend.model.model}


def timed_phases(backend, items, k: int) -> dict:
    """Mean ms per pass of each phase, each synchronised (so the sum exceeds the overlapped wall)."""
    totals: dict[str, float] = defaultdict(float)
    originals = {}

    def wrap(name, module):
        fwd = module.forward

        def timed(*a, **kw):
            sync()
            t0 = time.perf_counter()
            out = fwd(*a, **kw)
            sync()
            totals[name] += time.perf_counter() - t0
            return out

        originals[name] = (module, fwd)
        module.forward = timed

    for name, module in phase_modules(backend).items():
        wrap(name, module)
    passes = 0
    try:
        for i in range(0, len(items), k):
            sync()
            t0 = time.perf_counter()
            prep = backend.prepare(items[i : i + k])
            t1 = time.perf_counter()
            backend.score_prepared(prep)
            sync()
            t2 = time.perf_counter()
            totals["prepare"] += t1 - t0
            totals["score_prepared"] += t2 - t1
            passes += 1
    finally:
        for module, fwd in originals.values():
            module.forward = fwd
    out = {name: 1e3 * v / passes for name, v in totals.items()}
    out["rest_of_score_prepared"] = out["score_prepared"] - out["vision"] - out["decoder"]
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llava_rad")
    p.add_argument("--studies_per_pass", type=int, nargs="+", default=[1])
    p.add_argument("--n", type=int, default=8, help="studies timed (a multiple of studies_per_pass)")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--compile", action="store_true", help="the opt-in compiled path (backend.compile())")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script, times nothing")
    p.add_argument("--no_siglip_fast_path", action="store_true",
                   help="MedGemma without medgemma_enhanced.siglip_fast_path (for an A/B on one machine)")
    p.add_argument("--torch_threads", type=int, nargs="*", default=[],
                   help="only time the pass three ways under each torch.set_num_threads value (host contention)")
    p.add_argument("--switch_intervals", type=float, nargs="*", default=[],
                   help="only time the pass three ways under each sys.setswitchinterval value (seconds)")
    p.add_argument("--find_syncs", action="store_true",
                   help="first list where one pass's device half synchronises with the host (CUDA only)")
    a = p.parse_args()
    if a.smoke:
        DEVICE.update(name="cpu", full_size=False)
    if a.no_siglip_fast_path:
        import contextlib

        import medgemma_enhanced

        medgemma_enhanced.siglip_fast_path = lambda vision_model: contextlib.nullcontext()
    backend, *_ = build(a.model, torch.bfloat16, MedicalAttentionConfig())
    if a.compile:
        probe = [(im, PARAPHRASES, None) for im in images(2, seed=5)]
        before = backend.score_many(probe)
        t0 = time.perf_counter()
        backend.compile()
        after = backend.score_many(probe)
        pairs = [(x, y) for b, c in zip(before, after, strict=True) for x, y in zip(b, c, strict=True)]
        dp = max(abs(x.p_yes - y.p_yes) for x, y in pairs)
        dr = max(float(abs(x.attention - y.attention).max()) for x, y in pairs)
        print(f"compiled in {time.perf_counter() - t0:.1f} s; vs eager: max |dP(yes)| {dp:.2g}, "
              f"max |d rows| {dr:.2g}")  # fmt: skip
    for k in a.studies_per_pass:
        if a.find_syncs and DEVICE["name"] == "cuda":
            find_syncs(backend, a, k)
        for n in a.torch_threads:
            torch.set_num_threads(n)
            print(f"torch threads {n}: ", end="")
            three_ways(backend, a, k)
        default_interval = sys.getswitchinterval()
        for v in a.switch_intervals:
            sys.setswitchinterval(v)
            print(f"switch interval {v * 1e3:g} ms: ", end="")
            try:
                three_ways(backend, a, k)
            finally:
                sys.setswitchinterval(default_interval)
        if not a.torch_threads and not a.switch_intervals:
            profile(backend, a, k)
    return 0


def find_syncs(backend, a, k: int) -> None:
    """Print each place where score_prepared (the device half of a pass) makes the host wait
    on the GPU, with counts; the reading-out of the results at the end is expected."""
    items = [(im, PARAPHRASES, None) for im in images(k, seed=7)]
    backend.score_many(items)  # one-time checks may sync
    prep = backend.prepare(items)
    sync()
    found: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
        found[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            backend.score_prepared(prep)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(f"{a.model} k={k}: {sum(found.values())} host syncs in one pass's device half:")
    for where, n in found.most_common():
        print(f"  {n:4d}  {where}")


def three_ways(backend, a, k: int) -> tuple[list, int]:
    """ms/study with each pass prepared in line, in a thread (as the runner does: each pass
    launched before the previous one is read; and, for comparison, each read before the next
    is launched), and beforehand (the device side alone, each pass read before the next).
    Returns the timed items and the passes."""
    imgs = images(a.n + k)
    items = [(im, PARAPHRASES, None) for im in imgs]
    t0 = time.perf_counter()
    for _ in range(3):
        backend.score_many(items[:k])  # warm-up (and compilation)
    sync()
    warm = time.perf_counter() - t0
    timed = items[k:]
    n_pass = len(timed) // k
    t0 = time.perf_counter()
    for i in range(0, len(timed), k):
        backend.score_many(timed[i : i + k])
    sync()
    wall = (time.perf_counter() - t0) * 1e3 / n_pass
    threaded = time_pass(backend, [im for im, _, _ in timed], k)[0] * 1e3 * k
    sequential = time_pass(backend, [im for im, _, _ in timed], k, overlap=False)[0] * 1e3 * k
    preps = [backend.prepare(timed[i : i + k]) for i in range(0, len(timed), k)]

    def device_alone(overlap: bool) -> float:
        """ms per pass of the prepared passes, each launched before the previous is read or not."""
        sync()
        t0, previous = time.perf_counter(), None
        for prep in preps:
            if not overlap:
                backend.score_prepared(prep)
                continue
            launched = backend.launch_prepared(prep)
            if previous is not None:
                previous.result()
            previous = launched
        if previous is not None:
            previous.result()
        sync()
        return (time.perf_counter() - t0) * 1e3 / n_pass

    device_side = device_alone(overlap=False)
    device_overlapped = device_alone(overlap=True)
    print(f"{a.model} k={k}: ms/study: prepared in line {wall / k:.1f}, in a thread {threaded / k:.1f} "
          f"(passes overlapped, as the runner does; read before the next launch: {sequential / k:.1f}), "
          f"beforehand (device side alone) {device_side / k:.1f}, overlapped {device_overlapped / k:.1f}  "
          f"(warm-up {warm:.1f} s)", flush=True)  # fmt: skip
    if torch.cuda.is_available():  # each pass's tower on its own stream (--overlap_tower)
        try:
            threaded_tower = time_pass(backend, [im for im, _, _ in timed], k, tower=True)[0] * 1e3 * k
            backend.overlap_tower()
            device_tower = device_alone(overlap=True)
            print(f"{a.model} k={k}: tower on its own stream: in a thread {threaded_tower / k:.1f}, beforehand "
                  f"{device_tower / k:.1f} ms/study", flush=True)  # fmt: skip
        except Exception as e:  # reported; the profile below still runs
            print(f"{a.model} k={k}: tower on its own stream FAILED: {type(e).__name__}: {e}"[:600], flush=True)
        finally:
            backend.overlap_tower(False)
    return timed, n_pass


def profile(backend, a, k: int) -> None:
    timed, n_pass = three_ways(backend, a, k)
    phases = timed_phases(backend, timed, k)
    print(f"{a.model} k={k}: synchronised phases ms/pass:")
    for name, v in phases.items():
        print(f"  {name:24s} {v:8.1f}")
    # kernel profile of the score_prepared halves only (preparation done beforehand)
    preps = [backend.prepare(timed[i : i + k]) for i in range(0, len(timed), k)]
    sync()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if DEVICE["name"] == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        for prep in preps:
            backend.score_prepared(prep)
        sync()
    prof_wall = (time.perf_counter() - t0) * 1e3 / n_pass
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # not the ops that launch them
    gpu = sum(e.self_device_time_total for e in kernels) / 1e3 / n_pass
    by_name = {e.key: e for e in events}

    def count(name):
        e = by_name.get(name)
        return e.count / n_pass if e else 0

    launches = count("cudaLaunchKernel") + count("cuLaunchKernel") + count("cuLaunchKernelEx")
    print(f"under the profiler: wall {prof_wall:.1f} ms/pass, GPU kernels busy {gpu:.1f} ms/pass "
          f"({100 * gpu / prof_wall:.0f}%), {launches:.0f} launches/pass, "
          f"{count('cudaStreamSynchronize') + count('cudaDeviceSynchronize'):.0f} syncs/pass, "
          f"{count('cudaMemcpyAsync'):.0f} memcpys/pass")  # fmt: skip
    print(events.table(sort_by="self_cuda_time_total", row_limit=a.rows, max_name_column_width=70))
    print(events.table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=70))


if __name__ == "__main__":
    sys.exit(main())
