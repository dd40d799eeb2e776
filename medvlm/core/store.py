"""The results store: an append-only results.jsonl plus per-study attention maps.

    output_dir/results.jsonl                 one record per (model, study_id, finding, variant_id)
    output_dir/results.shard-R.jsonl         the same, one file per process when sharded
    output_dir/attention/<model>/<study>-<hash>.npz  the study's maps keyed map_key(finding,
                                             variant_id, kind), with "<key>|layers" holding the
                                             layer indices (see map_path for the file name)

Map kinds (MAP_KINDS): "attention" (the raw query-to-image rows; key "<finding>|<variant>", as
before kinds existed), "generic" (the generic prompt's attention, once per study: finding
GENERIC_FINDING, variant 0), "gradxinput", "relevancy", "token_norm" (each image token's
hidden-state norm entering each layer read, once per study: finding medvlm.analysis.sinks.NORM_FINDING,
variant 0). Float16 except FLOAT32_KINDS (the generic map is a denominator of relative
attention; gradient maps are signed and small).
Derived kinds (relative) are computed when read (medvlm.core.maps), never stored.

Crash safety: a study's maps are written to a temporary file and renamed into place before
its records are appended; records are flushed and fsynced as written. A process killed
mid-study leaves either no records for that study (it is redone on resume; the maps file is
replaced) or a partial last line, which is cut off before the next append. A key written
again (a failed row retried on resume) supersedes the earlier record when read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

KEY = ("model", "study_id", "finding", "variant_id")
RESULTS_GLOB = "results*.jsonl"


def _safe_name(study_id: str) -> str:
    """A file name for a study id: readable where possible, unique always."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(study_id))[:60]
    digest = hashlib.sha1(str(study_id).encode()).hexdigest()[:10]
    return f"{stem}-{digest}"


MAP_KINDS = ("attention", "generic", "gradxinput", "relevancy", "token_norm")
FLOAT32_KINDS = ("generic", "gradxinput", "relevancy", "token_norm")
GENERIC_FINDING = "__generic__"


def map_key(finding: str, variant_id: int, kind: str = "attention") -> str:
    """The npz key of one map: "<finding>|<variant>" for raw attention, "<finding>|<variant>|<kind>"
    for the other stored kinds."""
    if kind not in MAP_KINDS:
        raise ValueError(f"unknown map kind {kind!r}; stored kinds: {', '.join(MAP_KINDS)}")
    base = f"{finding}|{int(variant_id)}"
    return base if kind == "attention" else f"{base}|{kind}"


def _key_kind(key: str) -> str:
    parts = key.split("|")
    return parts[2] if len(parts) == 3 and parts[2] in MAP_KINDS else "attention"


class ResultsFileError(ValueError):
    """A results*.jsonl line that is not a record (named by file and line): the CLI's one line, exit 2."""


class ResultsStore:
    """Append-only store for one output folder.

    shard  None for a single process; an integer rank to write results.shard-R.jsonl
    """

    def __init__(self, output_dir: str | os.PathLike, shard: int | None = None):
        self.root = Path(output_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        name = "results.jsonl" if shard is None else f"results.shard-{int(shard)}.jsonl"
        self.path = self.root / name
        self.record_fields: dict = {}  # added to every record written (e.g. the settings' hash)
        self._repair_tail()

    # -- writing -----------------------------------------------------------------------
    def _repair_tail(self) -> None:
        """Cut a partial last line left by a killed process (it was never a record)."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            data = self.path.read_bytes()
            cut = data.rfind(b"\n") + 1
            f.truncate(cut)

    def map_path(self, model: str, study_id: str) -> Path:
        return map_path(self.root, model, study_id)

    def write_study(self, model: str, study_id: str, records: list[dict], maps: dict[str, tuple]) -> None:
        """Write one study's maps (atomically, merged with any already stored for it), then
        append its records.

        records  dicts with at least the KEY fields, status and error
        maps     {map_key(finding, variant, kind): (layers [L] int, map [L, ...] float)}
        """
        for r in records:
            missing = [k for k in KEY if k not in r]
            if missing:
                raise ValueError(f"record lacks {missing}")
            if r["model"] != model or str(r["study_id"]) != str(study_id):
                raise ValueError(f"record for {r['model']}/{r['study_id']} written under {model}/{study_id}")
        if maps:
            path = self.map_path(model, study_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            # the study's maps already stored (rows scored in an earlier run) are kept: a
            # retried or relabelled row must not drop its siblings' maps
            arrays = load_study_maps(self.root, model, study_id)
            for key, (layers, att) in maps.items():
                dtype = np.float32 if _key_kind(key) in FLOAT32_KINDS else np.float16
                arrays[key] = np.asarray(att, dtype=dtype)
                arrays[f"{key}|layers"] = np.asarray(layers, dtype=np.int32)
            tmp = path.with_name(path.name + ".tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        self.append(records)

    def append(self, records: Iterable[dict]) -> None:
        lines = "".join(json.dumps({**r, **self.record_fields}, default=_json_default, allow_nan=True) + "\n"
                        for r in records)  # fmt: skip
        if not lines:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

    # -- reading -----------------------------------------------------------------------
    def done_keys(self, statuses: tuple[str, ...] = ("ok",)) -> set[tuple]:
        """Keys whose latest record has one of the statuses (default: finished rows)."""
        df = read_results(self.root)
        if df.empty:
            return set()
        df = df[df["status"].isin(statuses)]
        return {(m, str(s), f, int(v)) for m, s, f, v in df[list(KEY)].itertuples(index=False)}

    def load_map(self, model: str, study_id: str, finding: str, variant_id: int, kind: str = "attention"):
        """(layers [L], map [L, ...] float32) or None when absent."""
        return load_map(self.root, model, study_id, finding, variant_id, kind)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot store {type(o).__name__} in results.jsonl")


def read_results(output_dir: str | os.PathLike) -> pd.DataFrame:
    """Every results*.jsonl in the folder merged, the latest record per key kept.

    A malformed line other than an unterminated last line raises ResultsFileError naming the
    file and line; an unterminated last line (a killed writer) is skipped.
    """
    rows = []
    for path in sorted(Path(output_dir).glob(RESULTS_GLOB)):
        data = path.read_text(encoding="utf-8")
        lines = data.split("\n")
        for i, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if i == len(lines) and not data.endswith("\n"):
                    continue  # partial last line of a killed writer
                raise ResultsFileError(f"{path}:{i}: not a JSON record ({e.msg}); fix or delete that line (a rerun "
                                       f"scores a deleted row again)") from e
            rec["_source"] = path.name
            rec["_order"] = len(rows)
            rows.append(rec)
    if not rows:
        return pd.DataFrame(columns=[*KEY, "status"])
    df = pd.DataFrame(rows)
    df["study_id"] = df["study_id"].astype(str)
    df["variant_id"] = df["variant_id"].astype(int)
    df = df.sort_values("_order").drop_duplicates(list(KEY), keep="last")
    return df.drop(columns=["_order"]).reset_index(drop=True)


def map_path(output_dir, model: str, study_id: str) -> Path:
    """Where one (model, study)'s maps live."""
    return Path(output_dir) / "attention" / model / f"{_safe_name(study_id)}.npz"


def load_study_maps(output_dir, model: str, study_id: str) -> dict[str, np.ndarray]:
    """Every array of one (model, study)'s maps file ({} when absent), keyed as written."""
    path = map_path(output_dir, model, study_id)
    if not path.exists():
        return {}
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def load_map(output_dir, model: str, study_id: str, finding: str, variant_id: int, kind: str = "attention"):
    """(layers [L], map [L, ...] float32) or None when absent."""
    z = load_study_maps(output_dir, model, study_id)
    key = map_key(finding, variant_id, kind)
    if key not in z:
        return None
    return z[f"{key}|layers"].astype(int), z[key].astype(np.float32)
