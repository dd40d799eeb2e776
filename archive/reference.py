"""MedGemma reference: one full prompt per question, eager attention, output_attentions=True.

Slow and memory-hungry (every layer's T x T matrix) but obviously correct: the fast path in
medgemma_enhanced.py (SDPA, one packed forward per pass, row capture) is tested
against it in float32 on the tiny model, and benchmarked against it on the GPU.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def eager_text_attention(model):
    """Switch the text model to eager attention for the duration (vision tower untouched)."""
    text = model.config.get_text_config()
    saved = text._attn_implementation
    text._attn_implementation = "eager"
    try:
        yield
    finally:
        text._attn_implementation = saved


def _inputs(backend, image, question: str) -> dict:
    """The processor's own inputs for one full prompt (as the model card builds them), on the
    model's device, pixels in the model's dtype."""
    inputs = backend.processor.apply_chat_template(
        backend._messages(question, image.convert("RGB")), add_generation_prompt=True, tokenize=True,
        return_dict=True, return_tensors="pt",
    )  # fmt: skip
    param = next(backend.model.parameters())
    inputs = {k: v.to(param.device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
    return inputs


@torch.no_grad()
def medgemma_reference(backend, image, question: str) -> dict:
    """Full forward for one question.

    returns {
      "input_ids":  [T] long,
      "logits":     [vocab] float32 at the last token,
      "attentions": list over layers of [heads, T, T] float32 (eager softmax),
      "image_span": (start, end),
      "p_yes": float, "coverage": float,
    }
    """
    from medvlm.core.scoring import yes_probability

    model = backend.model
    inputs = _inputs(backend, image, question)
    with eager_text_attention(model):
        out = model(**inputs, output_attentions=True, use_cache=False)
    ids = inputs["input_ids"][0]
    span = backend._image_span(ids.tolist())
    logits = out.logits[0, -1].float()
    p_yes, coverage = yes_probability(logits[None], backend.answer_tokens)
    return {
        "input_ids": ids.cpu(),
        "logits": logits.cpu(),
        "attentions": [a[0].float().cpu() for a in out.attentions],
        "image_span": span,
        "p_yes": float(p_yes[0]),
        "coverage": float(coverage[0]),
    }


@torch.no_grad()
def naive_study(backend, image, questions, gen_tokens: int = 50) -> list[dict]:
    """What the original scripts did, per question: the full prompt through eager attention
    with output_attentions=True, then `gen_tokens` generated tokens (forced to that length).
    For timing against the fast path; returns the references."""
    out = []
    for q in questions:
        if backend.name == "medgemma":
            ref = medgemma_reference(backend, image, q)
            with eager_text_attention(backend.model):
                backend.model.generate(**_inputs(backend, image, q), max_new_tokens=gen_tokens,
                                       min_new_tokens=gen_tokens, do_sample=False)  # fmt: skip
        else:
            from archive.reference_llava_rad import llava_rad_reference_score

            ref = llava_rad_reference_score(backend, image, q, gen_tokens=gen_tokens)
        out.append(ref)
    return out


@torch.no_grad()
def medgemma_text_only_reference(backend, question: str) -> float:
    """P(yes) of the text-only control: the processor's own chat without the image, one full
    eager forward."""
    from medvlm.core.scoring import yes_probability

    model = backend.model
    enc = backend.processor.apply_chat_template(
        backend._messages(question, with_image=False), add_generation_prompt=True, tokenize=True,
        return_dict=True, return_tensors="pt",
    )  # fmt: skip
    enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
    with eager_text_attention(model):
        out = model(**enc, use_cache=False)
    return float(yes_probability(out.logits[:, -1].float(), backend.answer_tokens)[0][0])
