"""Compare this project's LLaVA-Rad backend with the official implementation on real weights.

The official llava package pins transformers 4.31 and cannot live beside the transformers this
project needs, so the comparison runs in two environments and meets in one file:

  1. In an environment with the official package (git clone https://github.com/microsoft/LLaVA-Rad;
     cd LLaVA-Rad; pip install -e .), dump what the official code computes:

       python archive/llava_rad_official_compare.py dump --image cxr.png \\
           --question "Is there a pleural effusion?" --out official_dump.pt

     (the prompt is built with conv_templates["v1"] and tokenizer_image_token as
     llava/eval/model_mimic_cxr.py does; the forward uses the official eager attention with
     output_attentions=True)

  2. In this project's environment, run the backend on the same image and question and compare:

       python archive/llava_rad_official_compare.py compare --image cxr.png --dump official_dump.pt

It prints the max abs difference of: the pre-splice token ids, the preprocessed pixels, the
projected image embeddings, the last-token logits, P(yes), and the last token's attention rows
over the image span (per layer, every head). Both sides default to float16 on CUDA, as the
official loader does; fp16 differences of order 1e-3 in logits are expected (the official LoRA
merge runs in fp16, this one in fp32 then casts), and in attention rows of order 1e-4.

Nothing here is imported by the project or its tests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _dump_official(args) -> int:
    try:
        import torch
        from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
        from llava.conversation import conv_templates
        from llava.mm_utils import tokenizer_image_token
        from llava.model.builder import load_pretrained_model
        from PIL import Image
    except ImportError as e:
        print(f"the official llava package is not importable here ({e}).\n"
              "Install it in its own environment: git clone https://github.com/microsoft/LLaVA-Rad && "
              "cd LLaVA-Rad && pip install -e .", file=sys.stderr)  # fmt: skip
        return 2
    tokenizer, model, image_processor, _ = load_pretrained_model(
        args.model_path, args.model_base, "llavarad", device=args.device
    )
    model.eval()
    q = DEFAULT_IMAGE_TOKEN + "\n" + args.question.replace("<image>", "").strip()
    conv = conv_templates["v1"].copy()
    conv.append_message(conv.roles[0], q)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
    image = Image.open(args.image).convert("RGB")
    pixels = image_processor.preprocess(image, return_tensors="pt")["pixel_values"][0]
    with torch.inference_mode():
        feats = model.encode_images(pixels[None].half().to(args.device))
        out = model(
            input_ids[None].to(args.device),
            images=pixels[None].half().to(args.device),
            output_attentions=True,
            use_cache=False,
            return_dict=True,
        )
    rows = torch.stack([a[0, :, -1, :].float().cpu() for a in out.attentions])  # [L, H, T]
    yes_no = {w: tokenizer(w, add_special_tokens=False).input_ids for w in ("yes", "Yes", "no", "No")}
    torch.save(
        {
            "prompt": prompt,
            "question": args.question,
            "input_ids": input_ids.tolist(),
            "pixel_values": pixels.float(),
            "image_embeddings": feats[0].float().cpu(),
            "logits": out.logits[0, -1].float().cpu(),
            "last_rows": rows,
            "yes_no_ids": yes_no,
            "model_path": args.model_path,
            "model_base": args.model_base,
        },
        args.out,
    )
    print(f"wrote {args.out}: {len(input_ids)} pre-splice ids, {rows.shape[-1]} positions, {rows.shape[0]} layers")
    return 0


def _compare(args) -> int:
    import torch
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from llava_rad_medical_only import LLaVARadMedical, MedicalAttentionConfig
    from medvlm.core.scoring import yes_probability

    ref = torch.load(args.dump, map_location="cpu", weights_only=True)
    question = ref["question"]
    cfg = MedicalAttentionConfig(attention_head_mode="none", layers="all", query_mode="answer", answer_suffix="")
    backend = LLaVARadMedical(cfg).load_model(args.model_path, args.model_base, device=args.device)
    image = Image.open(args.image)
    toks = backend.tokenize(question)
    n = backend.n_image_tokens
    p = toks.placeholder_index
    report = {}
    report["prompt identical"] = toks.prompt == ref["prompt"]
    report["pre-splice ids identical"] = toks.input_ids() == ref["input_ids"]
    pixels = backend.preprocess(image)
    report["pixels max abs diff"] = (pixels - ref["pixel_values"]).abs().max().item()
    emb = backend.image_embeddings(pixels[None])[0].float().cpu()
    report["image embeddings max abs diff"] = (emb - ref["image_embeddings"]).abs().max().item()
    score = backend.score(image, [question])[0]
    cache, prefix_len = backend.prefix_cache(pixels[None], toks.prefix_ids)
    decoder = backend.model.model
    from medvlm.core.engine import cache_kwargs

    ids = torch.tensor([list(toks.suffix_ids)], device=backend.device)
    pos = torch.arange(prefix_len, prefix_len + ids.shape[1], device=backend.device)[None]
    h = decoder(input_ids=ids, position_ids=pos, use_cache=True, **cache_kwargs(decoder, cache)).last_hidden_state
    logits = backend.model.lm_head(h[0, -1]).float().cpu()
    report["logits max abs diff"] = (logits - ref["logits"]).abs().max().item()
    report["argmax token (ours, official)"] = (int(logits.argmax()), int(ref["logits"].argmax()))
    p_off, _ = yes_probability(ref["logits"][None], backend.answer_tokens)
    report["P(yes) (ours, official)"] = (score.p_yes, float(p_off[0]))
    off_rows = ref["last_rows"][:, :, p : p + n]  # [L, H, N]
    ours = torch.from_numpy(score.attention)  # [L, H, N] (head mode "none")
    diff = (ours - off_rows).abs()
    report["attention rows max abs diff (all layers, heads)"] = diff.max().item()
    report["attention rows max abs diff per layer"] = [round(v, 7) for v in diff.amax(dim=(1, 2)).tolist()]
    report["image mass per layer (official)"] = [round(v, 4) for v in off_rows.sum(-1).mean(1).tolist()]
    width = max(len(k) for k in report)
    for k, v in report.items():
        print(f"{k:<{width}}  {v}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("dump", "compare"):
        s = sub.add_parser(name)
        s.add_argument("--image", required=True)
        s.add_argument("--model_path", default="microsoft/llava-rad")
        s.add_argument("--model_base", default="lmsys/vicuna-7b-v1.5")
        s.add_argument("--device", default="cuda")
        if name == "dump":
            s.add_argument("--question", required=True)
            s.add_argument("--out", default="official_dump.pt")
        else:
            s.add_argument("--dump", required=True)
    args = ap.parse_args(argv)
    return _dump_official(args) if args.cmd == "dump" else _compare(args)


if __name__ == "__main__":
    raise SystemExit(main())
