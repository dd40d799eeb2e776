"""The analysis phase's outputs: which figures are drawn (and which stale ones removed), phase
timings, the random-weights column of the tables, report.md (captions, clusters named, no
interval under 5 clusters, the glossary) and README's Glossary, which must match report.md's.

A small results store is written here directly (random maps, two models, three studies of
which two share a patient), so no model runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medvlm.analysis.analysis import BETWEEN_METRICS, METRICS, SUMMARY_COLUMNS
from medvlm.core.geometry import shortest_side_center_crop_geometry, square_resize_geometry
from medvlm.core.pipeline import RunConfig
from medvlm.core.runner import Manifest
from medvlm.core.store import ResultsStore, _safe_name, map_key
from medvlm.report import reporting
from medvlm.report.forest import count_of
from medvlm.report.report_md import (
    COLUMNS,
    GLOSSARY,
    METRIC_TERMS,
    glossary_markdown,
    render_report,
    summary_table,
)

ROOT = Path(__file__).resolve().parents[1]
FINDINGS = ("cardiomegaly", "effusion")
STUDIES = {"s1": "p1", "s2": "p1", "s3": "p2"}  # study -> patient
GEOMETRY = {"llava_rad": lambda w, h: shortest_side_center_crop_geometry(w, h, 518, (37, 37)),
            "medgemma": lambda w, h: square_resize_geometry(w, h, 896, (16, 16))}  # fmt: skip


def _write_store(out: Path, images: Path, seed: int = 0, skip: tuple = ()) -> None:
    rng = np.random.default_rng(seed)
    images.mkdir(parents=True, exist_ok=True)
    store = ResultsStore(out)
    for model, make_geo in GEOMETRY.items():
        for study, patient in STUDIES.items():
            path = images / f"{study}.png"
            if not path.exists():  # radiograph-like: smooth shapes and a little noise
                y, x = np.mgrid[0:200, 0:300] / 300
                noise = np.random.default_rng(len(study)).normal(0, 4, (200, 300))
                img = 120 + 60 * np.sin(7 * x + int(study[1:])) * np.cos(5 * y) + noise
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
            g = make_geo(300, 200)
            geo = {"image_size": list(g.image_size), "crop_box": list(g.crop_box), "grid": list(g.grid),
                   "input_size": g.input_size}  # fmt: skip
            records, maps = [], {}
            for f in FINDINGS:
                gt = "yes" if (study, f) in (("s1", "effusion"), ("s3", "cardiomegaly")) else "no"
                for v in range(6):
                    if (study, f, v) in skip:
                        continue
                    p = float(rng.random())
                    answer = "yes" if p >= 0.5 else "no"
                    records.append({"model": model, "study_id": study, "finding": f, "variant_id": v,
                                    "cluster_id": patient, "subject_id": patient, "question": f"Is there {f} ({v})?",
                                    "answer_gt": gt, "p_yes": p, "answer": answer, "correct": answer == gt,
                                    "status": "ok", "error": None, "image_path": str(path), "geometry": geo,
                                    "layers": [0, 1, 2], "random_weights": True})  # fmt: skip
                    maps[map_key(f, v)] = ([0, 1, 2], rng.random((3, g.n_tokens)))
            store.write_study(model, study, records, maps)


def _manifest(out: Path) -> Manifest:
    m = Manifest(out / "manifest.json")
    m.update(cluster_by="subject_id", timings_s={"load": {"llava_rad": 1.5}, "score": {"llava_rad": 2.5}},
             models={"llava_rad": {"head_mode": "mean", "query_mode": "question"},
                     "medgemma": {"head_mode": "none", "query_mode": "answer"}})  # fmt: skip
    return m


def _run(tmp_path, monkeypatch, workers: str, **cfg) -> Path:
    monkeypatch.setenv("MEDVLM_FIGURE_WORKERS", workers)
    out = tmp_path / f"out{workers}"
    _write_store(out, tmp_path / "images")
    config = RunConfig(output_dir=out, analyze_only=True, n_boot=200, cluster_by="subject_id", **cfg)
    assert reporting.analyze(config, _manifest(out)) == 0
    return out


def test_analyze_draws_the_chosen_figures_times_phases_and_removes_stale_ones(tmp_path, monkeypatch, capsys):
    figs = tmp_path / "out1" / "figures"
    figs.mkdir(parents=True)
    stale = figs / f"{_safe_name('s2')}__effusion__models.png"  # drawn by an earlier run, not by this one
    mine = [figs / "notes.png", figs / "forest_models_v2.png", figs / f"{stale.name}.txt"]  # not the tool's
    for p in [stale, *mine]:
        p.write_bytes(b"x")
    out = _run(tmp_path, monkeypatch, "1", figure_studies=("s2", "nope"), figure_findings=("effusion", "ghost"))
    err = capsys.readouterr().err
    assert "--figure_studies: no answered rows for nope" in err and "--figure_findings: no rows for ghost" in err
    assert "figures: 5 written" in err

    s2 = _safe_name("s2")
    expected = {"forest_models.png", "forest_differences.png", f"{s2}__effusion__llava_rad_paraphrases.png",
                f"{s2}__effusion__medgemma_paraphrases.png", f"{s2}__effusion__models.png"}  # fmt: skip
    assert {p.name for p in figs.glob("*.png")} == expected | {"notes.png", "forest_models_v2.png"}
    assert all(p.exists() for p in mine) and stale.read_bytes() != b"x"  # redrawn, not kept
    for name in expected:
        assert (figs / name).stat().st_size < 400_000

    manifest = json.loads((out / "manifest.json").read_text())
    t = manifest["timings_s"]
    assert t["load"] == {"llava_rad": 1.5} and t["score"] == {"llava_rad": 2.5}  # the scoring phase's, kept
    assert t["analyse"] > 0 and t["figures"] > 0
    assert sorted(manifest["figures"]) == sorted(f"figures/{n}" for n in expected)
    assert len(manifest["analysis"]["figure_warnings"]) == 2

    for name in ("summary", "per_finding", "per_study"):
        table = pd.read_csv(out / f"{name}.csv")
        assert table.columns[0] == "random_weights" and table["random_weights"].all(), name

    report = (out / "report.md").read_text()
    assert "RANDOM WEIGHTS" in report and "clusters: patients (`subject_id`)" in report
    assert "| patients |" in report and "no interval (2 patients)" in report  # 2 patients: no interval
    summary = report.split("## Summary", 1)[1].split("\n## ", 1)[0]
    assert summary.count("fewer than 25") == 1  # the summary table's note, once
    captions = re.findall(r"^\*Figure (\d+)\. (.*)\*$", report, flags=re.M)
    assert [int(n) for n, _ in captions] == list(range(1, 6))
    grids = [c for _, c in captions if "six wordings" in c]
    assert len(grids) == 2 and all("Study s2, finding effusion" in c and "ground truth no" in c for c in grids)
    assert any("layers 0\u20132 (3 layers)" in c and "query: the question's tokens" in c for c in grids)
    assert any("heads: mean of the stored per-head maps" in c and "query: the answering token" in c for c in grids)
    assert "## Glossary" in report and glossary_markdown() in report
    assert "load llava_rad 1.5 s" in report and "figures" in report.split("- Time:")[1].split("\n")[0]


def test_figures_drawn_in_worker_processes_are_the_same(tmp_path, monkeypatch):
    kw = dict(figure_studies=("s1",), figure_findings=("effusion",))
    one = _run(tmp_path, monkeypatch, "1", **kw)
    two = _run(tmp_path, monkeypatch, "2", **kw)
    names = sorted(p.name for p in (one / "figures").glob("*.png"))
    assert len(names) == 5 and names == sorted(p.name for p in (two / "figures").glob("*.png"))
    for n in names:
        with Image.open(one / "figures" / n) as a, Image.open(two / "figures" / n) as b:
            assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))), n


def test_figures_of_a_finding_asked_without_its_original_wording(tmp_path, monkeypatch):
    """A CSV row of variant 0 that was bad (blank answer_gt) leaves the group without it: its
    figures are the paraphrase grids, the analysis does not fail."""
    monkeypatch.setenv("MEDVLM_FIGURE_WORKERS", "1")
    out = tmp_path / "out"
    _write_store(out, tmp_path / "images", skip=(("s1", "effusion", 0),))
    config = RunConfig(output_dir=out, analyze_only=True, n_boot=200, cluster_by="subject_id",
                       figure_studies=("s1",), figure_findings=("effusion",))  # fmt: skip
    assert reporting.analyze(config, _manifest(out)) == 0
    names = {p.name for p in (out / "figures").glob("*.png")}
    assert f"{_safe_name('s1')}__effusion__medgemma_paraphrases.png" in names
    assert f"{_safe_name('s1')}__effusion__models.png" not in names


def test_a_run_whose_every_row_failed_says_why_and_writes_no_tables(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    ResultsStore(out).append([{"model": "medgemma", "study_id": f"s{i}", "finding": "effusion", "variant_id": v,
                               "question": "Is there?", "answer_gt": "yes", "status": "failed",
                               "error": "ValueError: finding 'effusion' does not occur in question 'Is there?'"}
                              for i in range(2) for v in range(6)])  # fmt: skip
    config = RunConfig(output_dir=out, analyze_only=True, n_boot=50)
    assert reporting.analyze(config, _manifest(out)) == 1
    err = capsys.readouterr().err
    assert f"error: no answered rows in {out}: all 12 failed (12 x ValueError: finding 'effusion'" in err
    assert not (out / "summary.csv").exists()


def test_default_figures_are_the_first_studies_with_all_findings(tmp_path, monkeypatch):
    out = _run(tmp_path, monkeypatch, "1", n_figure_studies=1)
    names = {p.name for p in (out / "figures").glob("*.png")}
    s1 = _safe_name("s1")
    assert {n for n in names if n.endswith("_paraphrases.png")} == {
        f"{s1}__{f}__{m}_paraphrases.png" for f in FINDINGS for m in GEOMETRY}
    assert not any(n.startswith(_safe_name("s2")) for n in names)


# ----------------------------------------------------------------------------- stale figures, provenance


def test_remove_stale_figures_touches_only_the_tools_pngs(tmp_path):
    folder = tmp_path / "figures"
    folder.mkdir()
    s = _safe_name("study 1")
    tool = [f"{s}__effusion__llava_rad_paraphrases.png", f"{s}__effusion__models.png", "forest_models.png",
            "forest_differences.png"]  # fmt: skip
    other = ["effusion__models.png", "study__effusion__models.png", "forest_models.png.bak", "forest-2.png",
             f"{s}__effusion__models.jpg", "my_forest_models.png", "forest_plot.png"]  # fmt: skip
    for n in tool + other:
        (folder / n).write_bytes(b"x")
    (folder / "sub").mkdir()
    keep = [folder / tool[0]]
    removed = reporting.remove_stale_figures(folder, keep)
    assert sorted(p.name for p in removed) == sorted(tool[1:])
    assert sorted(p.name for p in folder.iterdir()) == sorted([tool[0], *other, "sub"])
    assert reporting.remove_stale_figures(tmp_path / "absent", []) == []


def test_provenance_text_names_layers_heads_and_query():
    rows = pd.DataFrame({"layers": [[0, 1, 2, 5, 7, 8]] * 3})
    text = reporting.provenance_text("m", rows, {"models": {"m": {"head_mode": "max", "query_mode": "finding"}}})
    assert text == ("attention: mean over layers 0\u20132, 5, 7\u20138 (6 layers) \u00b7 heads: max over heads "
                    "(at capture) \u00b7 query: the finding phrase's tokens (their rows averaged)")
    # the run's config when the model's description lacks them
    text = reporting.provenance_text("m", rows, {"config": {"attention": {"attention_head_mode": "entropy",
                                                                          "query_mode": "answer"}}})  # fmt: skip
    assert "entropy-weighted" in text and "the answering token" in text
    assert "not recorded" in reporting.provenance_text("m", pd.DataFrame({"x": [1]}), {})


# ----------------------------------------------------------------------------- report.md


def _summary(n_clusters: int, methods=("bca", "exact_one_sided_clusters")) -> pd.DataFrame:
    return pd.DataFrame({
        "model": ["a", "a"], "metric": ["accuracy", "flip_rate"], "estimate": [0.61234, 0.0],
        "ci_low": [0.5, 0.0], "ci_high": [0.7, 0.3], "ci_method": list(methods), "level": [0.95, 0.95],
        "n_clusters": [n_clusters, n_clusters], "n_rows": [60, 60], "n_units": [60, 50],
    })  # fmt: skip


def test_summary_table_names_the_cluster_unit_and_shows_intervals_only_with_enough_clusters():
    few = "\n".join(summary_table(_summary(3), "patients"))
    assert "| model | metric | estimate | 95% CI | patients | units |" in few
    assert few.count("no interval (3 patients)") == 2 and "[0.500, 0.700]" not in few
    assert few.count("fewer than 25") == 1 and "fewer than 5 patients get no interval" in few
    some = "\n".join(summary_table(_summary(12), "studies"))
    assert "| a | accuracy | 0.612 | [0.500, 0.700] | 12 | 60 |" in some
    assert "| a | flip_rate | 0.000 | [0.000, 0.300] * | 12 | 50 |" in some
    assert "* exact one-sided bound" in some and some.count("fewer than 25") == 1
    many = "\n".join(summary_table(_summary(30, ("bca", "bca")), "studies"))
    assert "fewer than 25" not in many and "*" not in many
    one = "\n".join(summary_table(_summary(1), "studies"))
    assert one.count("no interval (1 study)") == 2 and "Only 1 study (fewer than 25)" in one
    assert [count_of(1, "units"), count_of(2, "units"), count_of(1, "patients")] == ["1 unit", "2 units", "1 patient"]


def test_report_states_negated_rows_and_keeps_one_few_cluster_note(tmp_path):
    manifest = {"cluster_by": "study_id", "counts": {}, "analysis": {"warnings": [
        "a / ALL / accuracy: only 12 clusters (< 25): intervals are unreliable",
        "a / ALL / fleiss_kappa: only 12 clusters (< 25): intervals are unreliable; statistic undefined on the full "
        "sample", "summary: 2 of 2 rows rest on fewer than 25 clusters (n_clusters 12): their intervals are unreliable",
        "a: 3 of 60 records failed and are excluded from the metrics"]}}  # fmt: skip
    tables = SimpleNamespace(summary=_summary(12), n_negated={"a": 12, "b": 0})
    text = render_report(tmp_path, manifest, tables, [], random_weights=False)
    assert "- a: 12 rows were negated wordings; consistency is computed on the model's judgement." in text
    assert "b: 0 rows" not in text and "RANDOM WEIGHTS" not in text
    assert "clusters: studies (`study_id`)" in text and "| studies |" in text
    assert text.count("fewer than 25") == 1
    assert "- a / ALL / fleiss_kappa: statistic undefined on the full sample" in text
    assert "- a: 3 of 60 records failed" in text and "accuracy: only 12" not in text
    # tables without n_negated (older analysis) are fine
    assert "negated" not in render_report(tmp_path, manifest, SimpleNamespace(summary=_summary(12)), [], False)


# ----------------------------------------------------------------------------- the glossary


def _one_sentence(text: str) -> bool:
    return text.endswith(".") and not re.search(r"[.!?]\s+[A-Z]", text[:-1])


def test_glossary_defines_every_metric_and_column_in_one_sentence():
    assert set(METRICS) <= set(METRIC_TERMS)
    between = [t for t in GLOSSARY if t.key == "between"]
    assert between and all(m in between[0].term for m in BETWEEN_METRICS)
    for key in ("flip_rate", "all_agree", "consistent_correct", "fleiss_kappa", "attn_js_vs_v0", "attn_iou10_vs_v0"):
        assert key in METRIC_TERMS
    assert "n/a" in METRIC_TERMS["fleiss_kappa"].text  # why kappa can be n/a
    documented = {c for t in COLUMNS for c in t.term.split(", ")}
    assert set(SUMMARY_COLUMNS) | {"random_weights"} <= documented, set(SUMMARY_COLUMNS) - documented
    for t in (*GLOSSARY, *COLUMNS):
        assert _one_sentence(t.text), t.key
    assert "seed" in documented and "n_units" in documented


def test_readme_glossary_is_the_reports():
    readme = (ROOT / "README.md").read_text()
    headings = re.findall(r"^## .*$", readme, flags=re.M)
    assert "## Glossary" in headings and headings[headings.index("## Glossary") - 1] == "## Outputs"
    section = readme.split("\n## Glossary\n", 1)[1].split("\n## ", 1)[0].strip()
    assert section == glossary_markdown().strip(), "README's Glossary differs from report_md's: regenerate it"


def test_readme_glossary_check_sees_a_changed_definition(monkeypatch):
    import medvlm.report.report_md as rm

    changed = tuple(t if t.key != "auroc" else rm.Term(t.key, t.term, "Something else.", t.source, t.better)
                    for t in rm.GLOSSARY)  # fmt: skip
    monkeypatch.setattr(rm, "GLOSSARY", changed)
    with pytest.raises(AssertionError, match="Glossary differs"):
        test_readme_glossary_is_the_reports()


def test_per_study_figures_are_drawn_while_the_statistics_run(tmp_path, monkeypatch):
    """The paraphrase grids and side-by-sides need no statistics: their workers are forked
    before summarize() runs (the figure phase overlaps the statistics on a second core); the
    forests follow once the tables exist, and every figure is written once."""
    seen = []
    real = reporting.summarize

    def summarize(*a, **k):
        seen.append(sorted(j.path.name for batch in reporting._JOBS.values() for j in batch))
        return real(*a, **k)

    monkeypatch.setattr(reporting, "summarize", summarize)
    out = _run(tmp_path, monkeypatch, "2", figure_studies=("s1",), figure_findings=("effusion",))
    s1 = _safe_name("s1")
    assert seen == [sorted([f"{s1}__effusion__llava_rad_paraphrases.png", f"{s1}__effusion__medgemma_paraphrases.png",
                            f"{s1}__effusion__models.png"])]  # fmt: skip
    assert len(list((out / "figures").glob("*.png"))) == 5 and not reporting._JOBS
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["figures"][:2] == ["figures/forest_models.png", "figures/forest_differences.png"]  # order kept
