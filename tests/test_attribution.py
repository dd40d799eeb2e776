"""Gradient x input and generic attention relevancy (medvlm.core.attribution) on the tiny models of
both architectures, against the slow references in archive/reference_attribution.py: a float64
finite difference of the margin, and torch.autograd on the full-prompt eager forward with
Chefer's T x T relevancy matrix."""

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from archive.reference_attribution import margin_with_image_embeddings, reference_attribution
from llava_rad_medical_only import LLaVARadMedical
from medgemma_enhanced import MedGemmaMedical
from medvlm.core import engine
from medvlm.core.attribution import (
    GRADIENT_KINDS,
    attribution_maps,
    attribution_margins,
    parse_attribution,
)
from medvlm.core.fused_norms import patched_forwards
from medvlm.core.store import map_key

QUESTIONS = ["Is there a pleural effusion?", "Is the heart enlarged?"]
TOL = 1e-5  # float32, absolute
REL = 1e-4  # and relative to the map's largest |value| (the tiny models' maps are small)


def images():
    rng = np.random.default_rng(3)
    return [Image.fromarray((rng.random((70, 90, 3)) * 255).astype("uint8")),
            Image.fromarray((rng.random((64, 48)) * 255).astype("uint8")).convert("RGB")]  # fmt: skip


def items():
    a, b = images()
    return [(a, QUESTIONS, None), (b, QUESTIONS[:1], None)]


def pairs():
    """(image, question) of each question of items(), in order."""
    return [(im, q) for im, qs, _ in items() for q in qs]


@pytest.fixture(scope="module", params=["llava_rad", "medgemma"])
def backend(request):
    return LLaVARadMedical.tiny() if request.param == "llava_rad" else MedGemmaMedical.tiny()


@pytest.fixture(scope="module")
def batched(backend):
    """Both maps for 3 questions of 2 studies, all rows in one pass."""
    return attribution_maps(backend, items(), GRADIENT_KINDS, rows_per_pass=3)


def _close(a, b, what):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff, scale = float(np.abs(a - b).max()), float(np.abs(b).max())
    assert scale > 0, f"{what}: the reference map is all zeros (the comparison could not fail)"
    assert diff <= TOL and diff <= REL * scale, f"{what}: max diff {diff:.3e} (map scale {scale:.3e})"
    return diff


def test_maps_equal_autograd_on_the_eager_full_prompt_reference(backend, batched):
    """Both maps, and gradient x input on a shared prefix with both of a study's questions in one
    vmapped backward, against autograd on the eager full-prompt reference, question by question."""
    assert set(batched.maps) == set(GRADIENT_KINDS)
    assert batched.layers == {"gradxinput": (0,), "relevancy": (len(backend._attention) - 1,)}
    vmapped = attribution_maps(backend, items(), ("gradxinput",), rows_per_pass=3, share_prefix=True,
                               questions_per_backward=2)  # fmt: skip
    for q, (image, question) in enumerate(pairs()):
        ref = reference_attribution(backend, image, question)
        assert abs(batched.margin[q] - ref["margin"]) <= TOL, (question, batched.margin[q], ref["margin"])
        assert batched.target[q] == ("yes" if ref["margin"] >= 0 else "no")
        for kind in GRADIENT_KINDS:
            assert batched[kind].shape == (3, 1, ref[kind].numel())
            _close(batched[kind][q, 0], ref[kind].numpy(), f"{backend.name} {kind} question {q}")
        _close(vmapped["gradxinput"][q, 0], ref["gradxinput"].numpy(), f"{backend.name} vmapped question {q}")
    assert (batched["relevancy"] >= 0).all(), "relevancy is a sum of products of non-negative terms"
    assert (batched["gradxinput"] < 0).any() and (batched["gradxinput"] > 0).any(), "gradxinput is stored signed"


def test_batching_questions_and_studies_changes_no_map(backend, batched):
    """One row per pass and no layer checkpointed (batched: 3 rows, all but the last layer
    checkpointed): the same maps."""
    one = attribution_maps(backend, items(), GRADIENT_KINDS, rows_per_pass=1, uncheckpointed=len(backend._attention))
    for kind in GRADIENT_KINDS:
        diff = np.abs(one[kind] - batched[kind]).max()
        assert diff <= 1e-6 * max(1.0, np.abs(one[kind]).max()), f"{kind}: batched vs one at a time {diff:.3e}"
    # the three questions' maps differ (rows never share a gradient)
    assert np.abs(batched["gradxinput"][0] - batched["gradxinput"][1]).max() > 1e-6


def test_causal_fast_path_equals_the_masked_path(backend, causal_calls, monkeypatch):
    """LLaVA-Rad's rows (one question each, a causal decoder) run on plain causal SDPA, forward
    and backward (checkpointed layers recompute on it): the same maps and margins as under the
    packed mask (float32). MedGemma's rows (image block, sliding layers) never take it, nor
    relevancy (its eager attention needs the mask)."""
    n_layers = len(backend._attention)
    fast = attribution_maps(backend, items(), ("gradxinput",), rows_per_pass=2, uncheckpointed=1, share_prefix=False)
    margins = attribution_margins(backend, items(), rows_per_pass=2)
    taken = len(causal_calls)
    # 2 passes: each layer forward once, checkpointed layers again in the backward; 2 margin passes
    expected = 2 * (2 * n_layers - 1) + 2 * n_layers if backend.name == "llava_rad" else 0
    assert taken == expected, f"{backend.name}: {taken} attention calls on the causal path, expected {expected}"
    attribution_maps(backend, items()[1:], ("relevancy",))
    assert len(causal_calls) == taken, "relevancy took the causal fast path"
    monkeypatch.setattr(engine, "CAUSAL_FAST_PATH", False)
    masked = attribution_maps(backend, items(), ("gradxinput",), rows_per_pass=2, uncheckpointed=1,
                              share_prefix=False)  # fmt: skip
    assert len(causal_calls) == taken
    _close(fast["gradxinput"], masked["gradxinput"], f"{backend.name} gradxinput, fast path vs masked")
    diff = float(np.abs(fast.margin - masked.margin).max())
    assert diff <= TOL, f"{backend.name}: margins, fast path vs masked, max diff {diff:.3e}"
    diff = float(np.abs(margins - attribution_margins(backend, items(), rows_per_pass=2)).max())
    assert diff <= TOL, f"{backend.name}: forward-only margins, fast path vs masked, max diff {diff:.3e}"


def test_shared_prefix_passes_equal_one_question_per_row(backend, monkeypatch):
    """Gradient x input with each study's questions packed after one copy of its prefix (one
    backward per question, the graph kept between them) gives every map and margin of the one
    question per row layout. LLaVA-Rad's shared rows run the prefix on plain causal SDPA and
    only the packed questions under the mask (engine._split_attention, forward, recomputation
    and backward); the same under the whole mask. MedGemma's image block never takes it."""
    from medvlm.core import engine

    calls = []
    real = engine._split_attention
    monkeypatch.setattr(engine, "_split_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    n_layers = len(backend._attention)
    per_row = attribution_maps(backend, items(), ("gradxinput",), rows_per_pass=2, uncheckpointed=1,
                               share_prefix=False)  # fmt: skip
    shared = attribution_maps(backend, items(), ("gradxinput",), rows_per_pass=3, uncheckpointed=1,
                              share_prefix=True)  # fmt: skip
    # study a's two questions share one row (one forward, two backwards recomputing the n - 1
    # checkpointed layers each); study b's single question is a row of its own (pure causal)
    expected = n_layers + 2 * (n_layers - 1) if backend.name == "llava_rad" else 0
    assert len(calls) == expected, f"{backend.name}: {len(calls)} split attention calls, expected {expected}"
    _close(shared["gradxinput"], per_row["gradxinput"], f"{backend.name} gradxinput, shared prefix vs per row")
    diff = float(np.abs(shared.margin - per_row.margin).max())
    assert diff <= TOL, f"{backend.name}: margins, shared prefix vs per row, max diff {diff:.3e}"
    assert np.abs(shared["gradxinput"][0] - shared["gradxinput"][1]).max() > 1e-6, "questions sharing a row differ"
    monkeypatch.setattr(engine, "CAUSAL_FAST_PATH", False)
    masked = attribution_maps(backend, items(), ("gradxinput",), rows_per_pass=3, uncheckpointed=1,
                              share_prefix=True)  # fmt: skip
    assert len(calls) == expected
    _close(masked["gradxinput"], shared["gradxinput"], f"{backend.name} gradxinput, split vs masked attention")


@pytest.mark.parametrize("together", [2, 5])
def test_questions_of_a_shared_row_in_one_vmapped_backward_give_the_same_maps(backend, together):
    """questions_per_backward: a shared row's questions differentiated `together` at a time in
    one backward vmapped over them (is_grads_batched) give every map and margin of one question
    per row (the last layer uncheckpointed: its norms' and MLP's _Recomputed backward runs under
    the vmap too), and walk the checkpointed layers' recomputation once per group of questions:
    counted at the attention modules."""
    a, b = images()
    questions = [*QUESTIONS, "Is there a pneumothorax?", "Is the lung clear?", "Any fracture?"]
    cases = [(a, questions, None), (b, QUESTIONS[:1], None)]
    per_row = attribution_maps(backend, cases, ("gradxinput",), rows_per_pass=6, uncheckpointed=1,
                               share_prefix=False)  # fmt: skip
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in backend._attention]
    try:
        vmapped = attribution_maps(backend, cases, ("gradxinput",), rows_per_pass=6, uncheckpointed=1,
                                   share_prefix=True, questions_per_backward=together)  # fmt: skip
    finally:
        for h in hooks:
            h.remove()
    n = len(backend._attention)
    groups = -(-len(questions) // together)  # study a's backwards; study b's single question: one
    expected = 2 * n + (groups + 1) * (n - 1)  # two forwards, and each backward recomputes n - 1 layers
    assert len(calls) == expected, f"{backend.name}: {len(calls)} attention calls, expected {expected}"
    _close(vmapped["gradxinput"], per_row["gradxinput"], f"{backend.name} gradxinput, {together} per backward")
    diff = float(np.abs(vmapped.margin - per_row.margin).max())
    assert diff <= TOL, f"{backend.name}: margins, vmapped backward vs per row, max diff {diff:.3e}"
    with pytest.raises(ValueError, match="questions_per_backward must be >= 1, got -1"):
        attribution_maps(backend, cases, ("gradxinput",), share_prefix=True, questions_per_backward=-1)


def test_shared_passes_never_mix_studies():
    from medvlm.core.attribution import _passes

    assert _passes([0, 0, 0, 1, 1, 2], 2, shared=True) == [[0, 1], [2], [3, 4], [5]]
    assert _passes([0, 0, 0, 1, 1, 2], 2, shared=False) == [[0, 1], [2, 3], [4, 5]]
    assert _passes([0, 0, 1], 5, shared=True) == [[0, 1], [2]]


def test_recomputation_stops_before_llava_rads_down_projection(backend):
    """The cost model's recomputation: a checkpointed Llama layer is recomputed in the backward
    only up to its MLP's down projection (the frozen projection saves nothing, so
    checkpointing's early stop ends the recomputation at the product before it); Gemma3's
    post-feedforward norm saves the projection's output, so MedGemma's layers run it again."""
    layers = backend.model.model.layers if backend.name == "llava_rad" else backend._decoder.layers
    calls = []
    hooks = [layer.mlp.down_proj.register_forward_hook(lambda *a: calls.append(1)) for layer in layers]
    try:
        attribution_maps(backend, items(), ("gradxinput",), rows_per_pass=2, uncheckpointed=1, share_prefix=False)
    finally:
        for h in hooks:
            h.remove()
    n = len(layers)
    # 2 passes; each layer forward once, the n - 1 checkpointed ones recomputed in the backward
    expected = 2 * n if backend.name == "llava_rad" else 2 * (2 * n - 1)
    assert len(calls) == expected, f"{backend.name}: {len(calls)} down projections run, expected {expected}"


def _saved_before_backward(backend, monkeypatch, lean: bool):
    """(bytes of the tensors a gradient pass keeps for its backward, not the weights; the maps)
    with every layer uncheckpointed, with or without the lean layers."""
    from medvlm.core import attribution

    if not lean:
        monkeypatch.setattr(attribution, "lean_layers", lambda layers, norms: (contextlib.nullcontext(), norms))
    weights = {p.untyped_storage().data_ptr() for p in backend.model.parameters()}
    state = {"bytes": 0, "backward": False, "seen": set()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if not state["backward"] and ptr not in weights and ptr not in state["seen"]:
            state["seen"].add(ptr)
            state["bytes"] += t.untyped_storage().nbytes()
        return t

    def unpack(t):
        state["backward"] = True
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        att = attribution_maps(backend, items()[:1], ("gradxinput",), rows_per_pass=2,
                               uncheckpointed=len(backend._attention), share_prefix=False)  # fmt: skip
    monkeypatch.undo()
    return state["bytes"], att["gradxinput"]


def test_uncheckpointed_layers_keep_less_for_the_same_maps(backend, monkeypatch):
    """The layers run without checkpointing keep their norms' and gated MLP's inputs only
    (attribution._Recomputed): fewer bytes held for the backward, the same maps."""
    lean, lean_map = _saved_before_backward(backend, monkeypatch, lean=True)
    plain, plain_map = _saved_before_backward(backend, monkeypatch, lean=False)
    assert lean < 0.93 * plain, f"{backend.name}: lean layers keep {lean} bytes, plain ones {plain}"
    diff = float(np.abs(lean_map - plain_map).max())
    assert diff <= 1e-6 * max(1.0, float(np.abs(plain_map).max())), f"{backend.name}: lean vs plain maps {diff:.3e}"


def test_rows_and_checkpointing_default_by_backend(backend, monkeypatch):
    """rows_per_pass, uncheckpointed and questions_per_backward left out: the backend's
    DEFAULT_ROWS, DEFAULT_UNCHECKPOINTED and DEFAULT_QUESTIONS_PER_BACKWARD entries decide the
    passes."""
    from medvlm.core import attribution

    for table in (attribution.DEFAULT_ROWS, attribution.DEFAULT_UNCHECKPOINTED,
                  attribution.DEFAULT_QUESTIONS_PER_BACKWARD, attribution.DEFAULT_SHARED_PREFIX):  # fmt: skip
        assert set(table) == {"llava_rad", "medgemma"}
    for table in (attribution.DEFAULT_ROWS, attribution.DEFAULT_UNCHECKPOINTED):
        assert all(set(rows) == set(GRADIENT_KINDS) for rows in table.values())
    passes = []
    real = attribution._gradient_rows

    def recorded(pc, rows, kind, target=None, uncheckpointed=1, together=1):
        passes.append((kind, len(rows.suffixes), uncheckpointed, together))
        return real(pc, rows, kind, target, uncheckpointed, together)

    monkeypatch.setattr(attribution, "_gradient_rows", recorded)
    monkeypatch.setitem(attribution.DEFAULT_ROWS, backend.name, {"gradxinput": 2, "relevancy": 3})
    monkeypatch.setitem(attribution.DEFAULT_UNCHECKPOINTED, backend.name, {"gradxinput": 2, "relevancy": 4})
    monkeypatch.setitem(attribution.DEFAULT_QUESTIONS_PER_BACKWARD, backend.name, 5)
    attribution_maps(backend, items(), GRADIENT_KINDS)
    assert passes == [("gradxinput", 2, 2, 5), ("gradxinput", 1, 2, 5), ("relevancy", 3, 4, 5)]


def test_margins_reproduce_the_scorers_p_yes(backend, batched):
    p = [s.p_yes for study in backend.score_many(items()) for s in study]
    assert np.abs(batched.p_yes - np.array(p)).max() <= 1e-5
    assert np.abs(attribution_margins(backend, items(), rows_per_pass=2) - batched.margin).max() <= 1e-5


def test_relevancy_explains_the_answer_it_is_given(backend, batched):
    """The target answer flips the gradient's sign before the clamp: a different map, equal
    to the reference computed for that target."""
    image, question = pairs()[0]
    other = "no" if batched.target[0] == "yes" else "yes"
    flipped = attribution_maps(backend, [(image, [question], None)], ("relevancy",), answers=[other])
    ref = reference_attribution(backend, image, question, target=other)
    _close(flipped["relevancy"][0, 0], ref["relevancy"].numpy(), f"{backend.name} relevancy for {other!r}")
    assert np.abs(flipped["relevancy"][0, 0] - batched["relevancy"][0, 0]).max() > 1e-6


def _rms_norm64(module, x):
    """LlamaRMSNorm / Gemma3RMSNorm in the input's dtype (transformers computes them in float32)."""
    eps = module.variance_epsilon if hasattr(module, "variance_epsilon") else module.eps
    x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return module.weight * x_hat if type(module).__name__ == "LlamaRMSNorm" else x_hat * (1.0 + module.weight)


@contextlib.contextmanager
def float64(backend):
    """The whole model in float64, its RMS norms too (transformers casts them to float32), so a
    finite difference sees float64 rounding only. The model then computes a slightly different
    function from its float32 self; the fast path and the finite difference both run it."""
    mods = [m for m in (backend.model, getattr(backend, "vision", None), getattr(backend, "projector", None)) if m]
    norms = [m for m in backend.model.modules() if type(m).__name__ in ("LlamaRMSNorm", "Gemma3RMSNorm")]
    saved = getattr(backend, "dtype", None)
    for m in mods:
        m.double()
    if saved is not None:
        backend.dtype = torch.float64
    try:
        with patched_forwards((m, lambda x, m=m: _rms_norm64(m, x)) for m in norms):
            yield
    finally:
        for m in mods:
            m.float()
        if saved is not None:
            backend.dtype = saved


def test_gradxinput_equals_a_float64_finite_difference(backend):
    """d/d eps of m(image rows with token j scaled by 1 + eps) at 0 is (dm/de_j . e_j), the
    gradient x input value of token j: central difference, float64, on the eager full prompt."""
    image, question = pairs()[0]
    eps = 1e-4
    with float64(backend):
        gxi = attribution_maps(backend, [(image, [question], None)], ("gradxinput",))["gradxinput"][0, 0]
        rng = np.random.default_rng(0)
        tokens = [*np.argsort(-np.abs(gxi))[:3].tolist(), *rng.choice(gxi.size, 3, replace=False).tolist()]
        for j in tokens:

            def scale(rows, f, j=j):
                rows = rows.clone()
                rows[j] = rows[j] * f
                return rows

            up = margin_with_image_embeddings(backend, image, question, lambda r, j=j: scale(r, 1 + eps))
            down = margin_with_image_embeddings(backend, image, question, lambda r, j=j: scale(r, 1 - eps))
            fd = (up - down) / (2 * eps)
            assert abs(fd - gxi[j]) <= 1e-7 + 1e-6 * np.abs(gxi).max(), (backend.name, j, fd, gxi[j])
    assert np.abs(gxi).max() > 1e-6


def test_store_entries_and_the_flag():
    assert parse_attribution("gradxinput") == ("attention", "gradxinput")
    assert parse_attribution(["relevancy", "attention"]) == ("attention", "relevancy")
    with pytest.raises(ValueError, match="unknown attribution kind"):
        parse_attribution("attention,saliency")
    from medvlm.core.attribution import Attribution

    att = Attribution(maps={"gradxinput": np.arange(6, dtype=np.float32).reshape(2, 1, 3)},
                      layers={"gradxinput": (0,)}, margin=np.zeros(2), p_yes=np.full(2, 0.5))  # fmt: skip
    entries = att.store_entries([("effusion", 0), ("effusion", 1)])
    layers, m = entries[map_key("effusion", 1, "gradxinput")]
    assert layers == (0,) and m.tolist() == [[3.0, 4.0, 5.0]]
    one = att.select(slice(1, 2))
    assert one["gradxinput"].tolist() == [[[3.0, 4.0, 5.0]]] and len(one.margin) == 1
    assert one.store_entries([("effusion", 1)]).keys() == {map_key("effusion", 1, "gradxinput")}


def test_refusals(backend):
    image, question = pairs()[0]
    with pytest.raises(ValueError, match="non-empty subset"):
        attribution_maps(backend, [(image, [question], None)], ("attention",))
    with pytest.raises(ValueError, match="answers must be"):
        attribution_maps(backend, [(image, [question], None)], ("relevancy",), answers=["maybe"])
    with pytest.raises(ValueError, match="not 'x'"):
        attribution_maps(type("X", (), {"name": "x"})(), [(image, [question], None)])
