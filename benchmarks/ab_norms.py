"""A/B on one machine: the decoders' RMS norms reading bf16 as it is (fused_norms' cast-free
path, the default) against the float32 copy and cast back (the path before 2026-12-08).

    python benchmarks/ab_norms.py --models medgemma llava_rad --rounds 2
    python benchmarks/ab_norms.py --smoke      # tiny models on the CPU: checks the script

Each round times both variants in turn in one process (same weights, same images): ms per study
with the next pass prepared in a thread as the runner does, and with every pass prepared
beforehand (the device side alone).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_speed import DEVICE, PARAPHRASES, build, images, sync, time_pass  # noqa: E402

import medvlm.core.fused_norms as fused_norms  # noqa: E402
from medvlm.core.config import MedicalAttentionConfig  # noqa: E402

VARIANTS = {"cast-free": fused_norms._cast_free, "float32 copy": lambda x: False}


def device_side(backend, imgs, k: int) -> float:
    """Seconds per study of score_prepared alone, every pass prepared beforehand."""
    items = [(im, PARAPHRASES, None) for im in imgs]
    prepared = [backend.prepare(items[i : i + k]) for i in range(0, len(items), k)]
    backend.score_prepared(prepared[0])
    sync()
    t0 = time.perf_counter()
    for p in prepared:
        backend.score_prepared(p)
    sync()
    return (time.perf_counter() - t0) / len(items)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["medgemma", "llava_rad"])
    p.add_argument("--n_studies", type=int, default=48)
    p.add_argument("--per_pass", type=int, nargs="+", default=None, help="per model; default medgemma 8, llava_rad 4")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    if a.smoke:
        DEVICE.update(name="cpu", full_size=False)
        a.n_studies, a.rounds = 4, 1
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(0) if DEVICE['name'] == 'cuda' else 'cpu'}")
    attention = MedicalAttentionConfig(attention_head_mode="mean", layers="all", query_mode="answer")
    for i, name in enumerate(a.models):
        k = a.per_pass[i] if a.per_pass else {"medgemma": 8, "llava_rad": 4}[name]
        k = min(k, a.n_studies)
        backend, _ = build(name, torch.bfloat16, attention)
        imgs = images(a.n_studies)
        for r in range(a.rounds):
            for label, fn in VARIANTS.items():
                fused_norms._cast_free = fn
                try:
                    threaded, _ = time_pass(backend, imgs, k)
                    alone = device_side(backend, imgs, k)
                finally:
                    fused_norms._cast_free = VARIANTS["cast-free"]
                print(f"[round {r + 1}] {name} k={k} norms {label:12s}: {threaded * 1e3:6.2f} ms/study "
                      f"(next pass in a thread), {alone * 1e3:6.2f} device side alone", flush=True)  # fmt: skip
        backend.unload()
    return 0


if __name__ == "__main__":
    sys.exit(main())
