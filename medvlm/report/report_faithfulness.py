"""report.md's "Faithfulness" section and the glossary entries of its numbers and maps
(medvlm.report.report_md renders Terms; the lead adds FAITHFULNESS_TERMS beside VALIDITY_TERMS)."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from medvlm.analysis.faithfulness import DIFF_METRICS, METRICS, RANDOM, map_sort_key
from medvlm.report.report_md import Term, summary_table

FAITHFULNESS_TERMS: tuple[Term, ...] = (
    Term("deletion_auc", "Deletion AUC",
         "The model's probability of the answer it gave (renormalised over yes/no) as the image's token cells are "
         "replaced, in the map's order, by the blurred image (or the normalisation's mean) in K equal steps, "
         "averaged by the trapezoid rule over the K + 1 points (0 to 1).",
         "Petsiuk et al., 'RISE', BMVC 2018", "lower"),
    Term("insertion_auc", "Insertion AUC",
         "The same probability as the token cells are restored in the map's order onto the fully blurred image, "
         "averaged the same way.", "Petsiuk et al., 'RISE', BMVC 2018", "higher"),
    Term("auc_minus_baseline", "AUC minus random / minus attention",
         "A map's deletion (insertion) AUC minus the same unit's AUC under R seeded random orders averaged "
         "(3 by default) (*_minus_random), or under the raw attention map (*_minus_attention), pooled over units: "
         "a paired difference; below 0 for deletion and above 0 for insertion means more faithful than the baseline."),
    Term("gradxinput", "Gradient x input",
         "For each image token, the gradient of the answer margin log(P(yes)/P(no)) at the answering position with "
         "respect to the decoder's input embedding of that token, times the embedding, summed over the hidden "
         "dimension; signed (positive pushes toward yes), ranked toward the answer given.",
         "Shrikumar et al., 2016 (gradient x input)"),
    Term("relevancy", "Generic attention relevancy",
         "R = I, then for every decoder layer R = R + A_bar R with A_bar the head mean of the positive part of "
         "(gradient of the given answer's margin with respect to the attention weights) x (the attention weights); "
         "the map is R's row at the answering position over the image tokens.",
         "Chefer, Gur & Wolf, ICCV 2021"),
)


def _sigmas(sigma) -> str:
    """The blur sigma(s) in model-input pixels, 2 decimals: "llava_rad 11.56, medgemma 2.86" or one value
    (the manifest keeps them unrounded)."""
    if isinstance(sigma, Mapping):
        return ", ".join(f"{m} {_sigmas(v)}" for m, v in sigma.items())
    try:
        return f"{float(sigma):.2f}"
    except (TypeError, ValueError):
        return str(sigma)


def _curved(units: Mapping | None) -> str:
    """'Units curved: 1 per model (00000001_000 cardiomegaly, paraphrase 0). ' from settings'
    "units" ({model: ["study / finding / paraphrase", ...]}): each unit named while few."""
    if not units:
        return ""
    counts = {m: len(u) for m, u in units.items()}
    n = set(counts.values())
    if len(n) == 1:
        (k,) = n
        text = f"Units curved: {k} per model"
    else:
        text = "Units curved: " + ", ".join(f"{m} {k}" for m, k in counts.items())
    names = sorted({u for us in units.values() for u in us})
    if len(names) <= 4:
        text += " (" + "; ".join(names) + ")"
    return text + ". "


def _orders(n) -> str:
    """'1 seeded random order', '3 seeded random orders'."""
    return f"{n} seeded random order{'' if n == 1 else 's'}"


def faithfulness_section(table: pd.DataFrame | None, unit: str, settings: Mapping,
                         figure: str | None = None) -> list[str]:  # fmt: skip
    """The section's markdown lines. table: faithfulness_table's output; settings: steps,
    substrate, blur_sigma (per model or one value), n_random, variants, units ({model: the
    units curved, "study finding, paraphrase v"}); figure: the curves figure's path relative
    to report.md."""
    if table is None or table.empty:
        return []
    lines = ["## Faithfulness", "",
             "Do the regions a map ranks high drive the answer? For each chosen (study, finding, paraphrase) the image "
             f"token cells are removed (deletion: replaced by the {settings.get('substrate', 'blur')} substrate) or "
             "restored onto the blurred image (insertion) in the map's order, in "
             f"{settings.get('steps')} steps, and the model's probability of the answer it gave is read each time "
             f"(Petsiuk et al., RISE, BMVC 2018). Baseline: {_orders(settings.get('n_random', 3))}. "
             f"Paraphrases: {settings.get('variants', '0')}; blur sigma (model-input pixels): "
             f"{_sigmas(settings.get('blur_sigma'))}. {_curved(settings.get('units'))}Deletion AUC: lower is more "
             "faithful; insertion AUC: higher.",
             ""]  # fmt: skip
    overall = table[table["finding"] == "ALL"]
    wanted = [*METRICS, *DIFF_METRICS[RANDOM], *DIFF_METRICS["attention"]]
    for name in sorted(overall["map"].unique(), key=map_sort_key):
        t = overall[(overall["map"] == name) & overall["metric"].isin(wanted)]
        lines += ["", f"Map **{name}**:", "", *summary_table(t.drop(columns=["map", "finding"]), unit)]
    best = _most_faithful(overall)
    if best:
        lines += ["", "Lowest deletion AUC / highest insertion AUC per model (point estimates; the intervals above "
                  "say whether the maps differ): " + "; ".join(best) + "."]  # fmt: skip
    if figure:
        lines += ["", f"![Deletion and insertion curves]({figure})"]
    lines += ["", "Per finding: faithfulness.csv; per unit and map: faithfulness_units in the results."]
    return lines + [""]


def _most_faithful(overall: pd.DataFrame) -> list[str]:
    out = []
    rows = overall[~overall["model"].astype(str).str.contains(" - ") & (overall["map"] != RANDOM)]
    for model, g in rows.groupby("model"):
        parts = []
        for metric, pick in (("deletion_auc", "idxmin"), ("insertion_auc", "idxmax")):
            m = g[g["metric"] == metric].dropna(subset=["estimate"])
            if len(m):
                parts.append(f"{metric.split('_')[0]}: {m.loc[getattr(m['estimate'], pick)(), 'map']}")
        if parts:
            out.append(f"{model} ({', '.join(parts)})")
    return out
