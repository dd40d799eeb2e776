"""Results store: append-only, crash-safe, resume without loss or duplicates."""

import json

import numpy as np
import pytest

from medvlm.core.store import ResultsStore, load_map, map_key, read_results


def _rec(model, study, finding, v, status="ok"):
    return {"model": model, "study_id": study, "finding": finding, "variant_id": v, "status": status,
            "error": None if status == "ok" else "boom"}  # fmt: skip


def test_write_read_and_maps(tmp_path):
    store = ResultsStore(tmp_path)
    att = np.random.default_rng(0).random((3, 16)).astype(np.float32)
    store.write_study("m", "s/1", [_rec("m", "s/1", "f", 0)], {map_key("f", 0): ((4, 5, 6), att)})
    df = read_results(tmp_path)
    assert len(df) == 1 and df.iloc[0]["study_id"] == "s/1"
    layers, got = load_map(tmp_path, "m", "s/1", "f", 0)
    assert list(layers) == [4, 5, 6]
    assert np.abs(got - att).max() <= 1e-3  # float16 storage
    assert load_map(tmp_path, "m", "s/1", "f", 1) is None
    assert store.done_keys() == {("m", "s/1", "f", 0)}


def test_failed_rows_are_retried_and_superseded(tmp_path):
    store = ResultsStore(tmp_path)
    store.write_study("m", "s", [_rec("m", "s", "f", 0, "failed")], {})
    assert store.done_keys() == set()
    store.write_study("m", "s", [_rec("m", "s", "f", 0)], {})
    df = read_results(tmp_path)
    assert len(df) == 1 and df.iloc[0]["status"] == "ok"


def test_partial_last_line_is_cut_before_the_next_append(tmp_path):
    store = ResultsStore(tmp_path)
    store.append([_rec("m", "s", "f", 0)])
    with open(store.path, "a") as f:
        f.write('{"model": "m", "study_id": "s", "fin')  # a writer killed mid-line
    assert len(read_results(tmp_path)) == 1
    store = ResultsStore(tmp_path)  # a new run repairs the tail
    store.append([_rec("m", "s", "f", 1)])
    lines = store.path.read_text().splitlines()
    assert [json.loads(x)["variant_id"] for x in lines] == [0, 1]


def test_a_malformed_middle_line_names_file_and_line(tmp_path):
    store = ResultsStore(tmp_path)
    store.append([_rec("m", "s", "f", 0)])
    with open(store.path, "a") as f:
        f.write("not json\n")
    store.append([_rec("m", "s", "f", 1)])
    with pytest.raises(ValueError, match=r"results.jsonl:2: not a JSON record"):
        read_results(tmp_path)


def test_shards_merge(tmp_path):
    ResultsStore(tmp_path, shard=0).append([_rec("m", "a", "f", 0)])
    ResultsStore(tmp_path, shard=1).append([_rec("m", "b", "f", 0)])
    assert sorted(read_results(tmp_path)["study_id"]) == ["a", "b"]


def test_records_must_match_their_study(tmp_path):
    with pytest.raises(ValueError, match="written under"):
        ResultsStore(tmp_path).write_study("m", "other", [_rec("m", "s", "f", 0)], {})


def test_rescoring_some_rows_keeps_the_other_maps_of_the_study(tmp_path):
    """A failed row retried on resume is written alone: its siblings' maps must survive."""
    store = ResultsStore(tmp_path)
    a, b = np.full((1, 4), 0.25, np.float32), np.full((1, 4), 0.5, np.float32)
    first = [_rec("m", "s", "f", 0), _rec("m", "s", "f", 1, "failed")]
    store.write_study("m", "s", first, {map_key("f", 0): ((0,), a)})
    store.write_study("m", "s", [_rec("m", "s", "f", 1)], {map_key("f", 1): ((0,), b)})
    assert load_map(tmp_path, "m", "s", "f", 0) is not None, "variant 0's map was lost"
    assert np.allclose(load_map(tmp_path, "m", "s", "f", 1)[1], b)
