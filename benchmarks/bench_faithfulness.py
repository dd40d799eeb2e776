"""Cost of the faithfulness curves and the gradient maps (issue #15 section 3), on one GPU, with
full-size random-weight models built as benchmarks/bench_speed.py builds them (bf16).

    python benchmarks/bench_faithfulness.py                    # both models (H200)
    python benchmarks/bench_faithfulness.py --models medgemma --steps 8
    python benchmarks/bench_faithfulness.py --only gradxinput \
        --grad_rows llava_rad:1,2 medgemma:1,2,4,8,16 --grad_uncheckpointed llava_rad:1,3,6 medgemma:1,8,24
    python benchmarks/bench_faithfulness.py --smoke            # tiny models on the CPU: checks the script

Per model it measures, each after a warm-up at the same shapes, with peak GPU memory:
- plain scoring: the backend's own pass (prepare / score_prepared, attention captured) at k
  studies per pass, with the six paraphrases per study and with one question per study;
  seconds per image (= per study);
- perturbed images: medvlm.analysis.faithfulness.faithfulness_for_studies on studies with one question
  each and two maps (raw attention from the plain pass, gradient x input) plus 3 random orders,
  K steps, k perturbed images per pass; seconds per unique perturbed image (wall time over the
  images scored: blur, masks and deduplication included). Goal: <= 1.25 x the plain pass's
  per-image cost at the same k;
- gradient x input: medvlm.core.attribution.attribution_maps at R questions per pass, u decoder
  layers left uncheckpointed and s (1: each study's questions share one row after one copy of
  its prefix, one backward each; 0: one row per question), every (R, u, s) of --grad_rows x
  --grad_uncheckpointed x --grad_share (each list per model: "2" is for every model,
  "medgemma:8,16" for one), seconds per question, against the same questions' forward alone at
  R rows per pass (attribution_margins: one row per question, no graph; goal <= 3x) and
  against the plain packed pass per question (its six questions share one forward, while a
  gradient pass needs a backward per question, so this ratio is larger). Every combination
  goes into "gradxinput_sweep" (an out-of-memory one is recorded as such), the one to make the
  default into "gradxinput_choice" (within the memory goal: the fastest per question among
  those within the 3x goal, else the lowest ratio), the library's defaults into
  "gradxinput_defaults"; "gradxinput" keeps one entry per R (at the default u when swept);
- relevancy: the same at R = 1 and 2 (its memory may exceed the 1.15 x weights goal: reported).
--only picks the parts (plain, gradxinput, relevancy, curves; the curves need the plain pass).
Writes benchmarks/results/<date>-<device kind>-faithfulness.json (with --smoke: into --out,
default the temporary folder, so the committed results hold GPU runs only).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_speed  # noqa: E402
from bench_speed import PARAPHRASES, backend_parameters, build, images  # noqa: E402

from medvlm.analysis.faithfulness import FaithfulnessConfig, faithfulness_for_studies  # noqa: E402
from medvlm.core.attribution import (  # noqa: E402
    DEFAULT_QUESTIONS_PER_BACKWARD,
    DEFAULT_ROWS,
    DEFAULT_SHARED_PREFIX,
    DEFAULT_UNCHECKPOINTED,
    attribution_maps,
    attribution_margins,
)
from medvlm.core.config import MedicalAttentionConfig  # noqa: E402

GOALS = {"perturbed_over_plain": 1.25, "gradxinput_over_forward": 3.0, "peak_over_weights": 1.15}
PARTS = ("plain", "gradxinput", "relevancy", "curves")


def cuda() -> bool:
    return bench_speed.DEVICE["name"] == "cuda"


def measure(fn):
    """(seconds, peak GiB or nan, result) of fn() after synchronising."""
    bench_speed.sync()
    if cuda():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    bench_speed.sync()
    seconds = time.perf_counter() - t0
    return seconds, (torch.cuda.max_memory_allocated() / 2**30 if cuda() else float("nan")), out


def plain_pass(backend, imgs, k: int, questions) -> tuple[float, float]:
    """(seconds per image, peak GiB) of the backend's own pass, k studies per pass."""
    items = [(im, questions, None) for im in imgs]
    backend.score_many(items[:k])  # warm-up at this shape
    seconds, peak, _ = measure(lambda: [backend.score_prepared(backend.prepare(items[i : i + k]))
                                        for i in range(0, len(items), k)])  # fmt: skip
    return seconds / len(items), peak


def bench_model(name: str, args) -> dict:
    attention = MedicalAttentionConfig(attention_head_mode="mean", layers="all", query_mode="answer")
    backend, _ = build(name, torch.bfloat16, attention)
    weights = sum(p.numel() * p.element_size() for p in backend_parameters(backend)) / 2**30
    imgs = images(max(args.n_studies, max(args.per_pass)))
    question = PARAPHRASES[:1]
    res: dict = {"weights_gib": weights, "steps": args.steps, "n_random": 3, "n_studies": args.n_studies}

    def ratio(peak):
        return peak / weights if cuda() else None

    # plain scoring, per image, at each k
    plain = {}
    for k in args.per_pass if "plain" in args.only else ():
        six, six_peak = plain_pass(backend, imgs[: args.n_studies], k, PARAPHRASES)
        one, one_peak = plain_pass(backend, imgs[: args.n_studies], k, question)
        plain[k] = {"s_per_image_six_questions": six, "s_per_image_one_question": one,
                    "peak_over_weights_six": ratio(six_peak), "peak_over_weights_one": ratio(one_peak)}  # fmt: skip
        print(f"  {name} plain k={k}: {six * 1e3:.1f} ms/image (6 questions), {one * 1e3:.1f} ms/image (1)", flush=True)
    if plain:
        res["plain"] = plain
    if "gradxinput" in args.only:
        res.update(gradxinput_sweep(name, backend, args, ratio))
        if plain:
            plain_q = plain[max(args.per_pass)]["s_per_image_six_questions"] / len(PARAPHRASES)
            res["gradxinput_over_plain_packed_question"] = {
                r: g["s_per_question"] / plain_q for r, g in res["gradxinput"].items()
            }
    if "relevancy" in args.only:
        res["relevancy"] = relevancy(name, backend, args, imgs, ratio)
    if "curves" in args.only:
        res["curves"] = curves(name, backend, args, imgs, plain, ratio)
    backend.unload()
    return res


def _oom_types() -> tuple:
    return (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else (torch.cuda.OutOfMemoryError,)


def gradxinput_sweep(name: str, backend, args, ratio) -> dict:
    """Every (R, u, s, t) of this model's --grad_rows x --grad_uncheckpointed x --grad_share x
    --grad_together (t, questions per vmapped backward, only with s; 1 without):
    gradient x input per question (at least --grad_studies x --grad_questions questions, and
    two full passes), against the same questions' forward alone at R rows per pass, the two
    timed in turn --repeats times: the least of each (gradxinput_over_forward) and the median
    of the runs' own ratios (paired_ratio_median). -> {"gradxinput_sweep": [entry, ...],
    "gradxinput": {R: its entry at the default u, s and t (else the first)}, "gradxinput_choice":
    choose(sweep), "gradxinput_defaults": the library's R, u, s and t}."""
    rows, unck = per_model(args.grad_rows, name), per_model(args.grad_uncheckpointed, name)
    defaults = {"rows": DEFAULT_ROWS[name]["gradxinput"], "uncheckpointed": DEFAULT_UNCHECKPOINTED[name]["gradxinput"],
                "share_prefix": DEFAULT_SHARED_PREFIX[name],
                "questions_per_backward": DEFAULT_QUESTIONS_PER_BACKWARD[name]}  # fmt: skip
    shares = [bool(v) for v in per_model(args.grad_share, name)] or [defaults["share_prefix"]]
    togethers = per_model(args.grad_together, name) or [defaults["questions_per_backward"]]
    n_layers = len(backend._attention)
    q = args.grad_questions
    sweep, forward_warmed = [], set()
    for r in rows:
        n_q = max(args.grad_studies * q, 2 * r)
        items = [(im, PARAPHRASES[:q], None) for im in images(-(-n_q // q))]
        n_q = len(items) * q
        first = items[: -(-r // q)]  # one full pass of r rows, for the warm-ups
        combos = [(u, sh, t) for u in unck for sh in shares for t in (togethers if sh else [1])]
        for u, share, t in dict.fromkeys(combos):
            entry = {"rows": r, "uncheckpointed": min(u, n_layers), "share_prefix": share,
                     "questions_per_backward": t, "n_questions": n_q}  # fmt: skip
            label = f"R={r} u={u} shared={int(share)}" + (f" together={t}" if share else "")
            try:
                attribution_maps(backend, first, ("gradxinput",), rows_per_pass=r, uncheckpointed=u, share_prefix=share,
                                 questions_per_backward=t)  # fmt: skip
                if r not in forward_warmed:
                    attribution_margins(backend, first, rows_per_pass=r)
                    forward_warmed.add(r)
                # gradient and forward timed in turn, so that the machine's drift between runs
                # (up to 12% on one H100 within minutes) falls on both sides of each ratio
                grads, fwds = [], []
                for _ in range(max(1, args.repeats)):
                    grads.append(measure(lambda items=items, r=r, u=u, share=share, t=t: attribution_maps(
                        backend, items, ("gradxinput",), rows_per_pass=r, uncheckpointed=u, share_prefix=share,
                        questions_per_backward=t)))
                    fwds.append(measure(lambda items=items, r=r: attribution_margins(backend, items, rows_per_pass=r)))
                t_g, peak_g = min(g[0] for g in grads), max(g[1] for g in grads)
                t_f, peak_f = min(f[0] for f in fwds), max(f[1] for f in fwds)
                paired = sorted(g[0] / f[0] for g, f in zip(grads, fwds, strict=True))
            except _oom_types():
                torch.cuda.empty_cache()
                entry["oom"] = True
                sweep.append(entry)
                print(f"  {name} gradxinput {label}: out of memory", flush=True)
                continue
            except Exception as e:  # recorded, not hidden: one failing setting does not end the sweep
                entry["error"] = f"{type(e).__name__}: {e}"[:2000]
                sweep.append(entry)
                print(f"  {name} gradxinput {label}: FAILED {entry['error'][:300]}", flush=True)
                continue
            entry.update(s_per_question=t_g / n_q, forward_only_s_per_question=t_f / n_q,
                         gradxinput_over_forward=t_g / t_f, paired_ratios=paired,
                         paired_ratio_median=paired[len(paired) // 2], peak_over_weights=ratio(peak_g),
                         forward_peak_over_weights=ratio(peak_f))  # fmt: skip
            sweep.append(entry)
            print(f"  {name} gradxinput {label}: {t_g / n_q * 1e3:.1f} ms/question, "
                  f"{t_g / t_f:.2f}x its forward (paired median {paired[len(paired) // 2]:.2f}x) "
                  f"({t_f / n_q * 1e3:.1f} ms/question), peak {ratio(peak_g)}", flush=True)  # fmt: skip
    by_rows = {}
    for e in sweep:
        default = all(e[k] == defaults[k] for k in ("uncheckpointed", "share_prefix", "questions_per_backward"))
        if "oom" not in e and "error" not in e and (e["rows"] not in by_rows or default):
            by_rows[e["rows"]] = e
    choice = choose(sweep)
    picked = choice and tuple(choice[k] for k in ("rows", "uncheckpointed", "share_prefix", "questions_per_backward"))
    print(f"  {name} gradxinput choice: {picked} (defaults now R={defaults['rows']}, u={defaults['uncheckpointed']}, "
          f"shared={defaults['share_prefix']}, together={defaults['questions_per_backward']})", flush=True)  # fmt: skip
    return {"gradxinput_sweep": sweep, "gradxinput": by_rows, "gradxinput_choice": choice,
            "gradxinput_defaults": defaults}  # fmt: skip


def choose(sweep: list[dict]) -> dict | None:
    """Among the combinations within the memory goal (every one off the GPU): the fastest per
    question of those within the 3x goal, else the one of lowest ratio (each ratio the larger
    of its two forms, _ratio). None if none ran."""
    ok = [e for e in sweep if "oom" not in e and "error" not in e
          and (e["peak_over_weights"] is None or e["peak_over_weights"] <= GOALS["peak_over_weights"])]  # fmt: skip
    fast = [e for e in ok if _ratio(e) <= GOALS["gradxinput_over_forward"]]
    if fast:
        return {**min(fast, key=lambda e: e["s_per_question"]), "meets_goals": True}
    return {**min(ok, key=_ratio), "meets_goals": False} if ok else None


def _ratio(e: dict) -> float:
    """The larger of the best-of-runs ratio and the median of the ratios of runs timed in turn."""
    return max(e["gradxinput_over_forward"], e.get("paired_ratio_median", 0.0))


def relevancy(name: str, backend, args, imgs, ratio) -> dict:
    """Relevancy at each --relevancy_rows R: seconds per question and peak memory."""
    question = PARAPHRASES[:1]
    rel = {}
    for r in args.relevancy_rows:
        items = [(im, question, None) for im in imgs[: max(r, args.relevancy_questions)]]
        attribution_maps(backend, items[:r], ("relevancy",), rows_per_pass=r)
        t, peak, _ = measure(lambda items=items, r=r: attribution_maps(backend, items, ("relevancy",), rows_per_pass=r))
        rel[r] = {"s_per_question": t / len(items), "peak_over_weights": ratio(peak),
                  "peak_gib": peak if cuda() else None}  # fmt: skip
        print(f"  {name} relevancy R={r}: {t / len(items) * 1e3:.1f} ms/question, peak {ratio(peak)}", flush=True)
    return rel


def curves(name: str, backend, args, imgs, plain: dict, ratio) -> dict:
    """Deletion / insertion curves (raw attention and gradient x input, 3 random orders) at each
    k of --per_pass: seconds per unique perturbed image, against the plain pass."""
    question = PARAPHRASES[:1]
    studies = imgs[: args.faith_studies]
    scores = backend.score_many([(im, question, None) for im in studies])
    att = attribution_maps(backend, [(im, question, None) for im in studies], ("gradxinput",))["gradxinput"]
    payload = [(f"s{i}", im, [{"finding": "effusion", "variant_id": 0, "question": question[0], "answer": s[0].answer}],
                {"attention": [s[0].attention.mean(0)], "gradxinput": [att[i, 0]]})
               for i, (im, s) in enumerate(zip(studies, scores, strict=True))]  # fmt: skip
    out = {}
    for k in args.per_pass:
        cfg = FaithfulnessConfig(steps=args.steps, images_per_pass=k)
        faithfulness_for_studies(backend, payload[:1], FaithfulnessConfig(steps=2, images_per_pass=k))  # warm-up
        t, peak, (records, _) = measure(lambda cfg=cfg: faithfulness_for_studies(backend, payload, cfg))
        n_images = sum(r["n_images"] for r in records if r["map"] == "random")
        per = t / n_images
        out[k] = {"s_per_perturbed_image": per, "n_images": n_images, "s_per_unit": t / len(payload),
                  "perturbed_over_plain": per / plain[k]["s_per_image_six_questions"],
                  "perturbed_over_plain_one_question": per / plain[k]["s_per_image_one_question"],
                  "peak_over_weights": ratio(peak)}  # fmt: skip
        print(f"  {name} curves k={k}: {per * 1e3:.1f} ms/perturbed image "
              f"({out[k]['perturbed_over_plain']:.2f}x plain), peak {ratio(peak)}", flush=True)  # fmt: skip
    return out


def per_model(specs, name: str) -> list[int]:
    """--grad_rows / --grad_uncheckpointed values for one model: "2" or "1,2" for every model,
    "medgemma:8,16" for one; in the order given, without repeats."""
    out = []
    for spec in specs:
        model, _, values = str(spec).rpartition(":")
        if model in ("", name):
            out += [int(v) for v in values.split(",") if v.strip()]
    return list(dict.fromkeys(out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["llava_rad", "medgemma"])
    p.add_argument("--n_studies", type=int, default=32, help="studies timed in the plain pass")
    p.add_argument("--per_pass", type=int, nargs="+", default=[1, 2, 4, 8], help="images (studies) per pass")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--faith_studies", type=int, default=4, help="units (one question per study) of the curves")
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS),
                   help="the parts to run (curves need plain, which is added)")  # fmt: skip
    p.add_argument(
        "--grad_rows",
        nargs="+",
        default=["llava_rad:1,2", "medgemma:2,8,16"],
        help='gradient x input rows per pass: "2" or "1,2" for every model, "medgemma:8,16" for one',
    )
    p.add_argument("--grad_uncheckpointed", nargs="+", default=["1"],
                   help="decoder layers left uncheckpointed, the same syntax; every (rows, u) pair is run")  # fmt: skip
    p.add_argument("--grad_share", nargs="+", default=[],
                   help="1 shared prefix, 0 one row per question, the same syntax (default: the library's)")
    p.add_argument("--grad_together", nargs="+", default=[],
                   help="questions of a shared row per vmapped backward, the same syntax (default: the library's)")
    p.add_argument("--grad_studies", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="gradient x input and its forward, timed in turn this often")
    p.add_argument("--grad_questions", type=int, default=2)
    p.add_argument("--relevancy_rows", type=int, nargs="+", default=[1, 2])
    p.add_argument("--relevancy_questions", type=int, default=4)
    p.add_argument("--kind", default=None, help="names the results file; default: bench_speed.device_kind()")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU, few studies: checks the script")
    args = p.parse_args(argv)
    args.only = [part for part in PARTS if part in args.only or (part == "plain" and "curves" in args.only)]
    if args.smoke:
        bench_speed.DEVICE.update(name="cpu", full_size=False)
        args.kind = "smoke-cpu"
        args.n_studies, args.per_pass, args.steps, args.faith_studies = 2, [2], 2, 2
        args.grad_rows, args.grad_uncheckpointed, args.grad_studies, args.grad_questions = ["2"], ["1,2"], 1, 2
        args.repeats = 1
        args.relevancy_rows, args.relevancy_questions = [1], 1
        out_dir = args.out or Path(tempfile.gettempdir())
    else:
        if not torch.cuda.is_available():
            raise SystemExit("this benchmark needs a CUDA GPU (or --smoke)")
        args.kind = args.kind or bench_speed.device_kind()
        out_dir = args.out or ROOT / "benchmarks" / "results"
    import transformers

    result = {
        "date": dt.date.today().isoformat(),
        "device_kind": args.kind,
        "gpu": torch.cuda.get_device_name(0) if cuda() else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": "bfloat16",
        "weights": "random, full-size shapes of the real configs" if not args.smoke else "random, tiny shapes",
        "goals": GOALS,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{result['date']}-{args.kind}-faithfulness.json"
    for name in args.models:
        result[name] = bench_model(name, args)
        path.write_text(json.dumps(result, indent=2, default=str))
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
