"""Experiment for issue #16: each pass's vision tower (and projector) for k images run as one
CUDA graph, captured once for that k and replayed, against the eager tower. A pass of k images
always has the same shapes (k x 4,096 patches for MedGemma, k x 1,370 for LLaVA-Rad), so the
tower can be replayed even though the decoder (whose length varies with the questions) cannot.
A replay launches every kernel of the tower at once: what it saves is host time, the time the
host spends launching the tower's ~700 kernels, which the next pass's preparation in a thread
competes for.

    python benchmarks/bench_vision_graph.py --models medgemma llava_rad --k 8 --n 32

Per model: the features' max |difference| graph vs eager (the same kernels: 0 expected), the
pass's ms/study three ways (profile_pass.three_ways: prepared in line, in a thread as the
runner does, beforehand = the device side alone) without and with the graph, and peak memory
(allocated and reserved) over the weights. Writes <out>/<date>-<kind>-vision-graph.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_speed import backend_parameters, build, device_kind, sync  # noqa: E402
from profile_pass import three_ways  # noqa: E402

from medvlm.core.config import MedicalAttentionConfig  # noqa: E402


def graphed(fn, example: torch.Tensor):
    """fn(x) replayed from a CUDA graph captured on a copy of example ([k, 3, S, S] on the
    device); inputs of another shape or dtype run fn eagerly. The output tensor is the graph's
    own (overwritten by the next replay): the pass copies it into its embeddings at once."""
    static_in = example.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            fn(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = fn(static_in)

    def run(x):
        if x.shape != static_in.shape or x.dtype != static_in.dtype or x.device != static_in.device:
            return fn(x)
        static_in.copy_(x, non_blocking=True)
        graph.replay()
        return static_out

    return run


def install(backend, k: int):
    """Replace the backend's tower call by the graphed one for passes of k images; returns a
    function that computes the tower eagerly (for the exactness check)."""
    if backend.name == "medgemma":
        from medgemma_enhanced import siglip_fast_path

        eager = backend.image_features

        def tower(px):
            with siglip_fast_path(backend._vision_model):
                return eager(px)

        size = backend.model.config.vision_config.image_size
        example = torch.randn(k, 3, size, size, device="cuda", dtype=next(backend.model.parameters()).dtype)
        backend.image_features = graphed(tower, example)
        return tower, example
    dev, dt_ = backend.device, backend.dtype

    def tower(x):
        return backend.projector(backend.vision(x))

    example = torch.randn(k, 3, backend.image_size, backend.image_size, device=dev, dtype=dt_)
    run = graphed(tower, example)

    def image_embeddings(pixel_values):
        return run(pixel_values.to(device=dev, dtype=dt_, non_blocking=True))

    backend.image_embeddings = image_embeddings
    return tower, example


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["medgemma", "llava_rad"])
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--kind", default=None, help="names the results file; default: bench_speed.device_kind()")
    p.add_argument("--torch_threads", type=int, nargs="*", default=[],
                   help="also time the graphed pass under each torch.set_num_threads value (the preparation's "
                        "CPU work in a thread competes with the pass's launches)")  # fmt: skip
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    a.kind = a.kind or device_kind()
    result = {"date": dt.date.today().isoformat(), "device_kind": a.kind, "gpu": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "k": a.k, "n": a.n}  # fmt: skip
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"{result['date']}-{a.kind}-vision-graph.json"
    for name in a.models:
        backend, *_ = build(name, torch.bfloat16, MedicalAttentionConfig())
        weights = sum(q.numel() * q.element_size() for q in backend_parameters(backend)) / 2**30
        r = {"weights_gib": weights}
        args = SimpleNamespace(n=a.n, model=name)
        torch.cuda.reset_peak_memory_stats()
        print(f"{name}: eager tower", flush=True)
        three_ways(backend, args, a.k)
        sync()
        r["eager_peak_over_weights"] = torch.cuda.max_memory_allocated() / 2**30 / weights
        r["eager_reserved_over_weights"] = torch.cuda.memory_reserved() / 2**30 / weights
        try:
            t0 = time.perf_counter()
            tower, example = install(backend, a.k)
            sync()
            r["capture_s"] = time.perf_counter() - t0
            x = torch.randn_like(example)
            with torch.no_grad():
                want = tower(x).clone()
                got = (backend.image_features(x) if name == "medgemma" else backend.image_embeddings(x)).clone()
            r["max_abs_diff_graph_vs_eager"] = float((got.float() - want.float()).abs().max())
            torch.cuda.reset_peak_memory_stats()
            print(f"{name}: graphed tower (max |diff| vs eager {r['max_abs_diff_graph_vs_eager']:.3g})", flush=True)
            three_ways(backend, args, a.k)
            sync()
            r["graph_peak_over_weights"] = torch.cuda.max_memory_allocated() / 2**30 / weights
            r["graph_reserved_over_weights"] = torch.cuda.memory_reserved() / 2**30 / weights
            default_threads = torch.get_num_threads()
            for n in a.torch_threads:
                torch.set_num_threads(n)
                print(f"{name}: graphed tower, torch threads {n}: ", end="", flush=True)
                three_ways(backend, args, a.k)
            torch.set_num_threads(default_threads)
        except Exception as e:  # recorded: the experiment's answer may be that it cannot be captured
            r["error"] = f"{type(e).__name__}: {e}"[:2000]
            print(f"{name}: {r['error']}", flush=True)
        print(f"{name}: {r}", flush=True)
        result[name] = r
        path.write_text(json.dumps(result, indent=2))
        backend.unload()
        del backend
        torch.cuda.empty_cache()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
