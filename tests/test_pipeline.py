"""Packing studies into forward passes; failures recorded per row, never invented."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medvlm.core.backend import QuestionScore, VLMBackend
from medvlm.core.geometry import square_resize_geometry
from medvlm.core.pipeline import RunConfig, run_model
from medvlm.core.store import ResultsStore, read_results


class FakeBackend(VLMBackend):
    """Answers from the question length; raises for "BOOM"; OOM above `max_rows` questions."""

    name = "fake"

    def __init__(self, max_rows=None):
        self.max_rows = max_rows
        self.calls = []

    @property
    def grid(self):
        return (2, 2)

    def geometry(self, width, height):
        return square_resize_geometry(width, height, 8, (2, 2))

    def score(self, image, questions, findings=None):
        return self.score_many([(image, questions, findings)])[0]

    def score_many(self, items):
        n = sum(len(q) for _, q, _ in items)
        self.calls.append(n)
        if self.max_rows is not None and n > self.max_rows:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        if any("BOOM" in q for _, qs, _ in items for q in qs):
            raise RuntimeError("exploded")
        return [[self._one(q) for q in qs] for _, qs, _ in items]

    def _one(self, q):
        p = (len(q) % 10) / 10
        return QuestionScore(q, q, p, 1.0, "yes" if p >= 0.5 else "no", np.full((1, 4), 0.25, np.float32), (0,),
                             np.ones(1, np.float32), 1)  # fmt: skip

    def score_prepared(self, prepared):
        return self.score_many(prepared)

    def unload(self):
        pass


def _rows(tmp_path, n_studies, boom_study=None, broken_image_study=None):
    rows = []
    for s in range(n_studies):
        path = tmp_path / f"s{s}.png"
        if s == broken_image_study:
            path.write_bytes(b"not a png")
        else:
            Image.new("RGB", (8, 6)).save(path)
        for v in range(6):
            q = f"Is there effusion {'x' * v}?" + (" BOOM" if s == boom_study else "")
            rows.append({"line": 2 + len(rows), "study_id": f"s{s}", "subject_id": None, "cluster_id": f"s{s}",
                         "image_abspath": str(path), "finding": "effusion", "variant_id": v, "question": q,
                         "answer_gt": "yes"})  # fmt: skip
    return pd.DataFrame(rows)


def test_studies_are_packed_and_a_failing_study_fails_alone(tmp_path):
    rows = _rows(tmp_path, 5, boom_study=2, broken_image_study=4)
    backend = FakeBackend()
    cfg = RunConfig(output_dir=tmp_path / "out", batch_size=12)
    counts = run_model(backend, rows, ResultsStore(cfg.output_dir), cfg, random_weights=True)
    df = read_results(cfg.output_dir)
    assert len(df) == 30 and counts["ok"] == 18 and counts["failed"] == 12
    failed = df[df.status == "failed"]
    assert set(failed.study_id) == {"s2", "s4"}
    assert failed[failed.study_id == "s2"].error.str.contains("exploded").all()
    assert failed[failed.study_id == "s4"].error.str.startswith("image:").all()
    assert failed.p_yes.isna().all(), "a failed row must carry no score"
    assert max(backend.calls) == 12, "two studies of six questions should share a pass"


def test_oom_halves_the_batch_and_loses_nothing(tmp_path):
    rows = _rows(tmp_path, 3)
    backend = FakeBackend(max_rows=3)
    cfg = RunConfig(output_dir=tmp_path / "out", batch_size=12)
    counts = run_model(backend, rows, ResultsStore(cfg.output_dir), cfg, random_weights=True)
    assert counts["ok"] == 18 and counts["failed"] == 0
    assert counts["final_batch_size"] <= 3


def test_a_failed_write_stops_the_run_and_earlier_passes_stay_written(tmp_path):
    """Results are written in a background thread, a pass behind; a write error is raised, not lost."""
    rows = _rows(tmp_path, 6)
    cfg = RunConfig(output_dir=tmp_path / "out", batch_size=12)
    store = ResultsStore(cfg.output_dir)
    real, calls = store.write_study, []

    def write_study(model, study_id, records, maps):
        calls.append(study_id)
        if len(calls) == 3:
            raise OSError("disk full")
        real(model, study_id, records, maps)

    store.write_study = write_study
    with pytest.raises(OSError, match="disk full"):
        run_model(FakeBackend(), rows, store, cfg, random_weights=True)
    df = read_results(cfg.output_dir)
    assert sorted(set(df.study_id)) == ["s0", "s1"] and len(df) == 12
    # resume: the rest is scored, nothing twice
    store.write_study = real
    counts = run_model(FakeBackend(), rows, ResultsStore(cfg.output_dir), cfg, random_weights=True)
    assert counts["skipped_done"] == 12 and counts["ok"] == 24
    lines = (cfg.output_dir / "results.jsonl").read_text().splitlines()
    assert len(lines) == 36, f"expected 36 records written once each, found {len(lines)} lines"


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"models": ("llava",)}, {"n_studies": 2, "sample": 2}])
def test_run_config_refuses_bad_values(tmp_path, bad):
    with pytest.raises(ValueError):
        RunConfig(output_dir=tmp_path, **bad)


class OverlappingBackend(FakeBackend):
    """FakeBackend in two halves, logging each pass's launch and reading; the reading of pass
    number `fail_read` raises (as an asynchronous device error would surface there)."""

    def __init__(self, fail_read=None):
        super().__init__()
        self.log, self.fail_read, self.passes = [], fail_read, 0

    def launch_prepared(self, prepared):
        from medvlm.core.backend import PendingScores

        n, self.passes = self.passes, self.passes + 1
        self.log.append(("launch", n))
        scores = self.score_many(prepared)

        def build():
            self.log.append(("read", n))
            if n == self.fail_read:
                raise RuntimeError("device fault")
            return scores

        return PendingScores(build)


def test_each_pass_is_launched_before_the_previous_one_is_read(tmp_path):
    """The GPU runs pass n + 1 while the host reads pass n: launches lead readings by one."""
    rows = _rows(tmp_path, 8)
    backend = OverlappingBackend()
    cfg = RunConfig(output_dir=tmp_path / "out", batch_size=12)
    counts = run_model(backend, rows, ResultsStore(cfg.output_dir), cfg, random_weights=True)
    assert counts["ok"] == 48
    want = [("launch", 0), ("launch", 1), ("read", 0), ("launch", 2), ("read", 1), ("launch", 3), ("read", 2),
            ("read", 3)]  # fmt: skip
    assert backend.log == want, f"launch / read order {backend.log}"
    df = read_results(cfg.output_dir)
    assert list(dict.fromkeys(df.study_id)) == [f"s{s}" for s in range(8)], "results written out of order"
    assert (df.seconds > 0).all()


def test_a_pass_whose_reading_fails_is_scored_study_by_study(tmp_path):
    rows = _rows(tmp_path, 6)
    backend = OverlappingBackend(fail_read=1)
    cfg = RunConfig(output_dir=tmp_path / "out", batch_size=12)
    counts = run_model(backend, rows, ResultsStore(cfg.output_dir), cfg, random_weights=True)
    assert counts["ok"] == 36 and counts["failed"] == 0
    assert backend.calls == [12, 12, 12, 6, 6], f"passes and re-scored studies: {backend.calls}"
    df = read_results(cfg.output_dir)
    assert list(dict.fromkeys(df.study_id)) == [f"s{s}" for s in range(6)]
