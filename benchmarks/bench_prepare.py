"""The host half of a MedGemma pass (backend.prepare): its time, and how much it slows a thread
that launches GPU work meanwhile (issue #16: the runner prepares the next pass in a thread while
the main thread launches the current one's ~2,600 kernels; what the preparing thread runs while
holding the interpreter lock, the launching thread waits for).

    python benchmarks/bench_prepare.py                 # CPU (or a GPU machine's host), 896 px processor
    python benchmarks/bench_prepare.py --smoke         # tiny processor, few passes: checks the script
    python benchmarks/bench_prepare.py --gpu_passes 32 # GPU: also the full pass three ways, both pixel paths

The backend is MedGemmaMedical over the real MedGemma-4B shapes (medvlm.core.tiny_medgemma
MEDGEMMA_4B_SHAPES: SigLIP at 896 px, the image processor at 896 px, 256 image tokens) with one
vision layer: prepare() reads only the processor and the config's facts. On a
GPU machine it is built on the GPU (so the pixels are pinned and the device-normalisation check
runs on the GPU, as in a real run); elsewhere on the meta device, with the two pixel-path
decisions that a GPU would make taken on the CPU (normalizes_on_device, resizes_like_processor).
Each pass is 8 studies x the six PARAPHRASES on bench_speed's ~1024 px images.

Printed, for the pixel path in use ("direct": resized_pixels, one call per pass) and the
earlier one ("processor": one processor call per image, in threads), in ms per pass:
  prepare     the first pass (prompt caches cold, each question checked against the processor)
              and the steady state (an already-seen pass: the caches warm), median
  pixels      pixel_values alone
  loop lost   a launch loop (small torch ops on the device, each releasing the interpreter lock
              as a kernel launch does) run in the main thread while prepare runs in another, as
              the runner does: the loop's lost time = the time it would have taken alone to do
              what it did, subtracted from the wall time of the pass
Timing lives here, never in tests.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_speed import PARAPHRASES, images  # noqa: E402

from medvlm.core.config import MedicalAttentionConfig  # noqa: E402


def build(smoke: bool, device: str):
    """A MedGemmaMedical whose prepare() runs as the real 4B model's does on `device`."""
    import medgemma_enhanced as mg
    from medvlm.core.tiny_medgemma import MEDGEMMA_4B_SHAPES, TINY_SHAPES, tiny_medgemma

    base = TINY_SHAPES if smoke else MEDGEMMA_4B_SHAPES
    shapes = {"text": base["text"], "vision": {**base["vision"], "num_hidden_layers": 1}}
    target = device if device == "cuda" else "meta"
    model, processor = tiny_medgemma(shapes=shapes, sliding_window=1024, device=target, dtype=torch.bfloat16)
    backend = mg.MedGemmaMedical(model, processor, MedicalAttentionConfig(),
                                 model_id="tiny-random-medgemma" if smoke else "random-medgemma-4b-shapes")
    if target == "meta":  # the decisions a GPU makes (both checked bit for bit), taken on the CPU
        ip = processor.image_processor
        backend._normalize_on_device = mg.normalizes_on_device(ip, "cpu")
        backend._direct_resize = backend._normalize_on_device and mg.resizes_like_processor(ip)
    return backend


def launch_rate(device: str, seconds: float = 0.3) -> float:
    """Small torch ops per second of the launch loop alone."""
    x = torch.zeros(16, device=device)
    for _ in range(200):
        x.add_(1)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x.add_(1)
        n += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def loop_lost(backend, items, device: str, rate: float) -> float:
    """ms the launch loop (main thread) loses while prepare(items) runs in another thread."""
    done = threading.Event()
    worker = threading.Thread(target=lambda: (backend.prepare(items), done.set()))
    x = torch.zeros(16, device=device)
    n, t0 = 0, time.perf_counter()
    worker.start()
    while not done.is_set():
        x.add_(1)
        n += 1
    wall = time.perf_counter() - t0
    worker.join()
    if device == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (wall - n / rate)


def timed(fn, reps: int) -> list[float]:
    out = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn(i)
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def bench_cpu(backend, a, device: str) -> dict:
    k = a.studies_per_pass
    imgs = images(k * a.passes, seed=1)
    passes = [[(im, PARAPHRASES, None) for im in imgs[i : i + k]] for i in range(0, len(imgs), k)]
    ref = backend.pixel_values([im for im, _, _ in passes[0]])
    direct = backend._direct_resize
    results = {}
    for path in (["direct", "processor"] if direct else ["processor"]):
        backend._direct_resize = path == "direct"
        backend._prompt_cache.clear()
        t0 = time.perf_counter()
        backend.prepare(passes[0])  # cold: every question tokenised and checked
        first = 1e3 * (time.perf_counter() - t0)
        px = backend.pixel_values([im for im, _, _ in passes[0]])
        assert torch.equal(px, ref), f"{path}: pixels differ"
        steady = timed(lambda i: backend.prepare(passes[i % len(passes)]), a.reps)
        pixels = timed(lambda i: backend.pixel_values([im for im, _, _ in passes[i % len(passes)]]), a.reps)
        rate = launch_rate(device)
        lost = [loop_lost(backend, passes[i % len(passes)], device, rate) for i in range(a.reps)]
        results[path] = {"first_ms": first, "prepare_ms": statistics.median(steady),
                         "pixels_ms": statistics.median(pixels), "loop_lost_ms": statistics.median(lost)}  # fmt: skip
        r = results[path]
        print(f"{path:9s} prepare: first pass {r['first_ms']:7.1f}, steady {r['prepare_ms']:6.1f} ms/pass "
              f"(pixels {r['pixels_ms']:6.1f}); launch loop lost {r['loop_lost_ms']:6.1f} ms/pass", flush=True)
    backend._direct_resize = direct
    return results


def bench_gpu(a) -> None:
    """The full pass three ways (profile_pass.three_ways: prepared in line, in a thread,
    beforehand) with each pixel path, alternately, on the full-size random-weight model."""
    from bench_speed import build as build_full
    from profile_pass import three_ways

    backend, _ = build_full("medgemma", torch.bfloat16, MedicalAttentionConfig())
    direct = backend._direct_resize
    print(f"direct pixel path available: {direct}")
    for rep in range(a.gpu_repeats):
        for path in (["direct", "processor"] if direct else ["processor"]):
            backend._direct_resize = path == "direct"
            print(f"[{path}, round {rep + 1}] ", end="")
            three_ways(backend, argparse.Namespace(model="medgemma", n=a.gpu_passes * a.studies_per_pass),
                       a.studies_per_pass)  # fmt: skip
    backend._direct_resize = direct


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies_per_pass", type=int, default=8)
    p.add_argument("--passes", type=int, default=4, help="distinct passes of images cycled through")
    p.add_argument("--reps", type=int, default=9, help="passes timed per measurement")
    p.add_argument("--torch_threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--gpu_passes", type=int, default=0,
                   help="on a GPU: also time the full pass three ways over this many passes, per pixel path")
    p.add_argument("--gpu_repeats", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny processor, 2 passes, 2 reps: checks the script")
    a = p.parse_args()
    if a.smoke:
        a.passes, a.reps, a.studies_per_pass, a.gpu_passes = 2, 2, 2, 0
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    backend = build(a.smoke, device)
    print(f"prepare of {a.studies_per_pass} studies x {len(PARAPHRASES)} questions, "
          f"{backend.facts.image_size} px, device {device}, torch threads {torch.get_num_threads()}")
    bench_cpu(backend, a, device)
    if a.gpu_passes and device == "cuda":
        del backend
        bench_gpu(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
