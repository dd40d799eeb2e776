"""GPU checks (skipped without CUDA): the fast paths on the GPU against the eager reference,
float32, on the tiny models. Timing lives in benchmarks/, not here."""

import pytest
import torch
from conftest import max_diff

from archive.reference import medgemma_reference
from archive.reference_llava_rad import llava_rad_reference_score
from llava_rad_medical_only import LLaVARadMedical
from medgemma_enhanced import MedGemmaMedical
from medvlm.core.config import MedicalAttentionConfig
from medvlm.core.tiny_llava_rad import write_tiny_llava_rad

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
QUESTIONS = ["Is there a pleural effusion?", "Does this chest X-ray show cardiomegaly on a PA view?"]


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _cuda_backend(model: str, tmp_path, config: MedicalAttentionConfig | None = None):
    """The tiny backend on the GPU in float32."""
    config = config or MedicalAttentionConfig()
    if model == "medgemma":
        return MedGemmaMedical.tiny(config, device="cuda")
    return LLaVARadMedical(config).load_model(*write_tiny_llava_rad(tmp_path), device="cuda", dtype=torch.float32)


def _reference(backend, image, question: str) -> tuple:
    """(logits, {layer: [head, T, T] eager attention}, image span) of the full-prompt reference."""
    if backend.name == "medgemma":
        ref = medgemma_reference(backend, image, question)
        return ref["logits"], ref["attentions"], ref["image_span"]
    ref = llava_rad_reference_score(backend, image, question)
    return ref["logits"], ref["rows"], ref["image_span"]


@pytest.mark.parametrize("model", ["medgemma", "llava_rad"])
def test_on_cuda_equals_eager(model, tmp_path, rgb_image):
    backend = _cuda_backend(model, tmp_path, MedicalAttentionConfig(attention_head_mode="none"))
    backend.keep_logits = True
    for s, q in zip(backend.score(rgb_image, QUESTIONS), QUESTIONS, strict=True):
        logits, rows, (start, end) = _reference(backend, rgb_image, q)
        assert max_diff(s.extra["logits"], logits) <= 1e-4
        for li, layer in enumerate(s.layers):
            d = max_diff(s.attention[li], rows[layer][:, -1, start:end])
            assert d <= 1e-5, f"layer {layer}: rows differ by {d:.3g} on the GPU"


@pytest.mark.parametrize("model", ["medgemma", "llava_rad"])
def test_gradient_maps_on_cuda_equal_autograd_on_the_eager_reference(model, tmp_path, rgb_image):
    """Gradient x input and relevancy on the GPU (the fused RMS norms under autograd, SDPA's
    causal kernels) against autograd on the full-prompt eager reference, float32."""
    from archive.reference_attribution import reference_attribution
    from medvlm.core.attribution import GRADIENT_KINDS, attribution_maps

    backend = _cuda_backend(model, tmp_path)
    got = attribution_maps(backend, [(rgb_image, QUESTIONS, None)], GRADIENT_KINDS, rows_per_pass=2)
    # the shared prefix with both questions in one vmapped backward (SDPA's CUDA backward kernels
    # under vmap: their batching rules or vmap's loop fallback)
    vmapped = attribution_maps(backend, [(rgb_image, QUESTIONS, None)], ("gradxinput",), rows_per_pass=2,
                               share_prefix=True, questions_per_backward=2)  # fmt: skip
    for q, question in enumerate(QUESTIONS):
        ref = reference_attribution(backend, rgb_image, question)
        for kind, maps in [*((k, got[k]) for k in GRADIENT_KINDS), ("gradxinput vmapped", vmapped["gradxinput"])]:
            want = ref[kind.split()[0]].numpy()
            d, scale = float(abs(maps[q, 0] - want).max()), float(abs(want).max())
            assert scale > 0 and d <= 1e-5 and d <= 1e-4 * scale, f"{model} {kind} q{q}: {d:.3g} (scale {scale:.3g})"


def test_fused_norm_backward_on_cuda_is_autograds():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from medvlm.core.fused_norms import FUSED

    for cls in (Gemma3RMSNorm, LlamaRMSNorm):
        torch.manual_seed(0)
        m = cls(256, eps=1e-6).cuda().requires_grad_(False)
        m.weight.normal_(0.0, 0.3)
        for dtype in (torch.float32, torch.bfloat16):
            mm = m.to(dtype)
            x = (torch.randn(2, 37, 256, device="cuda") * 4).to(dtype).requires_grad_(True)
            g = torch.randn_like(x)
            want = torch.autograd.grad(mm(x), x, g)[0].float()
            got = torch.autograd.grad(FUSED[cls.__name__](mm, x), x, g)[0].float()
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert max_diff(got, want) <= tol * want.abs().max().item(), (cls.__name__, dtype, max_diff(got, want))


def test_siglip_gelu_epilogue_on_cuda_is_the_tanh_mlp():
    """The fused fc1 + GELU (cuBLASLt epilogue) is SigLIP's MLP (tanh-GELU) on the GPU."""
    from medgemma_enhanced import _fused_gelu_mlp, epilogue_gelu_is_tanh

    backend = MedGemmaMedical.tiny(device="cuda")
    assert epilogue_gelu_is_tanh(torch.device("cuda")), "CUDA's epilogue is not tanh-GELU: the fused path is off"
    mlp = backend._vision_model.encoder.layers[0].mlp
    x = torch.randn(2, 64, mlp.fc1.in_features, device="cuda")
    d = max_diff(_fused_gelu_mlp(mlp, x), mlp(x))
    assert d <= 1e-5, f"fused MLP differs from SiglipMLP by {d:.3g} (fp32)"


@pytest.mark.parametrize("tower", [False, True], ids=["one_stream", "tower_stream"])
@pytest.mark.parametrize("validity", [False, True], ids=["plain", "controls_and_generic"])
@pytest.mark.parametrize("model", ["medgemma", "llava_rad"])
def test_a_pass_never_waits_on_the_gpu_before_its_results_are_read(model, validity, tower, tmp_path, rgb_image,
                                                                   monkeypatch):
    """No host synchronisation from the pass's first launch until the results are read
    (launch_prepared returns; PendingScores.result reads): a
    sync after the vision tower's launches (a blocking copy, a tensor formatted into a
    message) would leave the GPU idle while the decoder is launched one kernel at a time.
    The control passes and the generic prompt are held to the same rule, and so is the
    tower on its own stream (overlap_tower)."""
    import llava_rad_medical_only
    import medgemma_enhanced
    from medvlm.core.backend import GENERIC
    from medvlm.core.config import CONTROLS, GENERIC_PROMPT

    module = medgemma_enhanced if model == "medgemma" else llava_rad_medical_only
    config = MedicalAttentionConfig(controls=CONTROLS, generic_prompt=GENERIC_PROMPT) if validity else None
    backend = _cuda_backend(model, tmp_path, config)
    backend.overlap_tower(tower)
    items = [(rgb_image, QUESTIONS, None)] * 2
    expected = backend.score_many(items)  # warm-up: one-time checks and handles may sync
    prep = backend.prepare(items)
    seen = []
    # the reading-out: keep the question rows (the generic prompts' rows are not questions)
    monkeypatch.setattr(module, "question_scores", lambda out, items, owners, *a, **kw: seen.append((out, owners)))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            torch.zeros(1, device="cuda").item()  # the check itself is armed
        pending = backend.launch_prepared(prep)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    pending.result()
    ((out, owners),) = seen
    got = [p for p, (_, i) in zip(out.p_yes.tolist(), owners, strict=True) if i != GENERIC]
    want = [s.p_yes for study in expected for s in study]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-6


@pytest.mark.parametrize("model", ["medgemma", "llava_rad"])
def test_a_launched_pass_is_read_without_waiting_for_the_work_launched_after_it(model, tmp_path, rgb_image):
    """The runner launches the next pass before reading this one (medvlm.core.pipeline): reading
    must wait for this pass's copies alone (a .cpu() in the reading would wait for the next
    pass too, and leave the GPU idle while the host reads), and read what score_prepared reads."""
    backend = _cuda_backend(model, tmp_path)
    items = [(rgb_image, QUESTIONS, None)] * 2
    expected = backend.score_many(items)
    first = backend.launch_prepared(backend.prepare(items))
    torch.cuda._sleep(2_000_000_000)  # about a second of the GPU spinning, queued after the pass
    later = torch.cuda.Event()
    later.record()
    got = first.result()
    assert not later.query(), "reading the pass waited for the work launched after it"
    torch.cuda.synchronize()
    for a, b in zip([s for study in got for s in study], [s for study in expected for s in study], strict=True):
        assert abs(a.p_yes - b.p_yes) <= 1e-6 and max_diff(a.attention, b.attention) <= 1e-6


@pytest.mark.parametrize("model", ["medgemma", "llava_rad"])
def test_overlap_tower_runs_the_next_towers_beside_queued_work_and_changes_no_result(model, tmp_path, rgb_image,
                                                                                    monkeypatch):
    """With overlap_tower, a pass launched while the GPU is busy (a second of spinning queued
    on the pass's stream, as the previous pass's decoder would be) runs its vision tower at
    once on the second stream, and its decoder after both; every score equals the one-stream
    pass's exactly (the same kernels on the same inputs), the studies kept apart."""
    backend = _cuda_backend(model, tmp_path)
    items = [(rgb_image, QUESTIONS, None), (rgb_image.transpose(0), QUESTIONS[::-1], None)]  # two different studies
    expected = backend.score_many(items)
    backend.overlap_tower()
    assert backend.describe()["tower_stream"] is True
    backend.score_many(items)  # warm-up on the new stream
    done, inner = [], backend.image_embeddings

    def traced(pixels):
        out = inner(pixels)
        done.append(torch.cuda.Event())
        done[-1].record()  # on the stream the tower runs on
        return out

    monkeypatch.setattr(backend, "image_embeddings", traced)
    prep = backend.prepare(items)
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of the GPU spinning on the pass's stream
    busy = torch.cuda.Event()
    busy.record()
    pending = backend.launch_prepared(prep)
    (tower_done,) = done
    tower_done.synchronize()
    assert not busy.query(), "the tower waited for the work queued before the pass"
    got = pending.result()
    assert busy.query(), "the pass's results were read before the work queued ahead of its decoder"
    for a, b in zip([s for study in got for s in study], [s for study in expected for s in study], strict=True):
        assert a.p_yes == b.p_yes and max_diff(a.attention, b.attention) == 0, (a.question, a.p_yes, b.p_yes)
    backend.overlap_tower(False)
    assert backend.tower_stream is None and backend.describe()["tower_stream"] is False


@pytest.mark.parametrize("model", ["medgemma", "llava_rad"])
def test_gradient_passes_never_wait_on_the_gpu_until_the_maps_are_read(model, tmp_path, rgb_image):
    """Gradient x input (one row per question, and a shared prefix, its questions' backwards one
    by one and vmapped together) and the forward-only margins:
    after the image embeddings, nothing makes the host wait on the GPU but the reading of the
    results after the last pass (a sync per pass, or per backward, leaves the GPU idle while
    the host launches the next one)."""
    import traceback
    import warnings

    from medvlm.core import attribution

    backend = _cuda_backend(model, tmp_path)
    items = [(rgb_image, QUESTIONS, None)] * 2

    def run():
        attribution.attribution_maps(backend, items, rows_per_pass=2, share_prefix=False)
        attribution.attribution_maps(backend, items, rows_per_pass=2, share_prefix=True)
        attribution.attribution_maps(backend, items, rows_per_pass=2, share_prefix=True, questions_per_backward=2)
        attribution.attribution_margins(backend, items, rows_per_pass=2)

    run()  # warm-up: one-time checks may sync
    torch.cuda.synchronize()
    syncs = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1] if f.filename.endswith("attribution.py")]
            syncs.append((frames[-1].name, frames[-1].line) if frames else ("?", str(message)))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert syncs, "the sync check is not armed: reading the maps must sync"
    bad = [s for s in syncs if s[0] not in ("_image_embeddings", "image_embeddings") and ".cpu().numpy()" not in s[1]]
    assert not bad, f"host syncs inside the gradient passes: {bad}"


def test_pixels_normalised_on_cuda_equal_the_processor_on_the_cpu(rgb_image):
    """The processor's rescale_and_normalize on the GPU rounds as on the CPU: bit for bit."""
    from medgemma_enhanced import normalize_pixels

    backend = MedGemmaMedical.tiny(device="cuda")
    assert backend.describe()["pixel_normalization"] == "device", "the probe on the GPU found the split inexact"
    ip = backend.processor.image_processor
    raw = backend.preprocess(rgb_image)[None]
    assert raw.dtype == torch.uint8
    on_gpu = normalize_pixels(ip, raw.to("cuda")).cpu()
    assert torch.equal(on_gpu, ip(rgb_image, return_tensors="pt")["pixel_values"]), (
        f"differs by {max_diff(on_gpu, ip(rgb_image, return_tensors='pt')['pixel_values']):.3g}"
    )


def test_cast_free_norms_on_cuda_write_no_float32_and_stay_within_bf16_rounding():
    """On CUDA the no-gradient bf16 norms are one kernel on the bf16 hidden states (nothing of
    their size written in float32), within 1.5 bf16 ulps of the float32 function."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from medvlm.core.fused_norms import FUSED

    class Ops(torch.utils._python_dispatch.TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.outputs = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.outputs.append((str(func), t.dtype, tuple(t.shape)))
            return out

    for cls in (Gemma3RMSNorm, LlamaRMSNorm):
        torch.manual_seed(0)
        m = cls(2560, eps=1e-6).cuda().requires_grad_(False)
        m.weight.normal_(0.0, 0.3)
        ref = cls(2560, eps=1e-6).cuda()
        ref.weight.data = m.weight.data.bfloat16().float()
        mb = m.bfloat16()
        x = (torch.randn(300, 2560, device="cuda") * 4).bfloat16()
        with torch.no_grad(), Ops() as ops:
            got = FUSED[cls.__name__](mb, x)
        full32 = [op for op, dtype, shape in ops.outputs if dtype == torch.float32 and shape == tuple(x.shape)]
        assert not full32, (cls.__name__, full32)
        want = ref(x.float())
        ulp = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(1e-30))) - 7)
        ulps = ((got.float() - want).abs() / ulp).max().item()
        assert ulps <= 1.5, f"{cls.__name__}: {ulps:.3g} bf16 ulps from float32"
