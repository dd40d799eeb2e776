"""Where one backend pass spends its time: torch.profiler over a few studies (GPU).

    python benchmarks/profile_pass.py --model llava_rad --studies_per_pass 1 --n 4
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

from bench_speed import PARAPHRASES, build, images  # noqa: E402

from medvlm.config import MedicalAttentionConfig  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llava_rad")
    p.add_argument("--studies_per_pass", type=int, default=1)
    p.add_argument("--n", type=int, default=4)
    a = p.parse_args()
    backend, *_ = build(a.model, torch.bfloat16, MedicalAttentionConfig())
    imgs = images(a.n + a.studies_per_pass)
    items = [(im, PARAPHRASES, None) for im in imgs]
    backend.score_many(items[: a.studies_per_pass])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(a.studies_per_pass, len(items), a.studies_per_pass):
            backend.score_many(items[i : i + a.studies_per_pass])
        torch.cuda.synchronize()
    print(f"{(time.perf_counter() - t0) / a.n * 1e3:.1f} ms/study under the profiler")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=50))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=50))
    return 0


if __name__ == "__main__":
    sys.exit(main())
