"""MedGemma backend on the tiny random Gemma3: fast path vs full-prompt eager reference."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from conftest import max_diff
from PIL import Image
from torch._dynamo.utils import counters

from archive.reference import medgemma_reference
from medgemma_enhanced import FactError, MedGemmaMedical, check_medgemma_facts
from medvlm.core.config import MedicalAttentionConfig
from medvlm.core.tiny_medgemma import tiny_medgemma

QUESTIONS = [
    "Is there a pleural effusion?",
    "Does the chest show cardiomegaly on this PA view?",
    "Is there a pneumothorax?",
    "Is the heart enlarged?",
]
FINDINGS = ["effusion", "cardiomegaly", "pneumothorax", "heart"]


@pytest.fixture(scope="module")
def tiny_parts():
    return tiny_medgemma(sliding_window=24)  # the prompt (~300 tokens) outgrows the window


def _assert_answer_rows_equal(s, ref, logits_tol):
    """A QuestionScore (answer query, head mode "none") against the eager reference."""
    d = max_diff(s.extra["logits"], ref["logits"])
    assert d <= logits_tol, f"{s.question!r}: logits differ from the reference by {d:.3g}"
    start, end = ref["image_span"]
    for li, layer in enumerate(s.layers):
        d = max_diff(s.attention[li], ref["attentions"][layer][:, -1, start:end])
        assert d <= 1e-5, f"{s.question!r} layer {layer}: rows differ by {d:.3g}"


def _backend(parts, **cfg):
    model, processor = parts
    return MedGemmaMedical(model, processor, MedicalAttentionConfig(**cfg))


@pytest.mark.parametrize("query_mode", ["answer", "question", "finding"])
def test_batched_prefix_scoring_equals_full_prompt_eager(tiny_parts, rgb_image, query_mode):
    backend = _backend(tiny_parts, attention_head_mode="none", query_mode=query_mode)
    backend.keep_logits = True
    scores = backend.score(rgb_image, QUESTIONS, FINDINGS)
    assert len({len(backend._tokenize(q)[0]) for q in QUESTIONS}) > 1, "questions should differ in length"
    for i, (q, s) in enumerate(zip(QUESTIONS, scores, strict=True)):
        ref = medgemma_reference(backend, rgb_image, q)
        d = max_diff(s.extra["logits"], ref["logits"])
        assert d <= 1e-5, f"question {i}: logits differ by {d:.3g}"
        assert abs(s.p_yes - ref["p_yes"]) <= 1e-6
        assert abs(s.coverage - ref["coverage"]) <= 1e-6
        start, end = ref["image_span"]
        T = len(ref["input_ids"])
        prefix_len = s.extra["prefix_len"]
        positions = [prefix_len + p for p in s.extra["query_positions"]]
        if query_mode == "answer":
            assert positions == [T - 1]
        assert len(positions) == s.n_query_tokens
        for li, layer in enumerate(s.layers):
            expected = ref["attentions"][layer][:, positions, start:end].mean(1)  # [head, n_image]
            d = max_diff(s.attention[li], expected)
            assert d <= 1e-5, f"question {i} layer {layer}: rows differ by {d:.3g}"
            mass = ref["attentions"][layer][:, positions, start:end].sum(-1).mean().item()
            assert abs(s.image_mass[li] - mass) <= 1e-5


def test_finding_tokens_are_the_phrase(tiny_parts, rgb_image):
    backend = _backend(tiny_parts, query_mode="finding")
    s = backend.score(rgb_image, ["Is there a pneumothorax?"], ["pneumothorax"])[0]
    ids, _, _ = backend._tokenize("Is there a pneumothorax?")
    toks = [ids[s.extra["prefix_len"] + p] for p in s.extra["query_positions"]]
    assert backend.processor.tokenizer.decode(toks).strip() == "pneumothorax"
    with pytest.raises(ValueError, match="does not occur"):
        backend.score(rgb_image, ["Is there a pneumothorax?"], ["effusion"])


def test_shapes_and_head_modes(tiny_parts, rgb_image):
    for mode in ("mean", "max", "entropy"):
        s = _backend(tiny_parts, attention_head_mode=mode, layers="last_half").score(rgb_image, QUESTIONS[:2])[0]
        assert s.attention.shape == (3, 256) and s.layers == (3, 4, 5)
        assert np.all(s.attention >= 0) and np.all(np.isfinite(s.attention))
        assert 0.0 <= s.p_yes <= 1.0 and 0.0 < s.coverage <= 1.0
        assert s.answer == ("yes" if s.p_yes >= 0.5 else "no")
    assert _backend(tiny_parts).grid == (16, 16)


def test_attention_peak_lands_on_the_planted_grid_cell(rgb_image):
    """Plant, in every layer, a key at image token j aligned with the answering query: the
    captured map (the packed fast path) must peak at j = row * 16 + col.
    (A window wider than the prompt, so every layer can see the image.)"""
    backend = _backend(tiny_medgemma(sliding_window=512), attention_head_mode="mean")
    row, col = 5, 11
    j = row * 16 + col
    ids, _, _ = backend._tokenize(QUESTIONS[0])
    start = ids.index(backend.facts.image_token_id)
    target = torch.ones(16)
    hooks = []

    def plant_key(module, args, out):  # out [batch, kv_head, seq, head_dim]; the image sits at [start, end)
        if out.shape[2] > start + j:
            out = out.clone()
            out[:, :, start + j, :] = 8.0 * target
        return out

    def plant_query(module, args, out):  # the last suffix token's query points the same way
        if out.shape[2] < start:
            out = out.clone()
            out[:, :, :, :] = target
        return out

    for layer in backend._decoder.layers:
        hooks.append(layer.self_attn.k_norm.register_forward_hook(plant_key))
        hooks.append(layer.self_attn.q_norm.register_forward_hook(plant_query))
    try:
        s = backend.score(rgb_image, QUESTIONS[:1])[0]
    finally:
        for h in hooks:
            h.remove()
    for li in range(len(s.layers)):
        peak = int(np.argmax(s.attention[li]))
        assert (peak // 16, peak % 16) == (row, col), f"layer {li}: peak at {divmod(peak, 16)}"
    geom = backend.geometry(300, 200)
    x0, y0, x1, y1 = geom.cell_box(row, col)
    assert geom.point_to_cell((x0 + x1) / 2, (y0 + y1) / 2) == (row, col)


def test_projector_pools_patches_row_major(tiny_parts):
    """Patch (pr, pc) of the 64 x 64 SigLIP grid feeds token (pr // 4) * 16 + pc // 4."""
    model, _ = tiny_parts
    proj = model.model.multi_modal_projector
    hidden = model.config.vision_config.hidden_size
    for pr, pc in [(0, 0), (9, 50), (63, 2)]:
        x = torch.zeros(1, 64 * 64, hidden)
        x[0, pr * 64 + pc] = 100.0
        with torch.no_grad():
            out = proj(x)[0]
        base = proj(torch.zeros(1, 64 * 64, hidden))[0]
        changed = ((out - base).abs().sum(-1) > 1e-6).nonzero().flatten().tolist()
        assert changed == [(pr // 4) * 16 + pc // 4]


def test_broken_facts_are_refused(tiny_parts):
    model, processor = tiny_parts
    cfg = model.config
    saved = cfg.mm_tokens_per_image
    try:
        cfg.mm_tokens_per_image = 250
        with pytest.raises(FactError, match="expected a square number, found 250"):
            check_medgemma_facts(model, processor)
        cfg.mm_tokens_per_image = 225
        with pytest.raises(FactError, match="pools evenly into the token grid: expected 64 divisible by 15"):
            check_medgemma_facts(model, processor)
    finally:
        cfg.mm_tokens_per_image = saved
    processor.image_seq_length = 64
    try:
        with pytest.raises(FactError, match="processor.image_seq_length: expected 256, found 64"):
            check_medgemma_facts(model, processor)
    finally:
        processor.image_seq_length = 256
    saved = cfg.image_token_id
    try:
        cfg.image_token_id = saved + 1
        with pytest.raises(FactError, match="image soft token id"):
            check_medgemma_facts(model, processor)
    finally:
        cfg.image_token_id = saved
    processor.image_processor.do_pan_and_scan = True
    try:
        with pytest.raises(FactError, match="pan-and-scan"):
            check_medgemma_facts(model, processor)
    finally:
        processor.image_processor.do_pan_and_scan = False
    # the real model's sizes are enforced for the real model id
    with pytest.raises(FactError, match="medgemma-4b vision image_size: expected 896, found 128"):
        check_medgemma_facts(model, processor, model_id="google/medgemma-4b-it")


def test_generation_is_batched_and_parsed(tiny_parts, rgb_image):
    backend = _backend(tiny_parts, generate=True, max_new_tokens=4)
    scores = backend.score(rgb_image, QUESTIONS[:2])
    for s in scores:
        assert isinstance(s.generated_text, str)
        assert s.generated_answer in (None, "yes", "no")


def test_describe_says_random_weights(tiny_parts):
    d = _backend(tiny_parts).describe()
    assert d["random_weights"] is True and d["grid"] == [16, 16]
    assert "{question} Answer yes or no." in d["prompt_template"]
    assert dataclasses.is_dataclass(_backend(tiny_parts).facts)


def test_several_studies_in_one_pass_equal_the_reference(tiny_parts, rgb_image):
    """score_many: two images' prefixes in one batch, every question in one suffix batch,
    each row reading its own study's prefix; equal to the full-prompt eager reference."""
    backend = _backend(tiny_parts, attention_head_mode="none")
    backend.keep_logits = True
    other = rgb_image.transpose(0).resize((180, 260))  # a different image, other aspect
    items = [(rgb_image, QUESTIONS[:3], None), (other, QUESTIONS[1:], None)]
    many = backend.score_many(items)
    assert [len(m) for m in many] == [3, 3]
    for (image, questions, _), scores in zip(items, many, strict=True):
        single = backend.score(image, questions)
        for q, s, one in zip(questions, scores, single, strict=True):
            _assert_answer_rows_equal(s, medgemma_reference(backend, image, q), logits_tol=1e-5)
            assert abs(s.p_yes - one.p_yes) <= 1e-6
    # the two studies really differ: a mix-up of prefix rows would show
    assert max_diff(many[0][1].attention, many[1][0].attention) > 1e-4


def test_compiled_regions_equal_the_eager_reference(rgb_image):
    """compile(): the fast path with its norms, MLPs and vision layers compiled (inductor on
    the CPU here) equals the eager full-prompt reference run on an uncompiled copy (same seed)."""
    eager = _backend(tiny_medgemma(sliding_window=24), attention_head_mode="none")
    fast = _backend(tiny_medgemma(sliding_window=24), attention_head_mode="none")
    n = fast.compile()
    assert n == 2 + 6 * 7 and fast.compiled and fast.describe()["compiled"]  # 2 vision layers, 7 parts x 6 layers
    fast.keep_logits = True
    items = [(rgb_image, QUESTIONS[:2], None), (rgb_image.rotate(90, expand=True), QUESTIONS[2:], None)]
    graphs = counters["stats"]["unique_graphs"]
    many = fast.score_many(items)
    assert counters["stats"]["unique_graphs"] > graphs, "nothing was compiled"
    for (image, questions, _), scores in zip(items, many, strict=True):
        for q, s in zip(questions, scores, strict=True):
            _assert_answer_rows_equal(s, medgemma_reference(eager, image, q), logits_tol=1e-4)


def test_siglip_fast_path_is_the_same_tower_and_always_uninstalls(tiny_parts):
    """siglip_fast_path: the embeddings leave contiguous (they are a transposed view without
    it), the tower's output is unchanged, and nothing stays installed, even after an error.
    The CPU's addmm epilogue is the erf GELU, so the CPU never takes the fused MLP."""
    from medgemma_enhanced import epilogue_gelu_is_tanh, siglip_fast_path

    model, _ = tiny_parts
    vm = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)
    pixels = torch.randn(2, 3, vm.config.image_size, vm.config.image_size)
    seen = []
    probe = vm.encoder.layers[0].register_forward_pre_hook(  # what the first layer receives
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).is_contiguous()),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            plain = vm(pixel_values=pixels).last_hidden_state
            with siglip_fast_path(vm):
                fast = vm(pixel_values=pixels).last_hidden_state
    finally:
        probe.remove()
    assert seen == [False, True], f"embeddings contiguous without / with the fast path: {seen}"
    assert torch.equal(plain, fast)
    assert not epilogue_gelu_is_tanh(torch.device("cpu"))
    n_hooks = len(vm.embeddings._forward_hooks)
    with pytest.raises(RuntimeError, match="boom"), siglip_fast_path(vm):
        raise RuntimeError("boom")
    assert len(vm.embeddings._forward_hooks) == n_hooks
    assert all("forward" not in vars(layer.mlp) for layer in vm.encoder.layers)


def test_siglip_fast_path_patches_the_mlps_only_inside(tiny_parts, monkeypatch):
    import medgemma_enhanced as mg

    model, _ = tiny_parts
    vm = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)
    monkeypatch.setitem(mg._EPILOGUE_IS_TANH, "cpu", True)  # as on CUDA
    with mg.siglip_fast_path(vm):
        assert all("forward" in vars(layer.mlp) for layer in vm.encoder.layers)
    assert all("forward" not in vars(layer.mlp) for layer in vm.encoder.layers)


def test_pixels_normalised_on_the_device_are_the_processors_own(tiny_parts, rgb_image):
    """The processor's work split at its last step (8-bit resize on the host, its own
    rescale_and_normalize in the pass) gives its full output bit for bit, on a radiograph-like
    grayscale image and a color one; a processor whose split is not exact keeps it all on the host."""
    from medgemma_enhanced import normalize_pixels, normalizes_on_device

    backend = _backend(tiny_parts)
    ip = backend.processor.image_processor
    assert normalizes_on_device(ip) and backend.describe()["pixel_normalization"] == "device"
    gray = Image.fromarray(np.random.default_rng(3).integers(0, 4096, (90, 70)).astype(np.uint16) // 16)
    for image in (rgb_image, gray.convert("L").convert("RGB")):
        raw = backend.preprocess(image)
        assert raw.dtype == torch.uint8
        assert torch.equal(normalize_pixels(ip, raw[None]), ip(image, return_tensors="pt")["pixel_values"])

    shifted = Shifted(ip)  # it has rescale_and_normalize: refused for the shift alone
    assert callable(shifted.rescale_and_normalize) and not normalizes_on_device(shifted)
    assert normalizes_on_device(Wrapped(ip)), "the wrapper itself must not change the verdict"
    assert not normalizes_on_device(NoSplit(ip))
    processor = copy.copy(tiny_parts[1])
    processor.image_processor = NoSplit(ip)
    host = MedGemmaMedical(tiny_parts[0], processor, MedicalAttentionConfig())
    assert host.describe()["pixel_normalization"] == "host" and host.preprocess(rgb_image).dtype == torch.float32
    host.keep_logits = True
    (s,) = host.score(rgb_image, QUESTIONS[:1])
    assert max_diff(s.extra["logits"], medgemma_reference(host, rgb_image, QUESTIONS[0])["logits"]) <= 1e-5


class Wrapped:
    """An image processor seen through a wrapper that forwards everything."""

    def __init__(self, ip):
        self._ip = ip

    def __call__(self, *args, **kwargs):
        return self._ip(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._ip, name)


class NoSplit(Wrapped):
    """A processor without rescale_and_normalize (the whole preprocessing stays on the host)."""

    def __getattr__(self, name):
        if name == "rescale_and_normalize":
            raise AttributeError(name)
        return super().__getattr__(name)


class Shifted(Wrapped):
    """As a processor version whose full output is not what its split gives."""

    def __call__(self, image, **kw):
        out = self._ip(image, **kw)
        if kw.get("do_normalize", True):
            out["pixel_values"] = out["pixel_values"] + 1e-6
        return out


def test_prompt_check_against_the_processor(tiny_parts, rgb_image, monkeypatch):
    """Once per question: our ids are checked against the processor's own chat tokenisation,
    on a small stand-in image that is never resized (the study's image is not preprocessed for
    it); ids that differ are refused."""
    from medgemma_enhanced import FactError

    model, processor = tiny_parts
    backend = MedGemmaMedical(model, processor, MedicalAttentionConfig())
    big = rgb_image.resize((640, 480))
    seen = []
    real = type(processor.image_processor).__call__

    def sizes(images):
        if isinstance(images, (list, tuple)):
            return [s for im in images for s in sizes(im)]
        return [images.size if hasattr(images, "size") and not callable(images.size) else tuple(images.shape[-2:])]

    def recorded(self, images, *args, **kwargs):
        out = real(self, images, *args, **kwargs)
        seen.append(sizes(images) + [tuple(out["pixel_values"].shape[-2:])])  # the inputs, then the output
        return out

    monkeypatch.setattr(type(processor.image_processor), "__call__", recorded)
    question = "Is the left hemidiaphragm raised?"
    entry = backend._prompt(question)
    seen.clear()
    backend._check_against_processor(entry, question)
    assert entry["checked"] and seen and all(size == [(8, 8), (8, 8)] for size in seen), "resized or not the stand-in"
    backend.prepare([(big, [question], None)])  # already checked: the processor sees only the pass's pixels
    assert all((8, 8) not in sizes for sizes in seen[1:]), seen
    wrong = {**backend._prompt("Is there a pneumothorax?"), "checked": False}
    wrong["ids"] = [*wrong["ids"][:-1], wrong["ids"][-1] + 1]
    with pytest.raises(FactError, match="differ from the processor's own tokenisation"):
        backend._check_against_processor(wrong, "Is there a pneumothorax?")
