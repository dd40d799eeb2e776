"""The CLI's gradient maps and faithfulness phase end to end on a tiny model: gradient maps
stored beside attention, curves appended per unit and map, the table, figure and section."""

import json

import pandas as pd

import run_medical_vlm_analysis as cli
from medvlm.maps import MapReader
from tests.test_cli import make_project


def test_attribution_and_faithfulness_end_to_end(tmp_path):
    csv = make_project(tmp_path / "proj", n_studies=2)
    out = tmp_path / "out"
    argv = ["--csv", str(csv), "--output_dir", str(out), "--models", "medgemma", "--tiny_random_models",
            "--n_boot", "50", "--n_figure_studies", "0", "--controls", "none", "--attribution", "gradxinput",
            "--faithfulness", "--faithfulness_steps", "2", "--faithfulness_random", "1"]  # fmt: skip
    assert cli.main(argv) == 0
    reader = MapReader(out)
    grad = reader.get("medgemma", "s0", "effusion", 3, "gradxinput")
    assert grad.shape == (256,) and (grad != 0).any()
    units = pd.read_json(out / "faithfulness_units.jsonl", lines=True)
    assert set(units["map"]) == {"attention", "relative", "gradxinput", "random"}
    assert set(units["variant_id"]) == {0} and set(units["study_id"].astype(str)) == {"s0", "s1"}
    assert all(len(d) == 3 for d in units["deletion"] if isinstance(d, list))  # K + 1 points
    table = pd.read_csv(out / "faithfulness.csv")
    assert {"deletion_auc", "insertion_auc"} <= set(table["metric"]) and table["random_weights"].all()
    assert "## Faithfulness" in (out / "report.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["medgemma"]["faithfulness"]["units"] == 2
    # a rerun keeps the units (nothing is scored or perturbed twice)
    assert cli.main(argv) == 0
    assert len(pd.read_json(out / "faithfulness_units.jsonl", lines=True)) == len(units)
    # other curve settings on the same folder are refused
    assert cli.main([*argv[:-4], "--faithfulness_steps", "3", "--faithfulness_random", "1"]) == 2
