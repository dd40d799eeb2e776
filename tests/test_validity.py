"""The validity phase from stored results alone: controls and grounding tables, region notes."""

import dataclasses

import pandas as pd

from medvlm.analysis.validity import run_validity
from medvlm.core.config import RunConfig
from medvlm.core.maps import MapReader
from tests.test_grounding_run import build


def test_run_validity_from_stored_results(tmp_path):
    records, boxes = build(tmp_path / "out")
    records["p_yes"], records["answer"], records["correct"] = 0.9, "yes", True
    records["p_yes_text_only"] = [0.9 if i % 2 else 0.2 for i in range(len(records))]
    not_expert = tmp_path / "boxes_NOT_EXPERT.csv"
    not_expert.write_text(boxes.read_text())
    cfg = dataclasses.replace(RunConfig(output_dir=tmp_path / "out"), regions=(not_expert,), n_boot=200,
                              map_kinds=("attention", "relative"))  # fmt: skip
    res = run_validity(cfg, records, MapReader(tmp_path / "out"))
    assert {"abs_delta_p_text_only", "answer_change_text_only"} <= set(res.controls.metric)
    assert "abs_delta_p_blank" not in set(res.controls.metric), "no blank control was stored"
    assert set(res.grounding.map_kind) == {"attention", "relative"} and len(res.units) == 12
    assert res.regions["question_rows"] == 6
    assert any("NOT expert annotations" in n for n in res.notes)
    plain = run_validity(dataclasses.replace(cfg, regions=()), records, MapReader(tmp_path / "out"))
    assert plain.grounding.empty and plain.regions is None
    assert isinstance(plain.quadrants, pd.DataFrame)


def test_validity_figures_draw_with_the_banner(tmp_path):
    import numpy as np

    from medvlm.report.figure_canvas import BANNER_GID
    from medvlm.report.validity_figures import grounding_forest, reliance_scatter

    records, boxes = build(tmp_path / "out", 8)
    records["p_yes"], records["answer"], records["correct"] = np.linspace(0.1, 0.9, 8), "yes", True
    records["p_yes_text_only"] = 0.5
    cfg = dataclasses.replace(RunConfig(output_dir=tmp_path / "out"), regions=(boxes,), n_boot=100)
    res = run_validity(cfg, records, MapReader(tmp_path / "out"))
    for fig in (reliance_scatter(records, random_weights=True), grounding_forest(res.grounding, random_weights=True)):
        assert any(t.get_gid() == BANNER_GID for t in fig.texts)
    fig = grounding_forest(res.grounding)
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    groups = {t.get_text() for lg in legends for t in lg.get_texts()}
    assert {"m: raw attention", "m: uniform map", "m: Gaussian prior"} <= groups


def test_analyze_only_with_new_regions_grounds_without_scoring(tmp_path, monkeypatch):
    """--analyze_only --regions FILE: grounding from the stored maps, no model loaded."""
    import json

    import run_medical_vlm_analysis as cli
    from tests.test_cli import make_project, tiny_args

    csv = make_project(tmp_path / "proj", n_studies=2)
    out = tmp_path / "out"
    assert cli.main(tiny_args(csv, out)) == 0
    boxes = tmp_path / "boxes_NOT_EXPERT.csv"
    boxes.write_text("study_id,finding,x,y,w,h\ns0,effusion,0,0,24,20\ns1,effusion,24,20,24,20\n")
    for name in cli.BACKENDS:
        monkeypatch.setitem(cli.BACKENDS, name, lambda cfg: (_ for _ in ()).throw(AssertionError("loaded")))
    assert cli.main(["--output_dir", str(out), "--analyze_only", "--n_boot", "50", "--regions", str(boxes)]) == 0
    units = pd.read_csv(out / "grounding_rows.csv")
    assert len(units) == 2 * 6 * 2 and set(units["map_kind"]) == {"attention", "relative"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["regions"]["question_rows"] == 12 and any("NOT expert" in n for n in manifest["validity_notes"])
    report = (out / "report.md").read_text()
    assert "## Grounding" in report and "## Attention sinks" in report
