"""A/B on the CPU, indicative only: gradient x input on a shared row of six questions, a
backward per question against one backward vmapped over them (attribution_maps'
questions_per_backward), on a decoder with the model's depth and token counts but narrow
(float32): LLaVA-Rad 32 layers, hidden 256, 1369 image tokens; MedGemma 34 layers, hidden 256,
256 image tokens, also against its default of one row per question. The GPU numbers come from
bench_faithfulness.py --grad_together; this shows the work the vmapped backward removes (the
checkpointed layers' recomputation per question) where no GPU is lent.

    python benchmarks/ab_vmapped_backward.py                 # LLaVA-Rad, about 2 minutes on 2 cores
    python benchmarks/ab_vmapped_backward.py --model medgemma
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_speed import PARAPHRASES, images  # noqa: E402

from llava_rad_medical_only import LLaVARadMedical, build_projector  # noqa: E402
from medvlm.core.attribution import attribution_maps, attribution_margins  # noqa: E402
from medvlm.core.capture import attention_modules_of  # noqa: E402
from medvlm.core.fused_norms import norm_modules  # noqa: E402


def narrow_llava_rad(layers: int, hidden: int) -> LLaVARadMedical:
    """The tiny LLaVA-Rad (real tokenizer, prompt and 1369-token vision tower) with a random
    Llama decoder of `layers` layers of width `hidden` (MLP 2.69x wide, as Vicuna-7B's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    b = LLaVARadMedical.tiny()
    config = LlamaConfig(hidden_size=hidden, intermediate_size=round(hidden * 11008 / 4096), num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         vocab_size=b.model.config.vocab_size, max_position_embeddings=4096,
                         attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    lm = LlamaForCausalLM(config).eval().requires_grad_(False)
    b.model = lm
    b.projector = build_projector("mlp2x_gelu", b.vision.hidden_size, hidden).eval().requires_grad_(False)
    b._attention, b._norms, b.n_layers = attention_modules_of(lm.model), norm_modules(lm.model), layers
    return b


def narrow_medgemma(layers: int, hidden: int):
    """A MedGemmaMedical on a random Gemma3 with MedGemma's geometry (896 px, 256 image tokens)
    and `layers` decoder layers of width `hidden`, a narrow SigLIP (the tower is not differentiated)."""
    from medgemma_enhanced import MedGemmaMedical
    from medvlm.core.tiny_medgemma import tiny_medgemma

    shapes = {"text": {"hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
                       "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": hidden // 8,
                       "query_pre_attn_scalar": hidden // 8, "global_every": 6, "vocab_size": None},
              "vision": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "image_size": 896, "patch_size": 14}}  # fmt: skip
    model, processor = tiny_medgemma(shapes=shapes, sliding_window=1024)
    return MedGemmaMedical(model, processor)


def per_question(fn, repeats: int) -> float:
    """The least of `repeats` timed runs (after one warm-up), in seconds per question."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / len(PARAPHRASES)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["llava_rad", "medgemma"], default="llava_rad")
    p.add_argument("--layers", type=int, default=None, help="default: the model's (32, 34)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--uncheckpointed", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    medgemma = args.model == "medgemma"
    layers = args.layers or (34 if medgemma else 32)
    b = (narrow_medgemma if medgemma else narrow_llava_rad)(layers, args.hidden)
    items = [(images(1)[0], PARAPHRASES, None)]
    fwd = per_question(lambda: attribution_margins(b, items, rows_per_pass=len(PARAPHRASES)), args.repeats)
    n_image = b.facts.mm_tokens_per_image if medgemma else b.n_image_tokens
    print(f"{args.model}: {layers} layers x {args.hidden}, {n_image} image tokens; forward, one question per row: "
          f"{fwd * 1e3:.0f} ms/question", flush=True)  # fmt: skip
    for u in args.uncheckpointed if medgemma else ():  # MedGemma's default: one row per question
        g = per_question(lambda u=u: attribution_maps(b, items, ("gradxinput",), rows_per_pass=len(PARAPHRASES),
                                                      uncheckpointed=u, share_prefix=False), args.repeats)  # fmt: skip
        print(f"one row per question, {u} layers uncheckpointed: {g * 1e3:.0f} ms/question = {g / fwd:.2f}x the "
              f"forward", flush=True)  # fmt: skip
    for u in args.uncheckpointed:
        for together in (1, len(PARAPHRASES)):
            g = per_question(lambda u=u, together=together: attribution_maps(
                b, items, ("gradxinput",), rows_per_pass=len(PARAPHRASES), uncheckpointed=u, share_prefix=True,
                questions_per_backward=together), args.repeats)  # fmt: skip
            print(f"shared row, {u} layers uncheckpointed, {together} question(s) per backward: "
                  f"{g * 1e3:.0f} ms/question = {g / fwd:.2f}x the forward", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
