"""Reading stored maps by kind: the one place figures, grounding, faithfulness and the viewer
get a map from, each taking the kind as a parameter and never special-casing one.

Kinds (READ_KINDS):
    attention   the raw query-to-image attention rows, as stored
    relative    attention / the study's generic-prompt attention, per layer (and head), then
                combined like any other map (Zhang et al., "MLLMs know where to look", ICLR
                2025, divide one chosen layer's head-mean attention by the generic prompt's;
                with several layers we average the per-layer ratios). The generic map is
                stored in float32; where it is exactly 0 (underflow) the ratio is undefined and
                the map is reported missing with that reason, never filled in.
    generic     the generic prompt's own attention ("Write a general description of the image.")
    gradxinput, relevancy   gradient-based maps, where a run stored them

A stored map is [L, n] (head-aggregated) or [L, H, n] (head mode "none") over the image
tokens, row-major on the model's grid; `get` returns the [n] combination: the mean over the
chosen layers (and heads).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medvlm.analysis.sinks import NORM_FINDING, NORM_KIND
from medvlm.core.store import GENERIC_FINDING, MAP_KINDS, load_study_maps, map_key

READ_KINDS = ("attention", "relative", *[k for k in MAP_KINDS if k != "attention"])


class MapUnavailable(LookupError):
    """A map that cannot be given (absent, or undefined for a stated reason)."""


class MapReader:
    """Maps of one output folder, read lazily (the last `cache` studies' files kept).

    output_dir  the run's folder (attention/<model>/<study>.npz)
    """

    def __init__(self, output_dir: str | os.PathLike, cache: int = 64):
        self.output_dir = Path(output_dir)
        self._study = functools.lru_cache(maxsize=cache)(self._load)

    def _load(self, model: str, study: str) -> dict[str, np.ndarray]:
        return load_study_maps(self.output_dir, model, study)

    def _stored(self, model: str, study: str, finding: str, variant: int, kind: str):
        z = self._study(model, str(study))
        key = map_key(finding, variant, kind)
        if key not in z:
            raise MapUnavailable(f"no {kind} map for {model} / {study} / {finding} / variant {variant}")
        return tuple(int(x) for x in z[f"{key}|layers"]), z[key].astype(np.float64)

    def layered(self, model: str, study: str, finding: str, variant: int, kind: str = "attention"):
        """(layers (L,), maps [L, n] or [L, H, n] float64) of one kind; MapUnavailable if not."""
        check_kind(kind)
        if kind == "generic":
            return self._stored(model, study, GENERIC_FINDING, 0, "generic")
        if kind == NORM_KIND:  # study-level: the same array whatever the finding and variant
            return self._stored(model, study, NORM_FINDING, 0, NORM_KIND)
        if kind != "relative":
            return self._stored(model, study, finding, variant, kind)
        layers, att = self._stored(model, study, finding, variant, "attention")
        g_layers, generic = self._stored(model, study, GENERIC_FINDING, 0, "generic")
        if g_layers != layers or generic.shape != att.shape:
            raise MapUnavailable(
                f"relative map of {model} / {study}: the generic map has layers {g_layers} and shape "
                f"{generic.shape}, the question's {layers} and {att.shape}"
            )
        zero = int(np.count_nonzero(generic <= 0))
        if zero:
            raise MapUnavailable(
                f"relative map of {model} / {study} / {finding} / variant {variant} undefined: the generic "
                f"prompt's attention is 0 at {zero} of {generic.size} entries"
            )
        return layers, att / generic

    def get(
        self,
        model: str,
        study: str,
        finding: str,
        variant: int,
        kind: str = "attention",
        *,
        layers: Sequence[int] | None = None,
        exclude: Sequence[int] = (),
    ) -> np.ndarray:
        """[n] float64: the map of one kind, mean over `layers` (default: every stored layer)
        and heads; tokens in `exclude` (e.g. attention sinks) set to 0. MapUnavailable if the
        map is absent or undefined."""
        stored_layers, maps = self.layered(model, study, finding, variant, kind)
        if layers is not None:
            missing = sorted(set(layers) - set(stored_layers))
            if missing:
                raise MapUnavailable(f"layers {missing} were not stored (stored: {list(stored_layers)})")
            maps = maps[[stored_layers.index(int(x)) for x in layers]]
        out = maps.reshape(maps.shape[0], -1, maps.shape[-1]).mean(axis=(0, 1))
        if len(exclude):
            out = out.copy()
            out[np.asarray(exclude, dtype=int)] = 0.0
        return out

    def getter(self, kind: str = "attention", *, exclude: dict | None = None):
        """get_map(model, study, finding, variant) -> [n] or None, as medvlm.analysis.analysis takes it;
        exclude: {model: token positions} to zero (sinks)."""
        check_kind(kind)

        def get_map(model, study, finding, variant):
            try:
                return self.get(model, study, finding, variant, kind, exclude=(exclude or {}).get(model, ()))
            except MapUnavailable:
                return None

        return get_map


def check_kind(kind: str) -> str:
    if kind not in READ_KINDS:
        raise ValueError(f"unknown map kind {kind!r}; valid: {', '.join(READ_KINDS)}")
    return kind
