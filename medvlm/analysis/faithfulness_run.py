"""A run's gradient maps and faithfulness phase (issue: does what the model looks at matter?).

- add_gradient_maps: after a scoring pass, the gradient maps (--attribution gradxinput,
  relevancy) of its questions go into the same maps files, kinds "gradxinput" / "relevancy".
- run_faithfulness: while a model is loaded, deletion and insertion curves for every chosen
  unit (study, finding, variant in --faithfulness_variants) and every map kind stored for it,
  appended to faithfulness_units.jsonl (one row per unit and map, curves compact); a study whose
  units are already there is skipped, and units made with other settings are refused.
- faithfulness_outputs: faithfulness.csv, the curves figure's data, the report section's settings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medvlm.core.maps import MapReader, MapUnavailable
from medvlm.core.store import read_results
from medvlm.data.images import load_image

UNITS_FILE = "faithfulness_units.jsonl"
SETTING_KEYS = ("steps", "substrate", "n_random", "seed")


def add_gradient_maps(backend, results, images: dict, kinds: Sequence[str], rows_per_pass=None) -> None:
    """Add the gradient maps of `kinds` to each study's maps in `results` ([(study_id, records,
    maps)], as pipeline.score_studies returns them; maps updated in place) for its ok rows.
    images: {study_id: the study's image}."""
    from medvlm.core.attribution import attribution_maps

    items, keys, where = [], [], []
    for study, records, maps in results:
        ok = [r for r in records if r["status"] == "ok"]
        if not ok or study not in images:
            continue
        items.append((images[study], [r["question"] for r in ok], [r["finding"] for r in ok]))
        keys.append([(r["finding"], int(r["variant_id"])) for r in ok])
        where.append((maps, [r["answer"] for r in ok]))
    if not items:
        return
    att = attribution_maps(backend, items, kinds, rows_per_pass=rows_per_pass,
                           answers=[a for _, answers in where for a in answers])  # fmt: skip
    start = 0
    for (maps, _), k in zip(where, keys, strict=True):
        maps.update(att.select(slice(start, start + len(k))).store_entries(k))
        start += len(k)


def _settings(row) -> tuple:
    return tuple(row.get(k) for k in SETTING_KEYS)


def run_faithfulness(backend, model: str, output_dir: Path, rows: pd.DataFrame, fcfg, kinds: Sequence[str],
                     *, max_studies: int | Sequence[str | tuple[str, str]] | None = None,
                     batch: int = 8) -> dict:  # fmt: skip
    """Curves for the ok records of `model` among `rows`' studies, maps of `kinds` read from
    the store. max_studies: None (every study), N (the first N studies in the results' order,
    done ones included: a rerun completes them, never adds N more), or a selection of those
    in the run (the demo's subset), each entry a study id (all its findings) or a (study id,
    finding) pair (that finding's units only). A unit (study, finding, paraphrase) already in
    the units file is never curved again, so a rerun of a wider selection completes what a
    narrower one left. Returns counts for the manifest: the ids of the studies curved now,
    the units curved now and those skipped as done (skipped_done)."""
    from medvlm.analysis.faithfulness import faithfulness_for_studies, merge_curves, parse_variants
    from medvlm.core.preflight import UsageError

    path = Path(output_dir) / UNITS_FILE
    done, mine = set(), (fcfg.steps, fcfg.substrate, fcfg.n_random, fcfg.seed)  # done: (study, finding, variant)
    if path.exists():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if r.get("model") == model:
                if _settings(r) != mine:
                    raise UsageError(f"{path} holds {model} units made with steps/substrate/n_random/seed "
                                     f"{_settings(r)}, now {mine}: use a new --output_dir or --overwrite")
                done.add(_unit(r["study_id"], r["finding"], r["variant_id"]))
    df = read_results(output_dir)
    ok = df[(df["model"] == model) & (df["status"] == "ok") & df["study_id"].isin(set(rows["study_id"].astype(str)))]
    variants = parse_variants(fcfg.variants)
    if variants is not None:
        ok = ok[ok["variant_id"].isin(variants)]
    chosen = list(dict.fromkeys(ok["study_id"]))
    if isinstance(max_studies, int):
        chosen = chosen[:max_studies]
    elif max_studies is not None:
        only = _selection(max_studies)  # study id -> the findings curved (None: all of them)
        chosen = [s for s in chosen if s in only]
        wanted = [s in only and (only[s] is None or str(f) in only[s])
                  for s, f in zip(ok["study_id"], ok["finding"], strict=True)]  # fmt: skip
        ok = ok.loc[np.array(wanted, dtype=bool)]
    ok = ok[ok["study_id"].isin(chosen)]
    # units already curved (by an earlier run, perhaps of another selection) are not curved again
    pending = [_unit(s, f, v) not in done for s, f, v in zip(ok["study_id"], ok["finding"], ok["variant_id"],
                                                              strict=True)]  # fmt: skip
    todo = ok.loc[np.array(pending, dtype=bool)]
    left = set(todo["study_id"])
    studies = [s for s in chosen if s in left]
    reader = MapReader(output_dir)
    counts = {"studies": len(studies), "skipped_done": int(len(ok) - len(todo)), "units": 0, "rows": 0,
              "study_ids": studies}  # fmt: skip
    for i in range(0, len(studies), batch):
        chunk = []
        for study in studies[i : i + batch]:
            srows = todo[todo["study_id"] == study]
            maps = {}
            for kind in kinds:
                entries = []
                for r in srows.itertuples():
                    try:
                        entries.append(reader.get(model, study, r.finding, int(r.variant_id), kind))
                    except MapUnavailable as e:
                        entries.append(str(e))
                maps[kind] = entries
            rows_ = [{"finding": r.finding, "variant_id": int(r.variant_id), "question": r.question,
                      "answer": r.answer} for r in srows.itertuples()]  # fmt: skip
            chunk.append((study, load_image(srows.iloc[0]["image_path"]).image, rows_, maps))
        records, curves = faithfulness_for_studies(backend, chunk, fcfg, model=model)
        merged = merge_curves(records, curves)
        clusters = dict(zip(ok["study_id"], ok["cluster_id"], strict=False))
        lines = "".join(json.dumps({**r, "cluster_id": clusters.get(r["study_id"])}, default=_plain) + "\n"
                        for r in merged)  # fmt: skip
        with open(path, "a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
        counts["rows"] += len(merged)
        counts["units"] += len({(r["study_id"], r["finding"], r["variant_id"]) for r in merged})
    return counts


def _unit(study, finding, variant) -> tuple[str, str, int]:
    return str(study), str(finding), int(variant)


def _selection(entries) -> dict:
    """max_studies' entries -> {study id: None (every finding) or the set of findings}."""
    only: dict = {}
    for e in entries:
        if isinstance(e, (tuple, list)):
            if len(e) != 2:
                raise ValueError(f"a faithfulness selection entry is a study id or (study id, finding), got {e!r}")
            study, finding = str(e[0]), str(e[1])
            if study not in only or only[study] is not None:
                only.setdefault(study, set()).add(finding)
        else:
            only[str(e)] = None  # the whole study, whatever else names it
    return only


def _plain(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot store {type(o).__name__}")


def read_units(output_dir: Path) -> pd.DataFrame:
    """faithfulness_units.jsonl as a DataFrame (empty when absent)."""
    path = Path(output_dir) / UNITS_FILE
    if not path.exists():
        return pd.DataFrame()
    return pd.read_json(path, lines=True, dtype={"study_id": str})
