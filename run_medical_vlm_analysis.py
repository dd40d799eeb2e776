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
import shutil
import sys
from pathlib import Path

import torch

from medvlm.config import MedicalAttentionConfig
from medvlm.pipeline import MODEL_NAMES, RunConfig, dist_env
from medvlm.runner import run


def _load_llava_rad(cfg: RunConfig):
    from llava_rad_medical_only import LLaVARadMedical

    if cfg.random_models == "full":
        from medvlm.tiny_llava_rad import full_size_llava_rad

        return full_size_llava_rad(cfg.attention, device=cfg.device, dtype=cfg.dtype or "bfloat16")
    backend = LLaVARadMedical(config=cfg.attention)
    if cfg.random_models == "tiny":
        from medvlm.tiny_llava_rad import write_tiny_llava_rad

        model_path, model_base = write_tiny_llava_rad(cfg.output_dir / "tiny_models" / "llava_rad")
        return backend.load_model(model_path, model_base, device=cfg.device, dtype=cfg.dtype or "float32")
    return backend.load_model(cfg.llava_rad_model, cfg.llava_rad_base, load_8bit=cfg.load_in_8bit,
                              load_4bit=cfg.load_in_4bit, device=cfg.device, dtype=cfg.dtype)  # fmt: skip


def _load_medgemma(cfg: RunConfig):
    from medgemma_enhanced import MedGemmaMedical

    if cfg.random_models is not None:
        from medvlm.tiny_medgemma import MEDGEMMA_4B_SHAPES, TINY_SHAPES, tiny_medgemma

        full = cfg.random_models == "full"
        model, processor = tiny_medgemma(
            shapes=MEDGEMMA_4B_SHAPES if full else TINY_SHAPES, sliding_window=1024 if full else 512,
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
        return backend

    return load_and_compile


def parse_args(argv=None) -> RunConfig:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--csv", type=Path, help="CSV: study_id, image_path, finding, variant_id, question, answer_gt")
    p.add_argument("--image_root", type=Path, help="folder image paths are relative to (default: the CSV's folder)")
    p.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    p.add_argument("--n_studies", type=int, help="the first N studies in file order")
    p.add_argument("--sample", type=int, help="a random sample of N studies (with --seed)")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample")
    p.add_argument("--cluster_by", default="study_id", choices=("study_id", "subject_id"))
    p.add_argument("--output_dir", type=Path, default=Path("results"))
    p.add_argument("--llava_rad_model", default="microsoft/llava-rad", help="hub id or local folder")
    p.add_argument("--llava_rad_base", default="lmsys/vicuna-7b-v1.5", help="Vicuna base: hub id or local folder")
    p.add_argument("--medgemma_model", default="google/medgemma-4b-it", help="hub id or local folder")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="default: per model")
    p.add_argument("--load_in_8bit", action="store_true")
    p.add_argument("--load_in_4bit", action="store_true")
    p.add_argument("--batch_size", type=int,
                   help="questions per forward pass, whole studies packed (default per model; halved on OOM)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile norms, MLPs and vision layers: 10-20%% faster once compiled, "
                        "after 10-20 s of compiling on an H200 (long runs on a GPU)")
    p.add_argument("--generate", action="store_true", help="also generate free text beside the logit answer")
    p.add_argument("--max_new_tokens", type=int, default=24)
    p.add_argument("--strict", action="store_true", help="refuse the CSV if any row is bad")
    p.add_argument("--overwrite", action="store_true", help="delete the output folder's results first")
    p.add_argument("--analyze_only", action="store_true", help="statistics and figures from stored results")
    p.add_argument("--demo", action="store_true", help="tiny random models on real DICOMs from pydicom-data")
    p.add_argument("--tiny_random_models", action="store_true", help="tiny random-weight models on any CSV")
    p.add_argument("--random_full_size_models", action="store_true",
                   help="random weights in the real models' shapes (GPU timing; numbers mean nothing)")
    p.add_argument("--colormap", default="hot")
    p.add_argument("--attention_head_mode", default="mean", choices=("mean", "max", "entropy", "none"))
    p.add_argument("--layers", default="all", help="all, last_quarter, last_half, or comma-separated indices")
    p.add_argument("--query_mode", default="answer", choices=("answer", "question", "finding"))
    p.add_argument("--answer_suffix", default="Answer yes or no.", help="appended to every question ('' for none)")
    p.add_argument("--n_boot", type=int, default=10_000)
    p.add_argument("--bootstrap_seed", type=int, default=0)
    p.add_argument("--n_figure_studies", type=int, help="studies that get per-study figures (default 3; demo 1)")
    p.add_argument("--figure_studies", nargs="+", help="study ids that get per-study figures (default: the first N)")
    p.add_argument("--figure_findings", nargs="+", help="findings that get per-study figures (default: all)")
    a = p.parse_args(argv)
    named = ("all", "last_quarter", "last_half")
    layers = a.layers if a.layers in named else tuple(int(x) for x in a.layers.split(","))
    attention = MedicalAttentionConfig(colormap=a.colormap, attention_head_mode=a.attention_head_mode, layers=layers,
                                       query_mode=a.query_mode, answer_suffix=a.answer_suffix, generate=a.generate,
                                       max_new_tokens=a.max_new_tokens)  # fmt: skip
    if not (a.csv or a.demo or a.analyze_only):
        p.error("give --csv (or --demo, or --analyze_only on an existing --output_dir)")
    rank, world, local_rank = dist_env()
    random_models = "tiny" if (a.tiny_random_models or a.demo) else "full" if a.random_full_size_models else None
    n_figures = a.n_figure_studies if a.n_figure_studies is not None else (1 if a.demo else 3)
    return RunConfig(
        output_dir=a.output_dir, csv=a.csv, image_root=a.image_root, models=tuple(a.models), n_studies=a.n_studies,
        sample=a.sample, seed=a.seed, cluster_by=a.cluster_by, llava_rad_model=a.llava_rad_model,
        llava_rad_base=a.llava_rad_base, medgemma_model=a.medgemma_model, dtype=a.dtype, load_in_8bit=a.load_in_8bit,
        load_in_4bit=a.load_in_4bit, batch_size=a.batch_size, compile=a.compile, strict=a.strict, overwrite=a.overwrite,
        analyze_only=a.analyze_only, demo=a.demo, random_models=random_models,
        attention=attention, n_boot=a.n_boot, bootstrap_seed=a.bootstrap_seed, n_figure_studies=n_figures,
        figure_studies=tuple(a.figure_studies) if a.figure_studies else None,
        figure_findings=tuple(a.figure_findings) if a.figure_findings else None,
        rank=rank, world_size=world, local_rank=local_rank,
    )  # fmt: skip


def main(argv=None) -> int:
    cfg = parse_args(argv)
    if cfg.world_size > 1 and torch.cuda.is_available():
        torch.cuda.set_device(cfg.local_rank)
    if cfg.overwrite and cfg.world_size > 1:
        raise SystemExit("error: --overwrite under several processes would race; delete the folder first")
    if cfg.overwrite and cfg.output_dir.exists() and not cfg.analyze_only:
        shutil.rmtree(cfg.output_dir)
    return run(cfg, {name: get_backend_loader(name) for name in cfg.models})


if __name__ == "__main__":
    sys.exit(main())
