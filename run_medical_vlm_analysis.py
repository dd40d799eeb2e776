"""Run LLaVA-Rad and MedGemma on a paraphrase CSV of chest X-ray questions; score answers,
capture question-to-image attention, and write statistics with cluster-bootstrap CIs,
heatmaps, tables and a report.

    # no GPU, no weights: tiny random-weight models on real DICOMs from pydicom-data
    python run_medical_vlm_analysis.py --demo --output_dir demo_results

    # the real run (CUDA GPU; MedGemma is gated: huggingface-cli login first)
    python run_medical_vlm_analysis.py --csv data/questions.csv --n_studies 100 --output_dir results

    # statistics and figures again from stored results, no GPU
    python run_medical_vlm_analysis.py --output_dir results --analyze_only

    # several GPUs: each process scores every N-th study and writes its own shard
    accelerate launch --num_processes 2 run_medical_vlm_analysis.py --csv data/questions.csv --output_dir results
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from medvlm.core.config import (
    ATTRIBUTION_KINDS,
    CONTROLS,
    GENERIC_PROMPT,
    HEAD_MODES,
    LAYER_SPECS,
    MODEL_NAMES,
    QUERY_MODES,
    MedicalAttentionConfig,
    RunConfig,
    dist_env,
)
from medvlm.core.preflight import TOOL_DIRS, TOOL_FILES


def _load_llava_rad(cfg: RunConfig):
    from llava_rad_medical_only import LLaVARadMedical

    if cfg.random_models == "full":
        from medvlm.core.tiny_llava_rad import full_size_llava_rad

        return full_size_llava_rad(cfg.attention, device=cfg.device, dtype=cfg.dtype or "bfloat16")
    backend = LLaVARadMedical(config=cfg.attention)
    if cfg.random_models == "tiny":
        from medvlm.core.tiny_llava_rad import cached_tiny_llava_rad

        model_path, model_base = cached_tiny_llava_rad()  # written once into the tool's cache, then reused
        return backend.load_model(model_path, model_base, device=cfg.device, dtype=cfg.dtype or "float32")
    return backend.load_model(cfg.llava_rad_model, cfg.llava_rad_base, load_8bit=cfg.load_in_8bit,
                              load_4bit=cfg.load_in_4bit, device=cfg.device, dtype=cfg.dtype)  # fmt: skip


def _load_medgemma(cfg: RunConfig):
    from medgemma_enhanced import MedGemmaMedical

    if cfg.random_models is not None:
        import torch

        from medvlm.core.tiny_medgemma import DEMO_SHAPES, MEDGEMMA_4B_SHAPES, tiny_medgemma

        full = cfg.random_models == "full"
        model, processor = tiny_medgemma(
            shapes=MEDGEMMA_4B_SHAPES if full else DEMO_SHAPES, sliding_window=1024 if full else 512,
            device=cfg.device, dtype=getattr(torch, cfg.dtype or ("bfloat16" if full else "float32")),
        )  # fmt: skip
        name = "random-medgemma-4b-shapes" if full else "tiny-random-medgemma"
        return MedGemmaMedical(model, processor, cfg.attention, model_id=name)
    device_map = {"": cfg.device} if cfg.world_size > 1 else "auto"
    return MedGemmaMedical.from_pretrained(cfg.medgemma_model, cfg.attention, dtype=cfg.dtype,
                                           quantization=cfg.quantization, device_map=device_map)  # fmt: skip


BACKENDS = {"llava_rad": _load_llava_rad, "medgemma": _load_medgemma}


def get_backend_loader(name: str):
    try:
        load = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(BACKENDS)}") from None

    def load_and_compile(cfg: RunConfig):
        backend = load(cfg)
        if cfg.compile:
            backend.compile()
        if cfg.overlap_tower:
            from medvlm.core.preflight import UsageError

            try:
                backend.overlap_tower()
            except ValueError as e:
                raise UsageError(str(e)) from None
        return backend

    return load_and_compile


OVERWRITE_HELP = (
    "before scoring, remove what this tool wrote into --output_dir and nothing else: "
    + ", ".join(f for f in TOOL_FILES if not f.endswith(".tmp"))
    + " and the folders "
    + ", ".join(f"{d}/" for d in TOOL_DIRS)
    + "; a folder that holds the input CSV or its images is refused"
)
HEAD_HELP = ("how the heads of a layer are combined: mean (average), max (elementwise maximum), entropy (focused heads "
             "weigh more: weight 1 - H/log n), none (keep every head; larger files)")
LAYERS_HELP = ("decoder layers whose maps are stored: all, last_quarter, last_half, or comma-separated indices "
               "(0-based; negative counts from the end), e.g. 0,15,-1; LLaVA-Rad has 32 layers, MedGemma 34")
QUERY_HELP = ("whose attention is read: answer (the last prompt token, whose next-token logits give the answer), "
              "question (mean over the question's tokens), finding (mean over the tokens of the finding phrase in the "
              "question; rows whose question lacks it fail)")


DEMO_REGIONS = Path(__file__).resolve().parent / "data" / "nih-cxr14" / "demo_regions_NOT_EXPERT.csv"
DEMO_FIGURE_STUDY = "00000001_000"  # NIH ChestX-ray14, cardiomegaly: the demo's per-study figures
DEMO_REGION_FINDING = "cardiomegaly"  # the finding of DEMO_REGIONS' box on the figure study
#: the demo's faithfulness curves (#15: "a small version, K = 8, variant 0"): on one unit per model, the
#: figure study's finding that has the demo region (paraphrase 0), K = 8 steps, R random orders
DEMO_FAITHFULNESS = {"steps": 8, "random": 1, "studies": ((DEMO_FIGURE_STUDY, DEMO_REGION_FINDING),)}
FAITHFULNESS_STEPS, FAITHFULNESS_RANDOM = 16, 3  # the defaults elsewhere


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        """No "(default: None)": a flag whose default depends on the run says so in its help."""
        return action.help if action.default is None else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line and exit code 2 (argparse's default prints the whole usage first)."""
        self.exit(2, f"error: {message} (see --help)\n")


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= minimum, refused with a message saying what was expected."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = None
        if n is None or n < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return n

    return parse


_positive = _int_at_least(1, "a positive integer")
_count_or_all = _int_at_least(0, "0 (all) or a positive integer")


def _controls(text: str) -> tuple[str, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    names = tuple(dict.fromkeys(x.strip() for x in text.split(",")))
    bad = [x for x in names if x not in CONTROLS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown control(s) {', '.join(bad)}; valid: {', '.join(CONTROLS)} or none")
    return names


def _attribution(text: str) -> tuple[str, ...]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(ATTRIBUTION_KINDS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown kind(s) {', '.join(unknown)}; valid: {', '.join(ATTRIBUTION_KINDS)}")
    return tuple(k for k in ATTRIBUTION_KINDS if k in kinds or k == "attention")


def _variants(text: str) -> str:
    v = text.strip()
    if v != "all" and not all(x.strip().isdigit() for x in v.split(",")):
        raise argparse.ArgumentTypeError(f"expected all or comma-separated variant ids such as 0,3, got {v!r}")
    return v


def _open_unit(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = float("nan")
    if not 0.0 < x < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return x


def _layers(text: str) -> str | tuple[int, ...]:
    if text in LAYER_SPECS:
        return text
    try:
        layers = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {', '.join(LAYER_SPECS)} or comma-separated layer indices such as 0,15,-1, got {text!r}"
        ) from None
    return layers


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        description=__doc__.split("\n\n")[0], formatter_class=_Formatter, epilog=__doc__.split("\n\n", 1)[1]
    )
    g = p.add_argument_group("data")
    g.add_argument("--csv", type=Path, help="question CSV: study_id, image_path, finding, variant_id, question, "
                                            "answer_gt [, subject_id, polarity] (README: Data format)")  # fmt: skip
    g.add_argument("--image_root", type=Path, help="folder relative image paths start from (default: the CSV's)")
    g.add_argument("--n_studies", type=_count_or_all, help="the first N studies in file order (0 or unset: all)")
    g.add_argument("--sample", type=_positive, help="a random sample of N studies (with --seed)")
    g.add_argument("--seed", type=_int_at_least(0, "0 or a positive integer"), default=0, help="seed for --sample")
    g.add_argument("--strict", action="store_true", help="refuse the CSV if any row is bad (else bad rows are "
                                                         "skipped, listed and counted)")  # fmt: skip
    g.add_argument("--demo", action="store_true",
                   help="tiny random-weight models on real radiographs shipped with the packages (no GPU, no weights)")
    m = p.add_argument_group("models")
    m.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES, help="models to run")
    m.add_argument("--llava_rad_model", default="microsoft/llava-rad", help="LLaVA-Rad: hub id or local folder")
    m.add_argument("--llava_rad_base", default="lmsys/vicuna-7b-v1.5", help="its Vicuna base: hub id or local folder")
    m.add_argument("--medgemma_model", default="google/medgemma-4b-it", help="MedGemma: hub id or local folder")
    m.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="weights' dtype (default: bfloat16 on a GPU, float32 on the CPU; MedGemma refuses float16)")
    m.add_argument("--load_in_8bit", action="store_true", help="8-bit weights (bitsandbytes, CUDA)")
    m.add_argument("--load_in_4bit", action="store_true", help="4-bit NF4 weights (bitsandbytes, CUDA)")
    m.add_argument("--tiny_random_models", action="store_true", help="tiny random-weight models on any CSV (tests)")
    m.add_argument("--random_full_size_models", action="store_true",
                   help="random weights in the real models' shapes (GPU timing; numbers mean nothing)")
    a = p.add_argument_group("attention and answers")
    a.add_argument("--query_mode", default="answer", choices=QUERY_MODES, help=QUERY_HELP)
    a.add_argument("--attention_head_mode", default="mean", choices=HEAD_MODES, help=HEAD_HELP)
    a.add_argument("--layers", type=_layers, default="all", help=LAYERS_HELP)
    a.add_argument("--answer_suffix", default="Answer yes or no.", help="appended to every question ('' for none)")
    a.add_argument("--generate", action="store_true",
                   help="also generate a free-text answer (KV cached) and report its agreement with the logit answer")
    a.add_argument("--max_new_tokens", type=_positive, default=24,
                   help="length of the free-text answer with --generate (tokens)")
    v = p.add_argument_group("validity: image reliance, relative attention, grounding")
    v.add_argument("--controls", type=_controls, default="text_only,blank",
                   help="each question is also answered text_only (the same template without the image) and/or blank "
                        "(a uniform grey image of the same size); comma-separated, or none. One shared prefix per "
                        "pass each, so cheap; P(yes) under each lands beside P(yes) in results.jsonl and controls.csv")
    v.add_argument("--map", choices=("raw", "relative", "both"), default="both",
                   help="maps the figures and grounding use: raw attention, relative attention (Zhang et al. 2025: "
                        "divided by the attention of the generic prompt 'Write a general description of the image.', "
                        "asked once per study in the same pass), or both")
    v.add_argument("--image_dependence_threshold", type=_open_unit, default=0.1,
                   help="a (study, finding) is image-dependent when the mean over its paraphrases of |P(yes | image) - "
                        "P(yes | text only)| reaches this")
    v.add_argument("--regions", type=Path, action="append", default=[], metavar="FILE",
                   help="expert regions for grounding (repeatable): NIH BBox_List_2017, VinDr-CXR, RSNA pneumonia, "
                        "SIIM RLE, CheXlocalize JSON, or a plain CSV study_id,finding,x,y,w,h (README: Grounding)")
    v.add_argument("--finding_map", type=Path,
                   help="CSV label,finding[,dataset] or JSON overriding how dataset labels map to your findings")
    v.add_argument("--attribution", type=_attribution, default="attention",
                   help="maps beside attention: gradxinput (gradient of the yes/no margin x the image embeddings), "
                        "relevancy (Chefer et al. 2021; eager attention per question, memory-hungry); comma-separated")
    v.add_argument("--faithfulness", action="store_true", default=None,
                   help="deletion and insertion curves (RISE) for every map, while each model is loaded: costs "
                        "2 + 2 (K - 1)(maps + R) perturbed images per unit. Off by default; the demo (every study) "
                        f"turns it on for one unit, its figure study {DEMO_FIGURE_STUDY}'s {DEMO_REGION_FINDING} "
                        f"(the finding with the demo region), with K = {DEMO_FAITHFULNESS['steps']}, "
                        f"R = {DEMO_FAITHFULNESS['random']}")
    v.add_argument("--no_faithfulness", action="store_true", help="the demo without its faithfulness curves")
    v.add_argument("--faithfulness_steps", type=_positive,
                   help=f"K: steps from no cell to all cells (default {FAITHFULNESS_STEPS}; the demo "
                        f"{DEMO_FAITHFULNESS['steps']})")
    v.add_argument("--faithfulness_variants", type=_variants, default="0",
                   help="paraphrases that get curves: 0, all, or e.g. 0,3")
    v.add_argument("--substrate", choices=("blur", "mean"), default="blur",
                   help="what deletion puts in place of a cell: the Gaussian-blurred image, or the normalised mean")
    v.add_argument("--faithfulness_random", type=_positive,
                   help=f"R seeded random orders, the baseline (default {FAITHFULNESS_RANDOM}; the demo "
                        f"{DEMO_FAITHFULNESS['random']})")
    v.add_argument("--faithfulness_studies", type=_positive,
                   help="at most this many studies get curves, the first in the run's order (default: all; the "
                        f"demo: its figure study {DEMO_FIGURE_STUDY}'s {DEMO_REGION_FINDING} when it runs every "
                        "study)")
    v.add_argument("--exclude_sinks", action="store_true",
                   help="figures and grounding renormalise maps without the detected attention-sink tokens")
    s = p.add_argument_group("statistics")
    s.add_argument("--cluster_by", default="study_id", choices=("study_id", "subject_id"),
                   help="the bootstrap's resampling unit: the study, or the patient (needs subject_id)")
    s.add_argument("--n_boot", type=_positive,
                   help="bootstrap resamples per interval (default 10000, which gives stable 95%% ends; the demo "
                        "2000; 1,000 for a quick look)")
    s.add_argument("--bootstrap_seed", type=int, default=0, help="seed of the resampling (recorded)")
    o = p.add_argument_group("output")
    o.add_argument("--output_dir", type=Path, default=Path("results"), help="where results, tables and figures go")
    o.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    o.add_argument("--analyze_only", action="store_true", help="tables, figures and report from stored results")
    o.add_argument("--colormap", default="hot",
                   help="matplotlib colormap of the heatmaps: hot, inferno, magma, viridis, jet, gray, ... (any name "
                        "in matplotlib.colormaps)")  # fmt: skip
    o.add_argument("--n_figure_studies", type=_count_or_all,
                   help="the first N studies get per-study figures (default 3; demo 1)")
    o.add_argument("--figure_studies", nargs="+", metavar="ID", help="these study ids get per-study figures")
    o.add_argument("--figure_findings", nargs="+", metavar="FINDING", help="only these findings get figures")
    o.add_argument("--debug", action="store_true", help="show tracebacks for user mistakes too")
    f = p.add_argument_group("performance")
    f.add_argument("--batch_size", type=_positive,
                   help="questions per forward pass, whole studies packed (default per model; halved on CUDA OOM)")
    f.add_argument("--compile", action="store_true",
                   help="torch.compile norms, MLPs and vision layers: once compiled, LLaVA-Rad about 10%% "
                        "faster and MedGemma about 2%% (README, Speed), after 10-20 s of compiling (long runs "
                        "on a GPU)")  # fmt: skip
    f.add_argument("--overlap_tower", action="store_true",
                   help="run each pass's vision tower on a second CUDA stream, beside the previous pass's decoder "
                        "(same results; off by default until timed: README, Speed)")  # fmt: skip
    return p


def _conflicts(a) -> str | None:
    """The first pair of flags that contradict each other, as an error message."""
    defaults = {"llava_rad_model": "microsoft/llava-rad", "llava_rad_base": "lmsys/vicuna-7b-v1.5",
                "medgemma_model": "google/medgemma-4b-it"}  # fmt: skip
    random = a.demo or a.tiny_random_models or a.random_full_size_models
    real = [f"--{k}" for k, v in defaults.items() if getattr(a, k) != v]
    rules = (
        (a.demo and a.csv, "--demo runs its own data: drop --csv (or drop --demo to run your CSV)"),
        (a.demo and a.random_full_size_models, "--demo uses tiny random models: drop --random_full_size_models"),
        (a.tiny_random_models and a.random_full_size_models,
         "choose one of --tiny_random_models and --random_full_size_models"),
        (a.analyze_only and (a.csv or a.demo),
         "--analyze_only reads the stored results of --output_dir: drop --csv / --demo"),
        (a.analyze_only and a.overwrite, "--analyze_only keeps the stored results: drop --overwrite"),
        (a.load_in_8bit and a.load_in_4bit, "choose one of --load_in_8bit and --load_in_4bit"),
        (a.faithfulness and a.no_faithfulness, "choose one of --faithfulness and --no_faithfulness"),
        (a.n_studies and a.sample, "choose one of --n_studies and --sample"),
        (a.finding_map and not (a.regions or a.demo),
         "--finding_map renames the labels of --regions files, and no --regions was given"),
        (random and real, f"{', '.join(real)} name real weights, but random-weight models were asked for"),
        (random and (a.load_in_8bit or a.load_in_4bit),
         "8-/4-bit loading applies to real weights, not to random-weight models"),
        (not (a.csv or a.demo or a.analyze_only),
         "give --csv (or --demo, or --analyze_only on an existing --output_dir)"),
    )  # fmt: skip
    return next((message for broken, message in rules if broken), None)


def parse_args(argv=None) -> RunConfig:
    p = build_parser()
    a = p.parse_args(argv)
    conflict = _conflicts(a)
    if conflict:
        p.error(conflict)
    attention = MedicalAttentionConfig(colormap=a.colormap, attention_head_mode=a.attention_head_mode, layers=a.layers,
                                       query_mode=a.query_mode, answer_suffix=a.answer_suffix, generate=a.generate,
                                       max_new_tokens=a.max_new_tokens, controls=a.controls,
                                       generic_prompt=None if a.map == "raw" else GENERIC_PROMPT)  # fmt: skip
    map_kinds = {"raw": ("attention",), "relative": ("relative",), "both": ("attention", "relative")}[a.map]
    rank, world, local_rank = dist_env()
    random_models = "tiny" if (a.tiny_random_models or a.demo) else "full" if a.random_full_size_models else None
    n_figures = a.n_figure_studies if a.n_figure_studies is not None else (1 if a.demo else 3)
    if a.demo and not a.regions:  # grounding end to end on a box that says it is NOT an expert annotation
        a.regions = [DEMO_REGIONS]
    demo_all = a.demo and not (a.n_studies or a.sample)  # the demo's figure study is in the run
    if demo_all and not a.figure_studies and a.n_figure_studies is None:
        a.figure_studies = [DEMO_FIGURE_STUDY]  # the radiograph with the demo's region
    faithfulness = bool(a.faithfulness) or (demo_all and not a.no_faithfulness)
    faith_studies = a.faithfulness_studies or (DEMO_FAITHFULNESS["studies"] if demo_all else None)
    return RunConfig(
        output_dir=a.output_dir, csv=a.csv, image_root=a.image_root, models=tuple(a.models), n_studies=a.n_studies,
        sample=a.sample, seed=a.seed, cluster_by=a.cluster_by, llava_rad_model=a.llava_rad_model,
        llava_rad_base=a.llava_rad_base, medgemma_model=a.medgemma_model, dtype=a.dtype, load_in_8bit=a.load_in_8bit,
        load_in_4bit=a.load_in_4bit, batch_size=a.batch_size, compile=a.compile, overlap_tower=a.overlap_tower,
        strict=a.strict, overwrite=a.overwrite, analyze_only=a.analyze_only, demo=a.demo, random_models=random_models,
        attention=attention, n_boot=a.n_boot or (2000 if a.demo else 10_000), bootstrap_seed=a.bootstrap_seed,
        n_figure_studies=n_figures,
        figure_studies=tuple(a.figure_studies) if a.figure_studies else None,
        figure_findings=tuple(a.figure_findings) if a.figure_findings else None, debug=a.debug,
        map_kinds=map_kinds, regions=tuple(a.regions), finding_map=a.finding_map,
        image_dependence_threshold=a.image_dependence_threshold, exclude_sinks=a.exclude_sinks,
        attribution=a.attribution, faithfulness=faithfulness,
        faithfulness_steps=a.faithfulness_steps or (DEMO_FAITHFULNESS["steps"] if a.demo else FAITHFULNESS_STEPS),
        faithfulness_variants=a.faithfulness_variants, substrate=a.substrate,
        faithfulness_random=a.faithfulness_random or (DEMO_FAITHFULNESS["random"] if a.demo else FAITHFULNESS_RANDOM),
        faithfulness_studies=faith_studies,
        rank=rank, world_size=world, local_rank=local_rank,
    )  # fmt: skip


def passive_cpu_threads() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the environment sets it; before torch is imported (its
    OpenMP reads it once). torch's intra-op threads then sleep at the end of a parallel
    region instead of spinning: when another process holds a core, a spinning thread waits
    out the time slices of its descheduled partner on every small op of the tiny models
    (the demo's curves ran 3-6 x slower on 2 busy cores; with PASSIVE about as fast as on
    quiet ones). Thread counts and so the arithmetic are unchanged."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv=None) -> int:
    """The CLI. User mistakes end in one line on stderr and exit code 2 (a traceback only with
    --debug); a failed analysis leaves the scored results and says how to rerun it."""
    passive_cpu_threads()
    cfg = parse_args(argv)  # argparse prints its own one-line errors and exits 2
    from medvlm.core.preflight import UsageError
    from medvlm.core.runner import run
    from medvlm.core.store import ResultsFileError
    from medvlm.data.data import DatasetError
    from medvlm.data.images import ImageLoadError

    try:
        if cfg.overwrite and cfg.world_size > 1:
            raise UsageError("--overwrite under several processes would race; run it once on one process first")
        if cfg.overlap_tower and cfg.device == "cpu":
            raise UsageError("--overlap_tower needs a CUDA GPU, and this process runs on the CPU: drop --overlap_tower")
        if cfg.world_size > 1:
            import torch

            if torch.cuda.is_available():
                torch.cuda.set_device(cfg.local_rank)
        return run(cfg, {name: get_backend_loader(name) for name in cfg.models})
    except (UsageError, DatasetError, ImageLoadError, ResultsFileError) as e:
        if cfg.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: every row written so far is kept (appended and flushed as scored)
        if cfg.debug:
            raise
        print(f"interrupted: the rows scored so far are kept in {cfg.output_dir}; run the same command again "
              f"to go on (finished rows are skipped)", file=sys.stderr)  # fmt: skip
        return 130


def exit_now(code: int) -> None:
    """End the process once main() has returned: atexit handlers run, logging and the standard
    streams are flushed, then os._exit, skipping the interpreter's teardown of torch,
    transformers and the other modules (1-1.5 s on 2 CPU cores, after every output is
    written and closed). Under a profiler, tracer or debugger (python -m cProfile, coverage,
    pdb), or off CPython, the ordinary exit, which lets them write their data."""
    import atexit
    import logging

    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if run_exitfuncs is None or sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))


if __name__ == "__main__":
    exit_now(main())
