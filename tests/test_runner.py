"""The CLI end to end on tiny random models: resume after a kill, strict refusal, analyze_only."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import run_medical_vlm_analysis as cli

ROOT = Path(__file__).resolve().parents[1]
PHRASES = [
    "Is there a pleural effusion?",
    "Is pleural effusion present?",
    "Do you see a pleural effusion?",
    "Is a pleural effusion visible?",
    "Does the chest show a pleural effusion?",
    "Is there effusion?",
]


def write_csv(folder: Path, n_studies: int, bad_rows: bool = False) -> Path:
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(n_studies):
        w, h = (64, 48) if s % 2 else (48, 64)
        Image.fromarray((rng.random((h, w)) * 255).astype("uint8")).save(folder / "img" / f"s{s}.png")
        for v, q in enumerate(PHRASES):
            rows.append({"study_id": f"s{s}", "image_path": f"img/s{s}.png", "finding": "effusion",
                         "variant_id": v, "question": q, "answer_gt": "yes" if s % 3 else "no"})  # fmt: skip
    if bad_rows:
        rows.append({**rows[0], "variant_id": 7})
        rows.append({**rows[1], "answer_gt": "maybe"})
    path = folder / "q.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def args(csv, out, *extra):
    return ["--csv", str(csv), "--output_dir", str(out), "--models", "medgemma", "--tiny_random_models",
            "--n_boot", "200", "--n_figure_studies", "1", *extra]  # fmt: skip


def test_resume_after_kill_loses_and_duplicates_nothing(tmp_path):
    csv = write_csv(tmp_path, 24)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_medical_vlm_analysis.py"), *args(csv, out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    results = out / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 6:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = results.read_text().count("\n")
    assert 6 <= n_before < 24 * 6
    assert cli.main(args(csv, out)) == 0
    keys = [(r["model"], r["study_id"], r["finding"], r["variant_id"])
            for r in map(json.loads, results.read_text().splitlines())]  # fmt: skip
    assert len(keys) == 24 * 6, f"expected {24 * 6} records, found {len(keys)}"
    assert max(Counter(keys).values()) == 1, "a record was duplicated"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["medgemma"]["skipped_done"] == n_before
    assert manifest["random_weights"] is True


def test_bad_rows_are_counted_and_strict_refuses_before_loading(tmp_path, monkeypatch):
    csv = write_csv(tmp_path, 3, bad_rows=True)
    out = tmp_path / "out"
    loaded = []
    real = cli.BACKENDS["medgemma"]
    monkeypatch.setitem(cli.BACKENDS, "medgemma", lambda *a: loaded.append(1) or real(*a))
    assert cli.main(args(csv, out, "--strict")) == 2
    assert not loaded, "a model was loaded before the CSV was refused"
    assert cli.main(args(csv, out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bad_rows"]["count"] == 2
    assert sorted(r["line"] for r in manifest["bad_rows"]["rows"]) == [20, 21]
    summary = pd.read_csv(out / "summary.csv")
    acc = summary[(summary.model == "medgemma") & (summary.metric == "accuracy")].iloc[0]
    res = pd.read_json(out / "results.jsonl", lines=True)
    assert len(res) == 18 and acc["estimate"] == pytest.approx(res["correct"].mean())
    report = (out / "report.md").read_text()
    assert "RANDOM WEIGHTS" in report and "Bad CSV rows skipped: **2**" in report

    # analyze_only reproduces the tables from the stored results alone
    before = {n: (out / n).read_text() for n in ("summary.csv", "per_finding.csv", "per_study.csv")}
    for n in before:
        (out / n).unlink()
    assert cli.main(["--output_dir", str(out), "--analyze_only", "--n_boot", "200"]) == 0
    for n, text in before.items():
        assert (out / n).read_text() == text, f"{n} differs after --analyze_only"


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid: llava_rad, medgemma"):
        cli.get_backend_loader("llava")


def test_demo_end_to_end_with_both_models(tmp_path):
    """--demo: tiny random models of both architectures on pydicom-data DICOMs; every output
    says the weights are random."""
    out = tmp_path / "demo"
    assert cli.main(["--demo", "--output_dir", str(out), "--n_studies", "2", "--n_boot", "200"]) == 0
    res = pd.read_json(out / "results.jsonl", lines=True)
    assert set(res.model) == {"llava_rad", "medgemma"} and (res.status == "ok").all()
    assert res.random_weights.all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["random_weights"] is True and "RANDOM WEIGHTS" in manifest["note"]
    assert all(m["random_weights"] for m in manifest["models"].values())
    summary = pd.read_csv(out / "summary.csv")
    assert {"llava_rad", "medgemma", "llava_rad - medgemma"} <= set(summary.model)
    assert "RANDOM WEIGHTS" in (out / "report.md").read_text()
    figs = list((out / "figures").glob("*.png"))
    assert any(f.name.endswith("__models.png") for f in figs) and any("forest" in f.name for f in figs)
    controls = pd.read_csv(out / "controls.csv")
    assert {"abs_delta_p_text_only", "abs_delta_p_blank"} <= set(controls.metric) and controls.random_weights.all()
    assert (res.p_yes_text_only.notna() & res.p_yes_blank.notna()).all(), "every row answered under both controls"
    assert (out / "sinks.csv").exists() and "positions" in manifest["sinks"]
    assert "## Image reliance" in (out / "report.md").read_text()
    labels = json.loads((out / "demo_data" / "demo_labels.json").read_text())
    assert labels, "the demo's ground truth comes from the DICOM headers and is recorded"


def test_control_prompts_are_scored_once_per_run(tmp_path):
    """Four studies ask the same six paraphrases: each control prompt is computed once (12 =
    6 x 2 controls), the other studies read it, and the manifest says so."""
    csv = write_csv(tmp_path, 4)
    out = tmp_path / "out"
    assert cli.main(args(csv, out, "--controls", "text_only,blank", "--batch_size", "6")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["medgemma"]["control_prompts"] == {"computed": 12, "reused": 36}
    records = pd.read_json(out / "results.jsonl", lines=True)
    for control in ("p_yes_text_only", "p_yes_blank"):
        per_variant = records.groupby("variant_id")[control].nunique()
        assert (per_variant == 1).all(), f"{control}: one value per question across studies"
        assert records.groupby("variant_id")[control].first().nunique() > 1


def test_versions_are_read_without_importing_the_packages():
    """The manifest's package versions come from the installed metadata: recording peft's does not
    import it (it pulls in bitsandbytes, seconds of every run)."""
    code = ("import sys, json; from medvlm.core.runner import _versions; v = _versions(); "
            "print(json.dumps({'peft_imported': 'peft' in sys.modules, 'v': v}))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["peft_imported"] is False
    from importlib.metadata import version

    assert got["v"]["peft"] == version("peft") and got["v"]["torch"] == version("torch")
