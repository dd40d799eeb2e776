"""Studies per second on one GPU and on two (the CLI under `accelerate launch`), with identical
results, using full-size random-weight models (timing only).

    python benchmarks/bench_multi_gpu.py --n_studies 64 --out benchmarks/results

Runs the real CLI twice on a synthetic CSV (N studies x 1 finding x 6 paraphrases): once as
one process, once as `accelerate launch --multi_gpu --num_processes 2`. Throughput counts the
scoring phase only (the slowest rank's seconds; model loading excluded). Writes
<out>/<date>-<kind>-multi-gpu.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_speed import PARAPHRASES  # noqa: E402


def make_csv(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(n):
        w, h = [(1024, 1024), (1200, 1000), (900, 1100)][s % 3]
        im = Image.fromarray(rng.integers(0, 255, (h // 8, w // 8), dtype=np.uint8)).resize((w, h))
        im.save(folder / "img" / f"s{s}.png")
        for v, q in enumerate(PARAPHRASES):
            rows.append({"study_id": f"s{s}", "image_path": f"img/s{s}.png", "finding": "effusion",
                         "variant_id": v, "question": q, "answer_gt": "yes" if s % 2 else "no"})  # fmt: skip
    path = folder / "bench.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def scoring_seconds(out: Path) -> dict[str, float]:
    """Per model: the slowest rank's scoring seconds."""
    secs: dict[str, float] = {}
    for m in [out / "manifest.json", *sorted(out.glob("manifest.shard-*.json"))]:
        for model, c in json.loads(m.read_text()).get("counts", {}).items():
            secs[model] = max(secs.get(model, 0.0), c["seconds"])
    return secs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n_studies", type=int, default=64)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--models", nargs="+", default=["medgemma", "llava_rad"])
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_multi_gpu"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--kind", default="nvidia-h200-x2")
    a = p.parse_args(argv)
    csv = make_csv(a.work, a.n_studies)
    common = ["--csv", str(csv), "--random_full_size_models", "--models", *a.models, "--n_boot", "200",
              "--n_figure_studies", "0"]  # fmt: skip
    one, many = a.work / "one", a.work / "many"
    for d in (one, many):
        if d.exists():
            raise SystemExit(f"{d} exists: give a fresh --work folder")
    run([sys.executable, "run_medical_vlm_analysis.py", *common, "--output_dir", str(one)])
    launcher = [shutil.which("accelerate"), "launch"] if shutil.which("accelerate") else \
        [sys.executable, "-m", "accelerate.commands.launch"]
    run([*launcher, "--multi_gpu", "--num_processes", str(a.gpus),
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "run_medical_vlm_analysis.py", *common, "--output_dir", str(many)])  # fmt: skip
    r1 = pd.read_json(one / "results.jsonl", lines=True)
    frames = [pd.read_json(f, lines=True) for f in sorted(many.glob("results*.jsonl"))]
    r2 = pd.concat(frames, ignore_index=True)
    key = ["model", "study_id", "finding", "variant_id"]
    merged = r1.merge(r2, on=key, suffixes=("_1", "_2"))
    s1, s2 = scoring_seconds(one), scoring_seconds(many)
    result = {
        "date": dt.date.today().isoformat(),
        "device_kind": a.kind,
        "gpus": a.gpus,
        "n_studies": a.n_studies,
        "weights": "random, full-size shapes of the real configs, bf16",
        "rows_one": len(r1),
        "rows_many": len(r2),
        "rows_matched": len(merged),
        "max_abs_diff_p_yes": float((merged["p_yes_1"] - merged["p_yes_2"]).abs().max()),
        "answers_identical": bool((merged["answer_1"] == merged["answer_2"]).all()),
    }
    for m in a.models:
        result[m] = {
            "one_gpu_studies_per_s": a.n_studies / s1[m],
            "many_gpu_studies_per_s": a.n_studies / s2[m],
            "speedup": s1[m] / s2[m],
        }
    print(json.dumps(result, indent=2))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{result['date']}-{a.kind}-multi-gpu.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
