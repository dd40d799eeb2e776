"""Row capture against eager output_attentions on the tiny Gemma3, float32."""

import dataclasses

import pytest
import torch
from conftest import max_diff
from transformers.masking_utils import AttentionMaskInterface

from archive.reference import eager_text_attention
from medvlm.core.capture import (
    ATTN_IMPLEMENTATION,
    CaptureSpec,
    attention_modules_of,
    capture_resid_norms,
    capture_rows,
    register,
)
from medvlm.core.tiny_medgemma import tiny_medgemma


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_medgemma(sliding_window=24)  # smaller than the prompt: sliding masks matter
    return model, processor


def _inputs(processor, image, question):
    msgs = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def _spec(model, T, queries, head_mode="none"):
    n_layers = model.config.get_text_config().num_hidden_layers
    return CaptureSpec(
        layers=tuple(range(n_layers)),
        query_index=torch.tensor([queries]),
        query_valid=torch.ones((1, len(queries)), dtype=torch.bool),
        key_span=None,
        n_keys=T,
        head_mode=head_mode,
    )


def test_rows_equal_eager_on_every_layer_and_logits_unchanged(tiny, rgb_image):
    model, processor = tiny
    inputs = _inputs(processor, rgb_image, "Is there a pleural effusion? Answer yes or no.")
    T = inputs["input_ids"].shape[1]
    queries = [T - 1, T - 5, T - 12, 3]
    with torch.no_grad():
        plain = model(**inputs).logits
        with eager_text_attention(model):
            ref = model(**inputs, output_attentions=True)
        decoder = model.model.language_model
        with capture_rows(attention_modules_of(decoder), _spec(model, T, queries)) as cap:
            captured = model(**inputs).logits
    assert model.config.get_text_config().layer_types.count("sliding_attention") > 0
    for layer, att in enumerate(ref.attentions):
        expected = att[0][:, queries, :]  # [head, query, key]
        got = cap.hook_pattern[layer][0]
        d = max_diff(got, expected)
        assert d <= 1e-5, f"layer {layer}: captured rows differ from eager by {d:.3g}"
    d = max_diff(captured, plain)
    assert d <= 1e-5, f"capture changed the logits by {d:.3g}"
    d = max_diff(captured, ref.logits)
    assert d <= 1e-4, f"eager and sdpa logits differ by {d:.3g}"


def test_capture_uninstalls_when_the_forward_fails(tiny):
    model, _ = tiny
    decoder = model.model.language_model
    mods = attention_modules_of(decoder)
    before = decoder.config._attn_implementation
    spec = dataclasses.replace(_spec(model, 10, [0]), causal_prefix=4)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_rows(mods, spec):
            assert decoder.config._attn_implementation == ATTN_IMPLEMENTATION
            assert all(m._medvlm_causal_prefix == 4 for m in mods)
            raise RuntimeError("boom")
    assert decoder.config._attn_implementation == before
    assert not any(hasattr(m, "_medvlm_row_capture") or hasattr(m, "_medvlm_causal_prefix") for m in mods)


def test_without_the_mask_function_capture_refuses(tiny, rgb_image):
    """The pitfall: without a registered mask function the attention function gets no mask."""
    model, processor = tiny
    register()
    inputs = _inputs(processor, rgb_image, "Is there a pneumothorax?")
    T = inputs["input_ids"].shape[1]
    saved = AttentionMaskInterface._global_mapping.pop(ATTN_IMPLEMENTATION)
    try:
        with pytest.raises(RuntimeError, match="no attention mask"):
            mods = attention_modules_of(model.model.language_model)
            with torch.no_grad(), capture_rows(mods, _spec(model, T, [T - 1])):
                AttentionMaskInterface._global_mapping.pop(ATTN_IMPLEMENTATION, None)
                model(**inputs)
    finally:
        AttentionMaskInterface._global_mapping[ATTN_IMPLEMENTATION] = saved


def test_spec_rejects_bad_shapes():
    with pytest.raises(ValueError, match="batch, n_query"):
        CaptureSpec((0,), torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool), None, 5)
    with pytest.raises(ValueError, match="outside"):
        CaptureSpec((0,), torch.zeros((1, 1), dtype=torch.long), torch.ones((1, 1), dtype=torch.bool), (2, 9), 5)
    with pytest.raises(ValueError, match="causal prefix 5 outside"):
        CaptureSpec((0,), torch.zeros((1, 1), dtype=torch.long), torch.ones((1, 1), dtype=torch.bool), None, 5,
                    causal_prefix=5)  # fmt: skip
    with pytest.raises(ValueError, match="attention_head_mode"):
        one = torch.ones((1, 1), dtype=torch.bool)
        CaptureSpec((0,), torch.zeros((1, 1), dtype=torch.long), one, None, 5, "median")


def test_resid_norms_equal_the_hidden_states_entering_each_layer(tiny, rgb_image):
    """hook_resid_pre_norm[l] = ||output_hidden_states' hidden_states[l]|| over the span (the input
    of layer l), and the forward's logits are unchanged."""
    model, processor = tiny
    inputs = _inputs(processor, rgb_image, "Is there a pleural effusion?")
    ids = inputs["input_ids"][0]
    image = (ids == model.config.image_token_id).nonzero()[:, 0]
    span = (int(image[0]), int(image[-1]) + 1)
    decoder = model.model.language_model
    layers = (0, 2, len(decoder.layers) - 1)
    with torch.no_grad():
        ref = model(**inputs, output_hidden_states=True)
        with capture_resid_norms(decoder.layers, layers, span) as cap:
            got = model(**inputs).logits
    assert max_diff(got, ref.logits) <= 1e-5
    for layer in layers:
        want = ref.hidden_states[layer][:, span[0] : span[1]].norm(dim=-1)  # [batch, n_image]
        d = max_diff(cap.hook_resid_pre_norm[layer], want) / want.abs().max().item()
        assert d <= 1e-6, f"layer {layer}: resid norms differ from hidden_states[{layer}] by {d:.3g} (relative)"
    assert sorted(cap.hook_resid_pre_norm) == sorted(layers)


def test_resid_norm_hooks_are_removed_when_the_forward_fails(tiny):
    model, _ = tiny
    layers = model.model.language_model.layers
    with pytest.raises(RuntimeError, match="boom"):
        with capture_resid_norms(layers, (0, 1), (0, 4)):
            assert len(layers[0]._forward_pre_hooks) == 1
            raise RuntimeError("boom")
    assert not any(layer._forward_pre_hooks for layer in layers)
    with pytest.raises(RuntimeError, match=r"recorded layers \[\], expected \[0, 1\]"):
        with capture_resid_norms(layers, (0, 1), (0, 4)):
            pass  # no forward: no layer ran
    with pytest.raises(ValueError, match="no decoder layer"):
        with capture_resid_norms(layers, (len(layers),), (0, 4)):
            pass
