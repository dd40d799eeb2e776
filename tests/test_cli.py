"""The CLI in a new user's hands: no data loss, refusals that write nothing, settings that
cannot drift, one-line errors with exit code 2, and a --help that needs no torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import run_medical_vlm_analysis as cli
from medvlm.core import runner
from medvlm.core.preflight import TOOL_DIRS, TOOL_FILES, UsageError, check_outputs_are_the_tools, overwrite_targets

ROOT = Path(__file__).resolve().parents[1]


def make_project(folder: Path, n_studies: int = 2, image_dir: str = "img") -> Path:
    """A user's project folder: questions.csv, its images and an unrelated notes.txt."""
    rng = np.random.default_rng(0)
    (folder / image_dir).mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(n_studies):
        Image.fromarray((rng.random((40, 48)) * 255).astype("uint8")).save(folder / image_dir / f"s{s}.png")
        for v in range(6):
            rows.append({"study_id": f"s{s}", "image_path": f"{image_dir}/s{s}.png", "finding": "effusion",
                         "variant_id": v, "question": f"Is there an effusion ({v})?", "answer_gt": "yes"})  # fmt: skip
    pd.DataFrame(rows).to_csv(folder / "questions.csv", index=False)
    (folder / "notes.txt").write_text("my notes\n")
    return folder / "questions.csv"


def tiny_args(csv: Path, out: Path, *extra: str) -> list[str]:
    return ["--csv", str(csv), "--output_dir", str(out), "--models", "medgemma", "--tiny_random_models",
            "--n_boot", "50", "--n_figure_studies", "0", *extra]  # fmt: skip


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_loading(monkeypatch):
    """Replace every backend loader by one that records the call and fails the test."""
    calls = []

    def refuse(cfg):
        calls.append(cfg)
        raise AssertionError("a model was loaded")

    for name in cli.BACKENDS:
        monkeypatch.setitem(cli.BACKENDS, name, refuse)
    return calls


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing on stderr"
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("error: "), err
    return err[-1]


# ------------------------------------------------------------------ data loss


def test_overwrite_removes_only_what_the_tool_wrote(tmp_path):
    csv = make_project(tmp_path / "proj")
    out = tmp_path / "out"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "stale.png").write_bytes(b"old")
    (out / "manifest.json").write_text("{}\n")  # a run of this tool wrote the folder
    (out / "attention").mkdir()
    (out / "results.jsonl").write_text("")
    (out / "summary.csv").write_text("old\n")
    (out / "notes.txt").write_text("keep me\n")
    (out / "my_results_backup").mkdir()
    (out / "my_results_backup" / "results.jsonl").write_text("keep me too\n")
    assert cli.main(tiny_args(csv, out, "--overwrite")) == 0
    assert (out / "notes.txt").read_text() == "keep me\n"
    assert (out / "my_results_backup" / "results.jsonl").read_text() == "keep me too\n"
    assert not (out / "figures" / "stale.png").exists()
    assert len(pd.read_json(out / "results.jsonl", lines=True)) == 12


@pytest.mark.parametrize("extra", [(), ("--overwrite",)])
def test_files_with_the_tools_names_but_no_run_of_it_are_the_users(tmp_path, capsys, no_loading, extra):
    """A folder of the user's own summary.csv and report.md (no manifest.json, no settings.json):
    neither written over nor, with --overwrite, removed."""
    csv = make_project(tmp_path / "proj")
    out = tmp_path / "paper"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "fig1.png").write_bytes(b"mine")
    (out / "summary.csv").write_text("my,table\n")
    (out / "report.md").write_text("# my report\n")
    before = snapshot(out)
    assert cli.main(tiny_args(csv, out, *extra)) == 2
    line = one_error_line(capsys)
    assert f"--output_dir {out} holds figures/, report.md, summary.csv" in line and "your own files" in line
    assert snapshot(out) == before and not no_loading


def test_overwrite_keeps_a_users_file_inside_the_tools_folders(tmp_path, capsys, no_loading):
    csv = make_project(tmp_path / "proj")
    out = tmp_path / "out"
    (out / "figures").mkdir(parents=True)
    (out / "manifest.json").write_text("{}\n")
    (out / "figures" / "forest_models.png").write_bytes(b"the tool's")
    (out / "figures" / "my_slide.pdf").write_bytes(b"mine")
    before = snapshot(out)
    assert cli.main(tiny_args(csv, out, "--overwrite")) == 2
    assert f"--overwrite refused: {out / 'figures' / 'my_slide.pdf'} is not a file this tool writes" in (
        one_error_line(capsys))
    assert snapshot(out) == before and not no_loading


def test_a_run_stopped_before_its_settings_goes_on(tmp_path):
    """A demo stopped while writing demo_data/ (before settings.json) is the tool's folder still."""
    (tmp_path / "demo_data").mkdir()
    (tmp_path / "demo_data" / "q.csv").write_text("half written")
    check_outputs_are_the_tools(tmp_path)
    (tmp_path / "demo_data").rename(tmp_path / "figures")
    with pytest.raises(UsageError, match="holds figures/, names this tool writes"):
        check_outputs_are_the_tools(tmp_path)


def test_an_input_where_the_tool_writes_is_refused_without_overwrite_too(tmp_path, capsys, no_loading):
    csv = make_project(tmp_path / "proj")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}\n")
    mine = out / "summary.csv"  # the user's questions, named as the tool's table
    mine.write_text(csv.read_text().replace("img/", "../proj/img/"))
    before = snapshot(out)
    assert cli.main(tiny_args(mine, out)) == 2
    assert f"your input file {mine} lies where this tool writes" in one_error_line(capsys)
    assert snapshot(out) == before and not no_loading


def test_overwrite_refuses_a_folder_that_holds_the_csv(tmp_path, capsys, no_loading):
    csv = make_project(tmp_path / "proj")
    before = snapshot(tmp_path / "proj")
    assert cli.main(tiny_args(csv, tmp_path / "proj", "--overwrite")) == 2
    assert "holds your input file" in one_error_line(capsys)
    assert snapshot(tmp_path / "proj") == before, "the user's files changed"
    assert not no_loading


def test_overwrite_refuses_a_folder_that_holds_the_images(tmp_path, capsys, no_loading):
    csv = make_project(tmp_path / "proj", image_dir="out/images")
    before = snapshot(tmp_path / "proj")
    assert cli.main(tiny_args(csv, tmp_path / "proj" / "out", "--overwrite")) == 2
    assert "s0.png" in one_error_line(capsys)
    assert snapshot(tmp_path / "proj") == before


def test_overwrite_targets_match_the_documented_list(tmp_path):
    for name in ("results.jsonl", "results.shard-1.jsonl", "manifest.json", "report.md", "keep.txt", "q.csv"):
        (tmp_path / name).write_text("x")
    for d in (*TOOL_DIRS, "images"):
        (tmp_path / d).mkdir()
    names = {p.name for p in overwrite_targets(tmp_path)}
    assert names == {"results.jsonl", "results.shard-1.jsonl", "manifest.json", "report.md", *TOOL_DIRS}
    help_text = cli.build_parser().format_help().replace("\n", " ")
    help_text = " ".join(help_text.split())
    for pattern in (*TOOL_FILES, *TOOL_DIRS):
        if not pattern.endswith(".tmp"):
            assert pattern in help_text, f"--help does not say that --overwrite removes {pattern}"


def test_a_refused_run_writes_nothing(tmp_path, capsys, no_loading):
    csv = make_project(tmp_path / "proj")
    with open(csv, "a") as f:
        f.write("s9,img/missing.png,effusion,0,Is there?,yes\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"from": "an earlier run"}\n')
    before = snapshot(out)
    assert cli.main(tiny_args(csv, out, "--strict")) == 2
    assert snapshot(out) == before, "a refused run changed the output folder"
    fresh = tmp_path / "fresh"
    assert cli.main(tiny_args(csv, fresh, "--strict")) == 2
    assert not fresh.exists(), "a refused run made the output folder"
    assert not no_loading


def test_all_rows_bad_refuses_before_loading(tmp_path, capsys, no_loading):
    csv = make_project(tmp_path / "proj")
    for p in (tmp_path / "proj" / "img").iterdir():
        p.unlink()
    out = tmp_path / "out"
    assert cli.main(tiny_args(csv, out)) == 2
    err = capsys.readouterr().err
    assert "questions.csv:2: image not found" in err and "all 12 data row(s) are bad" in err
    assert "Traceback" not in err
    assert not no_loading and not out.exists()


def test_layers_out_of_range_refused_before_loading(tmp_path, capsys, no_loading):
    csv = make_project(tmp_path / "proj")
    assert cli.main(tiny_args(csv, tmp_path / "out", "--layers", "0,99")) == 2
    line = one_error_line(capsys)
    assert "99" in line and "0..5" in line, line
    assert not no_loading


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a run on the CPU")
def test_overlap_tower_on_the_cpu_refused_before_loading(tmp_path, capsys, no_loading):
    csv = make_project(tmp_path / "proj")
    assert cli.main(tiny_args(csv, tmp_path / "out", "--overlap_tower")) == 2
    line = one_error_line(capsys)
    assert "--overlap_tower needs a CUDA GPU" in line and "on the CPU" in line, line
    assert not no_loading and not (tmp_path / "out").exists()


def test_an_analysis_failure_keeps_the_results(tmp_path, capsys, monkeypatch):
    csv = make_project(tmp_path / "proj", n_studies=1)
    out = tmp_path / "out"

    def broken(cfg, manifest):
        raise RuntimeError("a bug in the analysis")

    monkeypatch.setattr(runner, "analyze", broken)
    assert cli.main(tiny_args(csv, out)) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--analyze_only" in line and "intact" in line
    assert len(pd.read_json(out / "results.jsonl", lines=True)) == 6
    assert "RuntimeError: a bug in the analysis" in (out / "analysis_error.log").read_text()


# ------------------------------------------------------------------ drift


def test_changed_settings_are_refused_and_harmless_ones_allowed(tmp_path, capsys):
    csv = make_project(tmp_path / "proj")
    out = tmp_path / "out"
    assert cli.main(tiny_args(csv, out, "--n_studies", "0")) == 0  # 0 = all studies
    records = pd.read_json(out / "results.jsonl", lines=True)
    assert len(records) == 12 and records["settings_hash"].nunique() == 1
    capsys.readouterr()
    before = snapshot(out)
    assert cli.main(tiny_args(csv, out, "--attention_head_mode", "max", "--layers", "last_half")) == 2
    line = one_error_line(capsys)
    assert "head_mode: stored 'mean', now 'max'" in line and "layers: stored 'all', now 'last_half'" in line
    assert "--output_dir" in line and "--overwrite" in line
    assert snapshot(out) == before, "a refused rerun changed the folder"
    assert cli.main(tiny_args(csv, out, "--batch_size", "6")) == 0, "batch size does not change results"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["medgemma"]["skipped_done"] == 12
    assert set(manifest["timings_s"]) >= {"load", "score"}


@pytest.mark.parametrize("extra", [(), ("--analyze_only",)])
def test_a_broken_results_line_is_one_line_naming_it(tmp_path, capsys, extra):
    csv = make_project(tmp_path / "proj", n_studies=1)
    out = tmp_path / "out"
    assert cli.main(tiny_args(csv, out)) == 0
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    lines[2] = "{edited by hand\n"
    (out / "results.jsonl").write_text("".join(lines))
    capsys.readouterr()
    args = ["--output_dir", str(out), "--analyze_only", "--n_boot", "50"] if extra else tiny_args(csv, out)
    assert cli.main(args) == 2
    assert f"{out / 'results.jsonl'}:3: not a JSON record" in one_error_line(capsys)
    assert not (out / "analysis_error.log").exists()


def test_settings_of_a_folder_made_before_settings_json(tmp_path, capsys):
    """A folder scored by an earlier version (no settings.json): its manifest's settings count."""
    csv = make_project(tmp_path / "proj", n_studies=1)
    out = tmp_path / "out"
    assert cli.main(tiny_args(csv, out)) == 0
    (out / "settings.json").unlink()
    capsys.readouterr()
    assert cli.main(tiny_args(csv, out, "--query_mode", "question")) == 2
    assert "query_mode: stored 'answer', now 'question'" in one_error_line(capsys)


# ------------------------------------------------------------------ messages


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--demo"], "--demo runs its own data"),
        (["--n_studies", "-1"], "expected 0 (all) or a positive integer"),
        (["--layers", "foo"], "comma-separated layer indices"),
        (["--models", "llava"], "invalid choice: 'llava'"),
        (["--analyze_only"], "--analyze_only reads the stored results"),
        (["--load_in_8bit"], "random-weight models"),
        (["--colormap", "hott"], "unknown colormap 'hott'"),
        (["--faithfulness", "--no_faithfulness"], "choose one of --faithfulness and --no_faithfulness"),
        (["--sample", "1", "--seed", "-5"], "argument --seed: expected 0 or a positive integer, got '-5'"),
        (["--finding_map", "map.csv"], "--finding_map renames the labels of --regions files, and no --regions"),
        (["--faithfulness", "--faithfulness_variants", "9"],
         "--faithfulness_variants 9: no selected row has that variant (the selected rows have 0, 1, 2, 3, 4, 5)"),
    ],
)
def test_flag_mistakes_are_one_line_and_exit_2(tmp_path, capsys, no_loading, extra, expected):
    csv = make_project(tmp_path / "proj", n_studies=1)
    try:
        code = cli.main(tiny_args(csv, tmp_path / "out", *extra))
    except SystemExit as e:
        code = e.code
    assert code == 2
    line = one_error_line(capsys)
    assert expected in line, line
    assert not no_loading and not (tmp_path / "out").exists()


def _faith(cfg) -> tuple:
    return (cfg.faithfulness, cfg.faithfulness_steps, cfg.faithfulness_random, cfg.faithfulness_studies,
            cfg.faithfulness_variants)  # fmt: skip


def test_the_demo_runs_small_faithfulness_curves_unless_told_not_to(tmp_path):
    """#15: the demo runs the curves, K = 8 on variant 0, on its figure study only; --no_faithfulness
    skips them, the flags override its choices, a demo of some studies runs them only when asked,
    and everywhere else --faithfulness stays opt-in with K = 16 and R = 3."""
    out = ["--output_dir", str(tmp_path / "out")]
    demo = cli.parse_args(["--demo", *out])
    # one unit per model: the figure study's finding with the demo region (not both findings)
    assert _faith(demo) == (True, 8, cli.DEMO_FAITHFULNESS["random"], ((cli.DEMO_FIGURE_STUDY, "cardiomegaly"),),
                            "0")  # fmt: skip
    regions = pd.read_csv(cli.DEMO_REGIONS, dtype=str)
    assert set(zip(regions["study_id"], regions["finding"], strict=True)) == {(cli.DEMO_FIGURE_STUDY, "cardiomegaly")}
    assert demo.figure_studies == (cli.DEMO_FIGURE_STUDY,) and demo.to_json()["faithfulness_studies"]
    assert _faith(cli.parse_args(["--demo", "--no_faithfulness", *out]))[0] is False
    assert _faith(cli.parse_args(["--demo", *out, "--faithfulness_steps", "4", "--faithfulness_random", "2",
                                  "--faithfulness_studies", "3"])) == (True, 4, 2, 3, "0")  # fmt: skip
    assert _faith(cli.parse_args(["--demo", "--n_studies", "2", *out]))[0] is False
    some = cli.parse_args(["--demo", "--sample", "2", "--faithfulness", *out])
    assert _faith(some) == (True, 8, cli.DEMO_FAITHFULNESS["random"], None, "0")
    csv = ["--csv", str(tmp_path / "q.csv"), *out]
    assert _faith(cli.parse_args(csv)) == (False, 16, 3, None, "0")
    assert _faith(cli.parse_args([*csv, "--faithfulness"])) == (True, 16, 3, None, "0")
    tiny = cli.parse_args([*csv, "--tiny_random_models", "--faithfulness", "--faithfulness_studies", "2"])
    assert _faith(tiny) == (True, 16, 3, 2, "0")


def test_file_mistakes_are_one_line_and_exit_2(tmp_path, capsys, no_loading):
    csv = make_project(tmp_path / "proj", n_studies=1)
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (tiny_args(csv, afile), "is a file, not a folder"),
        (tiny_args(tmp_path / "missing.csv", tmp_path / "o"), "CSV file not found"),
        (tiny_args(csv, tmp_path / "o", "--image_root", str(tmp_path / "nope")), "is not a directory"),
        (["--output_dir", str(tmp_path / "empty"), "--analyze_only"], "no results"),
        (["--output_dir", str(tmp_path / "blank"), "--analyze_only"], "no results"),
        (["--output_dir", str(tmp_path / "theirs"), "--analyze_only"], "they look like your own files"),
    ]
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "results.jsonl").write_text("\n")
    (tmp_path / "blank" / "settings.json").write_text("{}\n")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "results.jsonl").write_text('{"a": 1}\n')
    before = snapshot(tmp_path / "theirs")
    for argv, expected in cases:
        assert cli.main(argv) == 2, argv
        assert expected in one_error_line(capsys)
    assert not no_loading and snapshot(tmp_path / "theirs") == before


def test_region_files_that_cannot_be_used_are_refused_before_loading(tmp_path, capsys, no_loading):
    """--regions is read with the other checks, not after scoring ('the analysis failed', exit 1)."""
    csv = make_project(tmp_path / "proj", n_studies=1)
    (tmp_path / "foo.csv").write_text("foo,bar\n1,2\n")
    (tmp_path / "cut.json").write_text('{"a": ')
    cases = [(tmp_path / "missing.csv", "region file not found"),
             (tmp_path / "foo.csv", "not a known region format (header 'foo,bar'). Known formats: nih_bbox: "),
             (tmp_path / "cut.json", "not valid JSON")]  # fmt: skip
    for regions, expected in cases:
        assert cli.main(tiny_args(csv, tmp_path / "o", "--regions", str(regions))) == 2
        assert one_error_line(capsys).startswith(f"error: --regions: {regions}: {expected}")
    assert not no_loading and not (tmp_path / "o").exists()


def test_bad_region_lines_are_listed_on_stderr(tmp_path, capsys):
    csv = make_project(tmp_path / "proj", n_studies=1)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("study_id,finding,x,y,w,h\ns0,effusion,1,2,abc,4\ns0,effusion,1,2,3,4\n")
    assert cli.main(tiny_args(csv, tmp_path / "o", "--regions", str(boxes))) == 0
    err = capsys.readouterr().err
    assert f"1 bad line(s) of {boxes} skipped" in err and f"  {boxes}:2: w 'abc' is not a number" in err


def test_an_output_dir_that_cannot_be_made_is_one_line(tmp_path, capsys, no_loading, monkeypatch):
    """As root, os.access passes a folder of a read-only or virtual file system (/proc): mkdir fails."""
    csv = make_project(tmp_path / "proj", n_studies=1)
    out = tmp_path / "ro" / "out"

    def refuse(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert cli.main(tiny_args(csv, out)) == 2
    assert f"--output_dir {out}: cannot create it (Permission denied)" in one_error_line(capsys)


def test_ctrl_c_is_one_line_keeps_the_rows_and_the_rerun_goes_on(tmp_path, capsys, monkeypatch):
    csv = make_project(tmp_path / "proj", n_studies=2)
    out = tmp_path / "out"
    assert cli.main(tiny_args(csv, out, "--n_studies", "1")) == 0
    kept = (out / "results.jsonl").read_text()
    capsys.readouterr()
    load = cli.BACKENDS["medgemma"]

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.BACKENDS, "medgemma", interrupted)
    assert cli.main(tiny_args(csv, out)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"interrupted: the rows scored so far "
                                                                               f"are kept in {out}")  # fmt: skip
    assert (out / "results.jsonl").read_text() == kept
    monkeypatch.setitem(cli.BACKENDS, "medgemma", load)
    assert cli.main(tiny_args(csv, out)) == 0
    assert "6 ok, 0 failed, 6 already done" in capsys.readouterr().err


def test_weights_that_need_a_download_say_so(tmp_path):
    csv = make_project(tmp_path / "proj", n_studies=1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run_medical_vlm_analysis.py"), "--csv", str(csv), "--output_dir",
         str(tmp_path / "out"), "--models", "medgemma"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "google/medgemma-4b-it" in lines[0] and "--medgemma_model" in lines[0] and "licence" in lines[0]
    assert not (tmp_path / "out").exists()


def test_help_is_grouped_explained_and_needs_no_torch():
    code = (
        "import sys, run_medical_vlm_analysis as m; text = m.build_parser().format_help(); "
        "assert 'torch' not in sys.modules, 'torch imported'; print(text)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for group in ("data:", "models:", "attention and answers:", "statistics:", "output:", "performance:"):
        assert group in text, f"no {group} group"
    for choice in ("answer (the last prompt token", "entropy (focused heads", "last_quarter", "inferno",
                   "1,000 for a quick look", "default 10000", "--max_new_tokens"):  # fmt: skip
        assert choice in text, f"--help does not explain {choice!r}"
    assert "(default: None)" not in text, "a flag whose default depends on the run shows None"
    assert "--no_faithfulness" in text and "(default 16; the demo 8)" in text


def test_a_fixed_label_is_taken_on_resume(tmp_path, capsys):
    """A label fixed in the CSV after scoring (here: variant 3 is a negated wording whose answer
    is 'no') is not hidden by resume: that row is scored again and the analysis uses it."""
    csv = make_project(tmp_path / "proj", n_studies=1)
    out = tmp_path / "out"
    assert cli.main(tiny_args(csv, out)) == 0
    df = pd.read_csv(csv)
    df.loc[df.variant_id == 3, ["question", "answer_gt"]] = ["Is the pleural space clear (3)?", "no"]
    df.to_csv(csv, index=False)
    assert cli.main(tiny_args(csv, out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["medgemma"]["rescored_changed"] == 1
    assert manifest["counts"]["medgemma"]["skipped_done"] == 5
    res = pd.read_json(out / "results.jsonl", lines=True).drop_duplicates(
        ["study_id", "finding", "variant_id"], keep="last")
    row = res[res.variant_id == 3].iloc[0]
    assert row.answer_gt == "no" and row.polarity == "negated" and row.correct == (row.answer == "no")


def test_an_image_replaced_in_place_is_scored_again_on_resume(tmp_path):
    """Resume compares each record's image stamp (size and modification time) with the file:
    a study whose image was replaced under the same name is scored again, the others are not."""
    from medvlm.core.pipeline import image_stamp

    csv = make_project(tmp_path / "proj", n_studies=2)
    out = tmp_path / "out"
    assert cli.main(tiny_args(csv, out)) == 0
    first = pd.read_json(out / "results.jsonl", lines=True)
    assert first["image_stamp"].notna().all()
    df = pd.read_csv(csv)
    image = (csv.parent / df.image_path.iloc[0]).resolve()
    assert first.loc[first.image_path == str(image), "image_stamp"].iloc[0] == image_stamp(image)
    n_rows = int((df.image_path == df.image_path.iloc[0]).sum())
    Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image)  # a new image, same name
    st = os.stat(image)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse file-system clocks
    assert cli.main(tiny_args(csv, out)) == 0
    counts = json.loads((out / "manifest.json").read_text())["counts"]["medgemma"]
    assert counts["rescored_changed"] == n_rows, counts
    assert counts["skipped_done"] == len(df) - n_rows, counts


def test_the_cli_lets_idle_cpu_threads_sleep(monkeypatch):
    """OMP_WAIT_POLICY=PASSIVE before torch is imported (the demo's tiny ops stalled 3-6 x with
    spinning threads when another process held a core); a value the user set is kept."""
    code = ("import sys, run_medical_vlm_analysis as cli; assert 'torch' not in sys.modules; "
            "cli.passive_cpu_threads(); import os; print(os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(cli.__file__).parent, check=True)  # fmt: skip
    assert run.stdout.strip() == "PASSIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with pytest.raises(SystemExit):  # a refused command line: set before anything else
        cli.main(["--demo", "--csv", "x.csv"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    cli.passive_cpu_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_the_script_skips_the_interpreter_teardown_but_not_atexit(tmp_path):
    """Run as a script, the CLI ends with its exit code once main() returns, after the atexit
    handlers and the streams' flush, without tearing the interpreter down (1-1.5 s of freeing
    torch and transformers after every output is written)."""
    (tmp_path / "empty").mkdir()
    code = ("import atexit, runpy, sys\n"
            "class Teardown:\n"
            "    def __del__(self):\n"
            "        print('teardown ran', flush=True)\n"
            "sys.modules['_probe'] = Teardown()\n"
            "atexit.register(lambda: print('atexit ran', flush=True))\n"
            f"sys.argv = ['x', '--analyze_only', '--output_dir', {str(tmp_path / 'empty')!r}]\n"
            f"runpy.run_path({cli.__file__!r}, run_name='__main__')\n")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(cli.__file__).parent)
    assert run.returncode == 2 and "error: --analyze_only: no results" in run.stderr
    assert "atexit ran" in run.stdout and "teardown ran" not in run.stdout
    profiled = subprocess.run([sys.executable, "-c", code.replace("runpy.run_path", "sys.setprofile(lambda *a: None)\n"
                                                                  "runpy.run_path")],
                              capture_output=True, text=True, cwd=Path(cli.__file__).parent)  # fmt: skip
    assert profiled.returncode == 2 and "teardown ran" in profiled.stdout  # a profiler gets the ordinary exit
