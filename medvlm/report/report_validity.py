"""report.md's validity sections ("Image reliance", "Grounding", "Attention sinks") and the
glossary entries of their numbers (medvlm.report.report_md renders them with the rest)."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from medvlm.analysis.sinks import GLOSSARY as SINK_SENTENCES
from medvlm.report.forest import format_estimate
from medvlm.report.report_md import Term, summary_table

VALIDITY_TERMS: tuple[Term, ...] = (
    Term("abs_delta_p_text_only", "Mean |delta P(yes)| (text only; blank likewise)",
         "The mean over answered rows of |P(yes | image) - P(yes | the same question without the image)| "
         "(abs_delta_p_blank: with a uniform grey image instead); 0 means the image changed nothing.",
         better="neither"),
    Term("answer_change_text_only", "Answer change (text only; blank likewise)",
         "The share of answered rows whose yes/no answer differs between the image and the control "
         "(answer_change_blank for the grey image).", better="neither"),
    Term("quadrants", "Consistency x image-dependence quadrants (q_consistent_dependent, ...)",
         "The share of complete (study, finding) groups that are consistent (all six judgements agree) or not, "
         "and image-dependent (the mean over the six wordings of |P(yes | image) - P(yes | text only)| is at "
         "least --image_dependence_threshold, 0.1 by default) or not; a consistent but image-independent model "
         "answers from the text alone."),
    Term("relative", "Relative attention",
         "A map divided token by token by the same study's attention for the generic prompt 'Write a general "
         "description of the image.' in the same template, per layer, then averaged over layers (the source "
         "divides one chosen layer); undefined, never filled in, where the generic map is 0.",
         "Zhang et al., 'MLLMs know where to look', ICLR 2025"),
    Term("pointing_hit", "Pointing hit",
         "1 when the map's most-attended pixel (the map resized bilinearly to the image) lies in the expert region, "
         "else 0, over the part of the image the model saw; the uniform map and the prior score their expected "
         "hit under random tie-breaking.", "Saporta et al., Nat. Mach. Intell. 2022 (CheXlocalize)", "higher"),
    Term("energy", "Energy in region",
         "The share of the map's mass (resized to the image) that falls inside the region; the uniform map scores "
         "the region's area share (uniform_energy) and energy_lift is the ratio of the two.",
         "Wang et al., CVPRW 2020 (Score-CAM energy-based pointing game)", "higher"),
    Term("otsu_iou", "Otsu IoU",
         "The intersection over union between the region and the map min-max normalised and binarised at Otsu's "
         "threshold.", "Saporta et al., Nat. Mach. Intell. 2022 (CheXlocalize)", "higher"),
    Term("cnr", "CNR",
         "|mean inside - mean outside| / sqrt(var inside + var outside) of the map over the region and the rest of "
         "the seen image.", "Boecking et al., ECCV 2022 (BioViL, MS-CXR)", "higher"),
    Term("baselines", "Baselines (uniform_*, prior_*, *_minus_prior)",
         "Each grounding metric of a uniform map and of a centred Gaussian prior (sigma a quarter of each image "
         "side), computed as for the model's map, and the model's paired difference from the prior."),
    Term("not_seen", "Not seen",
         "A region wholly outside what the model saw (LLaVA-Rad's center crop): counted, left out of every rate, "
         "never a miss."),
    *(Term(k, k.replace("_", " "), v) for k, v in SINK_SENTENCES.items()),
)


def _slice(table: pd.DataFrame, **where) -> pd.DataFrame:
    t = table
    for k, v in where.items():
        if k in t:
            t = t[t[k].astype(str) == str(v)]
    return t


def reliance_section(controls: pd.DataFrame, quadrants: pd.DataFrame, unit: str, threshold: float) -> list[str]:
    if controls is None or controls.empty:
        return []
    lines = ["## Image reliance", "",
             "Each question was also answered without the image (text only) and/or on a uniform grey image "
             "(blank), in the same pass. If P(yes) barely moves, the answer does not use the image.", ""]  # fmt: skip
    lines += summary_table(_slice(controls, finding="ALL").drop(columns=["finding"], errors="ignore"), unit)
    if quadrants is not None and len(quadrants):
        lines += ["", f"Quadrants over complete (study, finding) groups (image-dependent: mean |delta P(yes)| >= "
                  f"{threshold:g} against text only):", "", "| model | consistent & image-dependent | consistent & "
                  "image-independent | inconsistent & image-dependent | inconsistent & image-independent | groups |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for model, g in quadrants.groupby("model"):
            cells = [format_estimate(g[c].mean()) for c in ("q_consistent_dependent", "q_consistent_independent",
                                                            "q_inconsistent_dependent", "q_inconsistent_independent")]
            lines.append(f"| {model} | " + " | ".join(cells) + f" | {len(g)} |")
        lines += ["", "Intervals for each quadrant share are in controls.csv."]
    return lines + [""]


def grounding_section(grounding: pd.DataFrame, units: pd.DataFrame, regions: Mapping | None, notes, unit: str):
    if regions is None:
        return []
    lines = ["## Grounding", "",
             "Is the attention on the finding? Each map (by kind: raw, relative) against the expert region of "
             "every question whose finding is present, beside a uniform map and a centred Gaussian prior.", ""]
    lines += [f"- {n}" for n in notes]
    if units is not None and len(units) and "status" in units:
        counts = units.groupby(["map_kind", "status"]).size()
        lines.append("- Units by status: " + "; ".join(f"{k} {s}: {n}" for (k, s), n in counts.items()) + ".")
    if grounding is None or grounding.empty:
        return lines + ["", "No question with a present finding had a region the model saw.", ""]
    shown = _slice(grounding, variant_id="all", finding="ALL")
    shown = shown[shown["metric"].isin(["pointing_hit", "energy", "energy_lift", "otsu_iou", "cnr",
                                        "prior_pointing_hit", "uniform_energy", "pointing_hit_minus_prior"])]
    for kind, t in shown.groupby("map_kind", sort=False):
        lines += ["", f"Map kind **{kind}**:", "", *summary_table(t.drop(columns=["map_kind", "variant_id"]), unit)]
    lines += ["", "Per finding and per paraphrase: grounding.csv; per question: grounding_rows.csv."]
    return lines + [""]


def sinks_section(sinks_manifest: Mapping | None, excluded: bool) -> list[str]:
    if not sinks_manifest:
        return []
    lines = ["## Attention sinks", "",
             "Image positions that draw attention whatever the question (recurrent sinks) and image tokens with "
             "outlying hidden-state norms; per layer with intervals in sinks.csv.", ""]
    for model, positions in (sinks_manifest.get("positions") or {}).items():
        cells = (sinks_manifest.get("cells") or {}).get(model)
        where = f" (grid cells {cells})" if cells else ""
        lines.append(f"- {model}: {len(positions)} recurrent sink position(s): {positions}{where}.")
    lines.append(f"- Sinks {'were' if excluded else 'were not'} removed from the maps of figures and grounding "
                 f"(--exclude_sinks).")  # fmt: skip
    return lines + [""]
