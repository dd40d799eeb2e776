"""The packed pass's layout and masks (medvlm.core.engine), by hand on small cases. The packed
pass itself is compared with the eager full-prompt reference in test_medgemma.py and
test_llava_rad.py."""

import contextlib
from types import SimpleNamespace

import pytest
import torch

from medvlm.core import engine
from medvlm.core.engine import pack_suffixes, packed_masks

PLAIN = SimpleNamespace(layer_types=None, sliding_window=None)


def test_pack_places_each_study_questions_in_its_own_row():
    layout = pack_suffixes([[7, 8], [9], [5, 6, 4]], rows=[0, 1, 0], n_studies=2, pad_id=0)
    assert layout.suffix_ids.tolist() == [[7, 8, 5, 6, 4], [9, 0, 0, 0, 0]]
    assert layout.owner.tolist() == [[0, 0, 2, 2, 2], [1, -1, -1, -1, -1]]
    assert layout.offset.tolist() == [[0, 1, 0, 1, 2], [0, 0, 0, 0, 0]]
    assert layout.start_of == (0, 0, 2)


def test_masks_keep_each_question_to_the_prefix_and_itself():
    P = 3
    layout = pack_suffixes([[7, 8], [5, 6, 4]], rows=[0, 0], n_studies=1, pad_id=0)
    mask, pos = packed_masks(PLAIN, layout, P, "cpu")
    assert pos.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]  # each question restarts at P
    m = mask[0, 0]
    # prefix: causal within the prefix, nothing after it
    assert m[:P, :P].tolist() == torch.ones(P, P, dtype=torch.bool).tril().tolist()
    assert not m[:P, P:].any()
    # question 0 (columns 3, 4) and question 1 (columns 5, 6, 7): the prefix, then its own earlier tokens
    assert m[P:, :P].all()
    assert m[3, 3:].tolist() == [True, False, False, False, False]
    assert m[4, 3:].tolist() == [True, True, False, False, False]
    assert m[6, 3:].tolist() == [False, False, True, True, False]
    assert m[7, 3:].tolist() == [False, False, True, True, True]


def test_pads_see_only_the_prefix():
    layout = pack_suffixes([[7, 8, 9], [5]], rows=[0, 1], n_studies=2, pad_id=0)
    mask, _ = packed_masks(PLAIN, layout, 2, "cpu")
    assert mask.shape == (2, 1, 5, 5)
    for pad in (3, 4):  # study 1's pads
        assert mask[1, 0, pad].tolist() == [True, True, False, False, False]


def test_bidirectional_span_and_sliding_window():
    """Gemma3's composition: AND(window, OR(causal, image block)), the block inside the prefix."""
    cfg = SimpleNamespace(layer_types=["sliding_attention", "full_attention"], sliding_window=2)
    layout = pack_suffixes([[7, 8]], rows=[0], n_studies=1, pad_id=0)
    masks, _ = packed_masks(cfg, layout, 4, "cpu", bidirectional_span=(1, 3))
    full, sliding = masks["full_attention"][0, 0], masks["sliding_attention"][0, 0]
    assert full[1, 2]  # image token 1 sees image token 2 (later)
    assert not full[0, 1]  # the text before the image does not see it early
    assert not full[3, 4] and full[4, 3]  # causal after the image
    assert full[5].tolist() == [True, True, True, True, True, True]  # position 5 sees all before it
    # window 2: position 5 keeps keys at positions 4 and 5 only; the prefix's row 3 keys 2, 3
    assert sliding[5].tolist() == [False, False, False, False, True, True]
    assert sliding[3].tolist() == [False, False, True, True, False, False]
    assert sliding[1, 2]  # the block survives inside the window


def test_bad_bidirectional_span_is_refused():
    layout = pack_suffixes([[7]], rows=[0], n_studies=1, pad_id=0)
    with pytest.raises(ValueError, match="not inside the 3-token prefix"):
        packed_masks(PLAIN, layout, 3, "cpu", bidirectional_span=(2, 5))


def test_sliding_model_without_layer_types_is_refused():
    cfg = SimpleNamespace(layer_types=None, sliding_window=8, use_sliding_window=True)
    layout = pack_suffixes([[7]], rows=[0], n_studies=1, pad_id=0)
    with pytest.raises(ValueError, match="without layer_types"):
        packed_masks(cfg, layout, 3, "cpu")


# -- the pure-causal fast path ------------------------------------------------------------------
def test_pure_causal_only_when_the_mask_is_plain_causal():
    one_each = pack_suffixes([[7, 8, 9], [5]], rows=[0, 1], n_studies=2, pad_id=0)  # row 1: 5, pad, pad
    assert engine.pure_causal(PLAIN, one_each)
    assert not engine.pure_causal(PLAIN, pack_suffixes([[7, 8], [5]], rows=[0, 0], n_studies=1, pad_id=0))
    assert not engine.pure_causal(PLAIN, one_each, bidirectional_span=(0, 2))
    sliding = SimpleNamespace(layer_types=["full_attention", "sliding_attention"], sliding_window=4)
    assert not engine.pure_causal(sliding, one_each)
    assert not engine.pure_causal(SimpleNamespace(layer_types=None, sliding_window=4), one_each)
    chunked = SimpleNamespace(layer_types=["chunked_attention"], sliding_window=None)
    assert not engine.pure_causal(chunked, one_each)
    gap = engine.PackedLayout(one_each.suffix_ids, torch.tensor([[0, -1, 0]]), one_each.offset[:1], (0,))
    assert not engine.pure_causal(PLAIN, gap), "a real token after a pad would see the pad"


def _tiny_llama(seed=0):
    """A two-layer float32 Llama (SDPA) and a three-token prefix embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    return model, model.model.embed_tokens(torch.tensor([[1, 2, 3]])).detach()


def _control_pass(model, prefix, suffixes, rows, n_studies, masks_seen):
    """score_packed's control pass (layers ()) of the tiny Llama, recording each mask the
    forward is handed. -> P(yes) [Q] float64."""
    from medvlm.core.scoring import AnswerTokens

    def forward(suffix_ids, position_ids, mask):
        masks_seen.append(mask)
        embeds = torch.cat([prefix.expand(suffix_ids.shape[0], -1, -1), model.model.embed_tokens(suffix_ids)], dim=1)
        return model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).last_hidden_state

    out = engine.score_packed(
        forward=forward, head=model.lm_head, attention_modules=[layer.self_attn for layer in model.model.layers],
        config=model.config, n_studies=n_studies, prefix_len=prefix.shape[1], suffixes=suffixes,
        query_positions=[[len(s) - 1] for s in suffixes], prefix_rows=rows, pad_id=0, image_span=None, layers=(),
        head_mode="mean", answer_tokens=AnswerTokens((5, 6), (7,), ("yes", "Yes"), ("no",)),
    )  # fmt: skip
    return out.p_yes


def test_control_pass_of_one_question_per_row_runs_plain_causal(causal_calls, monkeypatch):
    """One question per study (different lengths: pads): mask None, causal SDPA in every
    layer, the same P(yes) as the masked pass (float32)."""
    model, prefix = _tiny_llama()
    suffixes, seen = [[9, 10, 11, 12], [13, 14], [15, 16, 17]], []
    fast = _control_pass(model, prefix, suffixes, [0, 1, 2], 3, seen)
    assert seen == [None] and len(causal_calls) == len(model.model.layers)
    monkeypatch.setattr(engine, "CAUSAL_FAST_PATH", False)
    masked = _control_pass(model, prefix, suffixes, [0, 1, 2], 3, seen)
    assert seen[1] is not None and len(causal_calls) == len(model.model.layers)
    diff = (fast - masked).abs().max().item()
    assert diff <= 1e-6, f"fast path vs masked pass: max diff {diff:.3e}"
    assert model.config._attn_implementation == "sdpa", "the attention implementation is restored"


def test_control_pass_of_several_questions_per_row_keeps_the_mask(causal_calls, monkeypatch):
    """Two questions in one row: the block mask (the second question must not see the first),
    never the fast path, which would change the second question's P(yes)."""
    model, prefix = _tiny_llama()
    suffixes, seen = [[9, 10, 11], [13, 14]], []
    masked = _control_pass(model, prefix, suffixes, [0, 0], 1, seen)
    assert seen[0] is not None and causal_calls == [], "the fast path was taken for a packed row"
    separate = torch.cat([_control_pass(model, prefix, [s], [0], 1, seen) for s in suffixes])
    assert (masked - separate).abs().max().item() <= 1e-6
    monkeypatch.setattr(engine, "pure_causal", lambda *a, **k: True)  # what taking it would do
    wrong = _control_pass(model, prefix, suffixes, [0, 0], 1, seen)
    assert abs(wrong[1] - masked[1]).item() > 1e-4, "this case cannot tell the fast path from the mask"


@pytest.mark.parametrize("model", ["llava_rad", "medgemma"])
def test_faithfulness_passes_run_plain_causal_for_llava_rad_only(model, causal_calls, monkeypatch):
    """The curves' passes (medvlm.analysis.faithfulness.score_pixels: one question per image, no rows
    captured) of three perturbed images: LLaVA-Rad's run on the fast path with the masked
    pass's P(yes) (float32); MedGemma's (image block, sliding layers) keep the mask."""
    import numpy as np
    from PIL import Image

    from llava_rad_medical_only import LLaVARadMedical
    from medgemma_enhanced import MedGemmaMedical
    from medvlm.analysis.faithfulness import model_pixels, score_pixels

    backend = LLaVARadMedical.tiny() if model == "llava_rad" else MedGemmaMedical.tiny()
    rng = np.random.default_rng(5)
    images = [Image.fromarray((rng.random((40, 50, 3)) * 255).astype("uint8")) for _ in range(3)]
    questions = ["Is there a pleural effusion?", "Is the heart enlarged?", "Is there a pneumothorax?"]
    pixels = model_pixels(backend, images)
    pixels = pixels + 0.1 * torch.randn(pixels.shape, generator=torch.Generator().manual_seed(0))
    fast = score_pixels(backend, images, questions, [None] * 3, pixels)
    n_layers = len(backend._attention)
    assert len(causal_calls) == (n_layers if model == "llava_rad" else 0), f"{model}: {len(causal_calls)} causal calls"
    monkeypatch.setattr(engine, "CAUSAL_FAST_PATH", False)
    masked = score_pixels(backend, images, questions, [None] * 3, pixels)
    diff = float(np.abs(fast - masked).max())
    assert diff <= 1e-6, f"{model}: fast path vs masked pass, P(yes) max diff {diff:.3e}"
    assert np.ptp(masked) > 1e-6, "the three passes' P(yes) are all equal: the comparison could not fail"


def test_to_host_drops_the_logits_unless_kept_and_waits_on_nothing_off_cuda():
    p = torch.rand(3, dtype=torch.float64)
    out = engine.PackedScores(logits=torch.randn(3, 11), p_yes=p, coverage=p, attention=torch.rand(3, 2, 4),
                              image_mass=torch.rand(3, 2), layers=(0, 1), n_query=torch.ones(3, dtype=torch.long))
    host, ready = engine.to_host(out)
    assert ready is None and host.logits is None
    assert torch.equal(host.attention, out.attention) and torch.equal(host.p_yes, out.p_yes)
    kept, _ = engine.to_host(out, keep_logits=True)
    assert torch.equal(kept.logits, out.logits)


def test_on_stream_queues_fn_on_the_stream_then_hands_its_tensor_to_the_current_one(monkeypatch):
    """on_stream's order of events (recorded with stand-ins for torch.cuda's stream calls; the
    GPU test in tests/test_gpu.py checks the overlap itself): fn runs with `stream` current,
    then the current stream waits for it, then the tensor is recorded for the current stream's
    use. Without a stream, fn runs as it is."""
    events = []

    class FakeStream:
        def __init__(self, name):
            self.name, self.device = name, "cuda:0"

        def wait_stream(self, other):
            events.append(f"{self.name} waits for {other.name}")

    class FakeTensor:
        def record_stream(self, s):
            events.append(f"tensor recorded for {s.name}")

    side, main = FakeStream("side"), FakeStream("main")
    current = [main]

    @contextlib.contextmanager
    def stream_context(s):
        saved, current[0] = current[0], s
        events.append(f"enter {s.name}")
        try:
            yield
        finally:
            current[0] = saved
            events.append(f"leave {s.name}")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0])
    monkeypatch.setattr(torch.cuda, "stream", stream_context)
    out = FakeTensor()

    def fn():
        events.append(f"fn on {current[0].name}")
        return out

    assert engine.on_stream(side, fn) is out
    assert events == ["enter side", "fn on side", "leave side", "main waits for side", "tensor recorded for main"]
    events.clear()
    assert engine.on_stream(None, fn) is out
    assert events == ["fn on main"]
