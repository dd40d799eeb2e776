"""LLaVA-Rad reference: one full prompt per question, eager attention, output_attentions=True.

Slow and memory-hungry (every layer's T x T matrix, T ~ 1420 for the real model) but
obviously correct, and written along a different path from the fast backend wherever one
exists: torchvision transforms for the preprocessing, timm's forward_intermediates for the
vision features, the official tokenizer_image_token splice written out again, no prefix
cache, no batching, no row capture. The fast path (llava_rad_medical_only.LLaVARadMedical:
SDPA, one packed forward per pass, medvlm row capture) is tested against it in
float32 on the tiny checkpoint.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def eager_attention(model):
    """The language model on eager attention for the duration (then back to what it was)."""
    saved = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(saved)


def official_input_ids(tokenizer, prompt: str, image_token_index: int = -200) -> list[int]:
    """llava.mm_utils.tokenizer_image_token, restated: tokenise every "<image>"-separated chunk
    with BOS; keep BOS once; put the placeholder between chunks; drop each later chunk's first
    token when the first chunk began with BOS."""
    chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids = [chunks[0][0]] if offset else []
    for i, c in enumerate(chunks):
        if i > 0:
            ids.append(image_token_index)
        ids.extend(c[offset:])
    return ids


def reference_pixels(image, size: int, mean, std) -> torch.Tensor:
    """open_clip's eval transform with torchvision: [3, size, size] float32."""
    from torchvision import transforms as T

    tf = T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
    return tf(image.convert("RGB"))


def reference_vision_features(trunk, pixel_values: torch.Tensor, select_layer: int) -> torch.Tensor:
    """hidden_states[select_layer] of [embeddings, block 1, ..., block N] without CLS, via
    timm's forward_intermediates (output of block index k - 1, no final norm)."""
    n = len(trunk.blocks)
    k = select_layer % (n + 1)
    if k == 0:
        raise ValueError("the reference does not cover selecting the embeddings (layer 0)")
    feats = trunk.forward_intermediates(
        pixel_values, indices=[k - 1], norm=False, output_fmt="NLC", intermediates_only=True
    )
    return feats[0]


def reference_query_positions(
    tokenizer, prompt: str, question: str, finding: str | None, mode: str, p: int, n: int
) -> list[int]:
    """Absolute positions of the query tokens in the spliced sequence: the last token
    ("answer"), the tokens overlapping the question ("question") or the finding phrase inside
    it ("finding"), located with the tokenizer's offsets on the chunk after "<image>"."""
    second = prompt.split("<image>")[1]
    enc = tokenizer(second, return_offsets_mapping=True)
    offs = enc["offset_mapping"][1:]  # the chunk's BOS is dropped by the splice
    if mode == "answer":
        return [p + n + len(offs) - 1]
    q = question.strip()
    q0 = second.find(q)
    if mode == "question":
        lo, hi = q0, q0 + len(q)
    else:
        phrase = finding.replace("_", " ").strip().lower()
        at = q.lower().find(phrase)
        lo, hi = q0 + at, q0 + at + len(phrase)
    return [p + n + j for j, (a, b) in enumerate(offs) if b > a and a < hi and b > lo]


@torch.no_grad()
def llava_rad_reference_score(
    backend, image, question: str, finding: str | None = None, query_mode: str | None = None, gen_tokens: int = 0
) -> dict:
    """Full eager forward of one question through a loaded LLaVARadMedical's weights.

    query_mode  default backend.config.query_mode
    gen_tokens  also generate this many tokens first (eager, the naive loop's cost; benchmarks)
    returns {
      "prompt":          the prompt text ("<image>" symbolic),
      "input_ids":       pre-splice ids with -200 at the placeholder,
      "image_span":      (p, p + N) in the spliced sequence,
      "query_positions": absolute positions of the query tokens,
      "logits":          [vocab] float32 at the last token,
      "rows":            {layer: [heads, n_query, T] float32} eager attention rows of the query tokens,
      "suffix_rows":     {layer: [heads, T - (p + N), T]} rows of every position after the image,
      "n_tokens":        T,
    }
    """
    import llava_rad_medical_only as lr

    cfg = backend.config
    mode = query_mode or cfg.query_mode
    tok, model = backend.tokenizer, backend.model
    full_q = cfg.full_question(question)
    # conv_vicuna_v1, SeparatorStyle.TWO: system + sep, "USER: " + msg + sep, "ASSISTANT:"
    prompt = lr.SYSTEM_PROMPT + " " + "USER" + ": " + "<image>\n" + full_q + " " + "ASSISTANT" + ":"
    ids = official_input_ids(tok, prompt)
    p = ids.index(-200)
    pixels = reference_pixels(image, backend.image_size, backend.mean, backend.std)[None]
    dev, dt = backend.device, backend.dtype
    feats = reference_vision_features(backend.vision.trunk, pixels.to(dev, dt), lr.VISION_SELECT_LAYER)
    img = backend.projector(feats)[0]
    n = img.shape[0]
    emb = model.get_input_embeddings()
    before = emb(torch.tensor(ids[:p], device=dev))
    after = emb(torch.tensor(ids[p + 1 :], device=dev))
    embeds = torch.cat([before, img, after], dim=0)[None]
    t = embeds.shape[1]
    if gen_tokens:
        with eager_attention(model):
            model.generate(inputs_embeds=embeds, attention_mask=torch.ones((1, t), dtype=torch.long, device=dev),
                           max_new_tokens=gen_tokens, min_new_tokens=gen_tokens, do_sample=False)  # fmt: skip
    with eager_attention(model):
        out = model(inputs_embeds=embeds, output_attentions=True, use_cache=False)
    qpos = reference_query_positions(tok, prompt, question, finding, mode, p, n)
    return {
        "prompt": prompt,
        "input_ids": ids,
        "image_span": (p, p + n),
        "query_positions": qpos,
        "logits": out.logits[0, -1].float().cpu(),
        "rows": {i: a[0][:, qpos, :].float().cpu() for i, a in enumerate(out.attentions)},
        "suffix_rows": {i: a[0][:, p + n :, :].float().cpu() for i, a in enumerate(out.attentions)},
        "n_tokens": t,
    }


@torch.no_grad()
def llava_rad_text_only_reference(backend, question: str) -> float:
    """P(yes) of the text-only control: conv_vicuna_v1 without "<image>\\n", tokenised whole
    (BOS first), one full eager forward."""
    import llava_rad_medical_only as lr
    from medvlm.core.scoring import yes_probability

    full_q = backend.config.full_question(question)
    prompt = lr.SYSTEM_PROMPT + " " + "USER" + ": " + full_q + " " + "ASSISTANT" + ":"
    ids = torch.tensor([backend.tokenizer(prompt).input_ids], device=backend.device)
    with eager_attention(backend.model):
        out = backend.model(input_ids=ids, use_cache=False)
    return float(yes_probability(out.logits[:, -1].float(), backend.answer_tokens)[0][0])
