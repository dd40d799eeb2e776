"""The CLI's gradient maps and faithfulness phase end to end on a tiny model: gradient maps
stored beside attention, curves appended per unit and map, the table, figure and section."""

import json

import pandas as pd

import run_medical_vlm_analysis as cli
from medvlm.core.maps import MapReader
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


def _scored_medgemma_run(csv, out):
    """Score csv with the tiny MedGemma into out (raw maps, no controls or figures) ->
    (out, its rows, the loaded backend, a 1-step faithfulness config with 1 random order)."""
    from medvlm.analysis.faithfulness import FaithfulnessConfig
    from medvlm.core.store import read_results

    argv = ["--csv", str(csv), "--output_dir", str(out), "--models", "medgemma", "--tiny_random_models",
            "--n_boot", "50", "--n_figure_studies", "0", "--controls", "none", "--map", "raw"]  # fmt: skip
    cfg = cli.parse_args(argv)
    assert cli.main(argv) == 0
    return out, read_results(out), cli.get_backend_loader("medgemma")(cfg), FaithfulnessConfig(steps=1, n_random=1)


def test_faithfulness_studies_by_count_or_by_id(tmp_path):
    """max_studies: study ids (the demo's subset: only those of them in the run), or N (the first
    N studies of the run, done ones included: a rerun completes them and never adds N more)."""
    from medvlm.analysis.faithfulness_run import read_units, run_faithfulness

    csv = make_project(tmp_path / "proj", n_studies=3)
    out, rows, backend, fcfg = _scored_medgemma_run(csv, tmp_path / "out")

    def curve(max_studies):
        return run_faithfulness(backend, "medgemma", out, rows, fcfg, ["attention"], max_studies=max_studies)

    assert curve(("s2", "not-in-the-run"))["study_ids"] == ["s2"]
    assert set(read_units(out)["study_id"]) == {"s2"}
    assert curve(1)["study_ids"] == ["s0"]
    again = curve(1)
    assert again["study_ids"] == [] and again["units"] == 0, "a rerun of the first study added another"
    assert curve(None)["study_ids"] == ["s1"]
    units = read_units(out)
    assert sorted(units["study_id"]) == ["s0", "s0", "s1", "s1", "s2", "s2"]  # attention and random each
    assert (units["n_images"] == 2).all() and (units["steps"] == 1).all()


def test_faithfulness_selection_by_study_and_finding(tmp_path):
    """A (study id, finding) entry curves that finding's units only (the demo: the finding with
    its region); a bare study id beside it curves the whole study. The report names the units."""
    from medvlm.analysis.faithfulness import faithfulness_table
    from medvlm.analysis.faithfulness_run import read_units, run_faithfulness
    from medvlm.report.report_faithfulness import faithfulness_section
    from medvlm.report.reporting import _faith_settings

    csv = make_project(tmp_path / "proj", n_studies=2)
    df = pd.read_csv(csv)
    other = df.assign(finding="cardiomegaly", question=df["question"].str.replace("an effusion", "cardiomegaly"))
    pd.concat([df, other]).to_csv(csv, index=False)
    out, rows, backend, fcfg = _scored_medgemma_run(csv, tmp_path / "out")
    counts = run_faithfulness(backend, "medgemma", out, rows, fcfg, ["attention"],
                              max_studies=(("s1", "cardiomegaly"),))  # fmt: skip
    assert counts["study_ids"] == ["s1"] and counts["units"] == 1
    units = read_units(out)
    assert set(zip(units["study_id"], units["finding"], strict=True)) == {("s1", "cardiomegaly")}
    table = faithfulness_table(units, n_boot=50)
    text = "\n".join(faithfulness_section(table, "studies", _faith_settings({}, units)))
    assert "Units curved: 1 per model (s1 cardiomegaly, paraphrase 0)." in text
    counts = run_faithfulness(backend, "medgemma", out, rows, fcfg, ["attention"],
                              max_studies=(("s0", "effusion"), "s0"))  # fmt: skip
    assert counts["study_ids"] == ["s0"] and counts["units"] == 2
    # a wider selection later completes the study curved in part, and repeats no unit
    counts = run_faithfulness(backend, "medgemma", out, rows, fcfg, ["attention"], max_studies=("s1",))
    assert counts["study_ids"] == ["s1"] and counts["units"] == 1 and counts["skipped_done"] == 1
    counts = run_faithfulness(backend, "medgemma", out, rows, fcfg, ["attention"], max_studies=None)
    assert counts["study_ids"] == [] and counts["units"] == 0 and counts["skipped_done"] == 4
    units = read_units(out)
    keys = list(zip(units["study_id"], units["finding"], units["variant_id"], units["map"], strict=True))
    assert len(keys) == len(set(keys)) == 8, "a unit was curved twice or one is missing"
