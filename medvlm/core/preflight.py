"""Checks a run makes before it writes anything or loads a model, and the output folder's rules.

- :class:`UsageError`: a user mistake; the CLI prints its one line and exits 2 (no traceback
  unless --debug).
- :func:`layer_count` / :func:`check_layers`: ``--layers`` against each model's layer count,
  known before its weights load (the tiny and full-size random models' shapes, a local
  folder's config.json, the hub cache's config.json, or the official model's known count).
- :func:`requested_settings` / :func:`loaded_settings` / :class:`SettingsFile`: the settings
  that change results, kept per model in ``<output_dir>/settings.json``; a rerun into a folder
  whose stored rows were made with other settings is refused with every difference named.
- :data:`TOOL_OUTPUTS` / :func:`overwrite_targets`: exactly what ``--overwrite`` removes (what
  this tool writes), never anything else; :func:`check_overwrite_safe` refuses an output
  folder that holds the input CSV or an image the CSV names; :func:`check_outputs_are_the_tools`
  refuses a folder whose files of those names no run of this tool left (the user's own).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path

from medvlm.core.config import MedicalAttentionConfig, RunConfig, resolve_layers


class UsageError(Exception):
    """A user mistake (bad flags, a folder that cannot be used, settings that differ from the
    stored rows'): reported as one line, exit code 2."""


# ---------------------------------------------------------------------------- output folder
# What this tool writes into --output_dir (file-name patterns, then folders). --overwrite
# removes these and nothing else.
TOOL_FILES = (
    "results.jsonl",
    "results.shard-*.jsonl",
    "manifest.json",
    "manifest.shard-*.json",
    "manifest.tmp",
    "manifest.shard-*.tmp",
    "done.shard-*",
    "settings.json",
    "settings.json.tmp",
    "summary.csv",
    "per_finding.csv",
    "per_study.csv",
    "grounding.csv",
    "controls.csv",
    "faithfulness.csv",
    "faithfulness_units.jsonl",
    "sinks.csv",
    "grounding_rows.csv",
    "report.md",
    "analysis_error.log",
)
TOOL_DIRS = ("attention", "figures", "tiny_models", "demo_data")
TOOL_OUTPUTS = TOOL_FILES + tuple(f"{d}/" for d in TOOL_DIRS)


def overwrite_targets(output_dir: Path) -> list[Path]:
    """The existing entries of output_dir that --overwrite removes (TOOL_OUTPUTS), sorted."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    hits = []
    for entry in out.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            if entry.name in TOOL_DIRS:
                hits.append(entry)
        elif any(fnmatch.fnmatchcase(entry.name, pat) for pat in TOOL_FILES):
            hits.append(entry)
    return sorted(hits)


#: what only a run of this tool leaves in --output_dir (settings.json is written before the first
#: results row; the demo writes demo_data/ before loading a model, so a demo stopped then goes on)
TOOL_MARKERS = ("manifest.json", "manifest.shard-*.json", "settings.json", "demo_data")


def check_outputs_are_the_tools(output_dir: Path) -> None:
    """Refuse a folder that holds entries with the names this tool writes (summary.csv, report.md,
    figures/ ...) but none of its run records (TOOL_MARKERS): they are the user's own, and a run
    would write over them, or --overwrite remove them."""
    out = Path(output_dir)
    targets = overwrite_targets(out)
    if not targets or any(any(out.glob(m)) for m in TOOL_MARKERS):
        return
    names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in targets[:4])
    more = f" and {len(targets) - 4} more" if len(targets) > 4 else ""
    raise UsageError(f"--output_dir {out} holds {names}{more}, names this tool writes, but no manifest.json or "
                     f"settings.json of a run of it: they look like your own files; choose another --output_dir")


def _foreign_entries(folder: Path) -> list[Path]:
    """What a tool folder (figures/, attention/) holds that this tool does not write there: the
    user's own (a notes file, a plot of theirs), which --overwrite must not remove with it."""
    if folder.name == "figures":  # any PNG: earlier versions named their figures otherwise
        return sorted(p for p in folder.iterdir() if p.is_symlink() or not (p.is_file() and p.suffix == ".png"))
    if folder.name == "attention":
        return sorted(p for m in folder.iterdir()
                      for p in (m.iterdir() if m.is_dir() and not m.is_symlink() else [m])
                      if p.is_symlink() or not (p.is_file() and p.name.endswith(".npz")))  # fmt: skip
    return []


def remove_tool_outputs(output_dir: Path) -> list[Path]:
    """Remove overwrite_targets(output_dir); returns what was removed. Refused, with nothing
    removed, when figures/ or attention/ holds a file this tool does not write there."""
    removed = overwrite_targets(output_dir)
    for p in removed:
        foreign = _foreign_entries(p) if p.is_dir() and not p.is_symlink() else []
        if foreign:
            raise UsageError(f"--overwrite refused: {foreign[0]} is not a file this tool writes, and --overwrite "
                             f"would remove {p.name}/ with it; move it out of {output_dir} first")
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return removed


def _parts_inside(path: Path, folder: Path) -> tuple[str, ...] | None:
    """path's parts below folder, links resolved (() for the folder itself); None when outside it."""
    try:
        return Path(os.path.realpath(path)).relative_to(os.path.realpath(folder)).parts
    except ValueError:
        return None


def check_output_dir(output_dir: Path) -> None:
    """The output folder can be used: it is a folder (or does not exist yet, under a folder)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is a file, not a folder")
    parent = out if out.exists() else next((p for p in out.absolute().parents if p.exists()), None)
    if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
        raise UsageError(f"--output_dir {out}: cannot write in {parent}")


def check_overwrite_safe(output_dir: Path, user_files: Iterable[Path]) -> None:
    """Refuse --overwrite on a folder that holds the input CSV or an image the CSV names (the
    user's own files live there: it must not be the tool's output folder)."""
    for f in user_files:
        if _parts_inside(f, output_dir) is not None:
            raise UsageError(
                f"--overwrite refused: --output_dir {output_dir} holds your input file {f}; "
                f"write the results to a folder of their own"
            )


def check_inputs_are_not_outputs(output_dir: Path, user_files: Iterable[Path]) -> None:
    """Refuse a run whose input file (the CSV, an image, a region file) lies where this tool
    writes in --output_dir (a top-level summary.csv, anything under figures/ ...): the run would
    write over it, or remove it as a stale figure."""
    for f in user_files:
        parts = _parts_inside(f, output_dir)
        if parts and (parts[0] in TOOL_DIRS if len(parts) > 1 else
                      any(fnmatch.fnmatchcase(parts[0], pat) for pat in TOOL_FILES)):  # fmt: skip
            raise UsageError(f"your input file {f} lies where this tool writes in --output_dir {output_dir}; "
                             f"move it, or write the results to a folder of their own")


# ---------------------------------------------------------------------------- layers
# Decoder layer counts of the official checkpoints (checked again against the loaded config).
KNOWN_LAYERS = {"microsoft/llava-rad": 32, "lmsys/vicuna-7b-v1.5": 32, "google/medgemma-4b-it": 34}


def _config_layers(config: dict) -> int | None:
    for c in (config.get("text_config") or {}, config):
        if isinstance(c.get("num_hidden_layers"), int):
            return int(c["num_hidden_layers"])
    return None


def _folder_or_cached_config(path_or_id: str) -> dict | None:
    p = Path(os.path.expanduser(path_or_id))
    if p.is_dir():
        cfg = p / "config.json"
        return json.loads(cfg.read_text()) if cfg.is_file() else None
    try:  # the hub cache, never the network
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(path_or_id, "config.json")
    except Exception:  # noqa: BLE001 - not a hub id, or no cache: the count stays unknown
        return None
    return json.loads(Path(hit).read_text()) if isinstance(hit, str) else None


def layer_count(model: str, cfg: RunConfig) -> tuple[int | None, str]:
    """(decoder layers, where the number comes from) for one model of a run, before loading;
    (None, reason) when it cannot be known until the weights load."""
    if cfg.random_models is not None:
        if model == "llava_rad":
            from medvlm.core.tiny_llava_rad import TINY_LLAMA, VICUNA_7B

            shapes = VICUNA_7B if cfg.random_models == "full" else TINY_LLAMA
            return int(shapes["num_hidden_layers"]), f"the {cfg.random_models} random model"
        from medvlm.core.tiny_medgemma import DEMO_SHAPES, MEDGEMMA_4B_SHAPES

        shapes = MEDGEMMA_4B_SHAPES if cfg.random_models == "full" else DEMO_SHAPES  # what the CLI builds
        return int(shapes["text"]["num_hidden_layers"]), f"the {cfg.random_models} random model"
    source = cfg.llava_rad_base if model == "llava_rad" else cfg.medgemma_model
    config = _folder_or_cached_config(source)
    n = _config_layers(config) if config else None
    if n is not None:
        return n, f"{source}/config.json"
    if source in KNOWN_LAYERS:
        return KNOWN_LAYERS[source], source
    return None, f"{source} (not a local folder and not in the hub cache)"


def check_layers(cfg: RunConfig) -> None:
    """--layers fits every model of the run (UsageError naming the valid range otherwise)."""
    for model in cfg.models:
        n, source = layer_count(model, cfg)
        if n is None:
            continue  # checked against the loaded config, before any scoring
        try:
            resolve_layers(cfg.attention.layers, n)
        except ValueError as e:
            raise UsageError(f"--layers for {model}: {e} ({source})") from None


# ---------------------------------------------------------------------------- settings
# describe() keys that change results (batch size, compile, figures and timing never do).
LOADED_KEYS = (
    "model_id",
    "model_base",
    "revision",
    "base_revision",
    "dtype",
    "quantization",
    "prompt_template",
    "query_mode",
    "layers",
    "head_mode",
    "answer_suffix",
    "preprocessing",
    "grid",
    "n_image_tokens",
    "answer_token_ids",
    "random_weights",
    "controls",
    "text_only_template",
    "generic_prompt",
)


def requested_settings(model: str, cfg: RunConfig) -> dict:
    """The settings of one model's run that change its results, as asked for (before loading)."""
    a = cfg.attention
    ids = (
        {"random_models": cfg.random_models}
        if cfg.random_models is not None
        else {"model": cfg.llava_rad_model, "base": cfg.llava_rad_base}
        if model == "llava_rad"
        else {"model": cfg.medgemma_model}
    )
    return {
        **ids,
        "dtype": cfg.dtype,
        "quantization": cfg.quantization,
        "query_mode": a.query_mode,
        "layers": list(a.layers) if isinstance(a.layers, tuple) else a.layers,
        "head_mode": a.attention_head_mode,
        "answer_suffix": a.answer_suffix,
        "generate": a.generate,
        "max_new_tokens": a.max_new_tokens if a.generate else None,
        "controls": list(a.controls),
        "generic_prompt": a.generic_prompt,
        "attribution": [k for k in cfg.attribution if k != "attention"],
    }


def loaded_settings(describe: dict) -> dict:
    """The result-changing facts of a loaded backend (its describe()), JSON-normalised."""
    return json.loads(json.dumps({k: describe[k] for k in LOADED_KEYS if k in describe}, default=str))


def settings_hash(settings: dict) -> str:
    """A short fingerprint of a model's settings, stored in each of its records."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def differences(stored: dict, new: dict) -> list[str]:
    """'key: stored X, now Y' for every key whose value differs (a key absent on one side
    counts as None there)."""
    out = []
    for k in sorted(set(stored) | set(new)):
        if stored.get(k) != new.get(k):
            out.append(f"{k}: stored {stored.get(k)!r}, now {new.get(k)!r}")
    return out


def _refusal(model: str, diffs: list[str], output_dir: Path) -> UsageError:
    return UsageError(
        f"{output_dir} holds {model} results made with other settings: {'; '.join(diffs)}. "
        f"Use a new --output_dir, or --overwrite to replace the results stored there"
    )


class SettingsFile:
    """<output_dir>/settings.json: {"models": {model: {"requested": {...}, "loaded": {...}}}},
    the settings each model's stored rows were made with."""

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / "settings.json"
        try:
            self.data = json.loads(self.path.read_text()) if self.path.exists() else {}
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"{self.path}: cannot read ({e}); use a new --output_dir or --overwrite") from None
        self.data.setdefault("models", {})

    def adopt_manifest(self, manifest: dict, models: Iterable[str]) -> None:
        """A folder written before settings.json existed: take the settings of `models` (those
        with stored rows and no entry here) from its manifest.json (config and describe())."""
        for model in models:
            if self.stored(model) is not None or model not in manifest.get("models", {}):
                continue
            entry = {"loaded": loaded_settings(manifest["models"][model])}
            cfg = _config_from_json(manifest.get("config"))
            if cfg is not None:
                entry["requested"] = requested_settings(model, cfg)
            self.data["models"][model] = entry

    def stored(self, model: str) -> dict | None:
        return self.data["models"].get(model)

    def check_requested(self, models: Iterable[str], cfg: RunConfig) -> None:
        """Before loading: each model's requested settings equal its stored ones (one UsageError
        naming every difference of every model if not)."""
        diffs = []
        for model in models:
            old = self.stored(model)
            if old is not None and "requested" in old:
                diffs += [f"{model} {d}" for d in differences(old["requested"], requested_settings(model, cfg))]
        if diffs:
            raise _refusal("model", diffs, self.output_dir)

    def check_loaded(self, model: str, describe: dict) -> None:
        """After loading, before scoring: the loaded model's facts equal the stored ones."""
        old = self.stored(model)
        if old is not None:
            diffs = differences(old.get("loaded", {}), loaded_settings(describe))
            if diffs:
                raise _refusal(model, diffs, self.output_dir)

    def record(self, model: str, cfg: RunConfig, describe: dict) -> str:
        """Store the model's settings (first run into the folder); returns their hash."""
        entry = {"requested": requested_settings(model, cfg), "loaded": loaded_settings(describe)}
        if self.stored(model) is None:
            self.data["models"][model] = entry
            tmp = self.path.with_name("settings.json.tmp")
            tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True))
            tmp.replace(self.path)
        return settings_hash(self.data["models"][model])


def _config_from_json(d: dict | None) -> RunConfig | None:
    """The RunConfig a manifest recorded (RunConfig.to_json()), or None when it cannot be read."""
    if not isinstance(d, dict) or not isinstance(d.get("attention"), dict):
        return None
    try:
        att = dict(d["attention"])
        if isinstance(att.get("layers"), list):
            att["layers"] = tuple(att["layers"])
        names = {f.name for f in fields(RunConfig)}
        kw = {k: v for k, v in d.items() if k in names and k not in ("attention", "models", "rank", "world_size")}
        kw["output_dir"] = Path(kw.get("output_dir", "."))
        return RunConfig(**kw, attention=MedicalAttentionConfig(**att))
    except (TypeError, ValueError):
        return None
