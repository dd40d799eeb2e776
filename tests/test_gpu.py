"""GPU checks (skipped without CUDA): the fast paths on the GPU against the eager reference,
float32, on the tiny models. Timing lives in benchmarks/, not here."""

import pytest
import torch
from conftest import max_diff

from archive.reference import medgemma_reference
from archive.reference_llava_rad import llava_rad_reference_score
from llava_rad_medical_only import LLaVARadMedical
from medgemma_enhanced import MedGemmaMedical
from medvlm.config import MedicalAttentionConfig
from medvlm.tiny_llava_rad import write_tiny_llava_rad

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


def test_medgemma_on_cuda_equals_eager(rgb_image):
    backend = MedGemmaMedical.tiny(MedicalAttentionConfig(attention_head_mode="none"), device="cuda")
    backend.keep_logits = True
    for s, q in zip(backend.score(rgb_image, QUESTIONS), QUESTIONS, strict=True):
        ref = medgemma_reference(backend, rgb_image, q)
        assert max_diff(s.extra["logits"], ref["logits"]) <= 1e-4
        start, end = ref["image_span"]
        for li, layer in enumerate(s.layers):
            d = max_diff(s.attention[li], ref["attentions"][layer][:, -1, start:end])
            assert d <= 1e-5, f"layer {layer}: rows differ by {d:.3g} on the GPU"


def test_llava_rad_on_cuda_equals_eager(tmp_path, rgb_image):
    paths = write_tiny_llava_rad(tmp_path)
    backend = LLaVARadMedical(MedicalAttentionConfig(attention_head_mode="none")).load_model(
        *paths, device="cuda", dtype=torch.float32
    )
    backend.keep_logits = True
    for s, q in zip(backend.score(rgb_image, QUESTIONS), QUESTIONS, strict=True):
        ref = llava_rad_reference_score(backend, rgb_image, q)
        assert max_diff(s.extra["logits"], ref["logits"]) <= 1e-4
        start, end = ref["image_span"]
        for li, layer in enumerate(s.layers):
            d = max_diff(s.attention[li], ref["rows"][layer][:, -1, start:end])
            assert d <= 1e-5, f"layer {layer}: rows differ by {d:.3g} on the GPU"


def test_siglip_gelu_epilogue_on_cuda_is_the_tanh_mlp():
    """The fused fc1 + GELU (cuBLASLt epilogue) is SigLIP's MLP (tanh-GELU) on the GPU."""
    from medgemma_enhanced import _fused_gelu_mlp, epilogue_gelu_is_tanh

    backend = MedGemmaMedical.tiny(device="cuda")
    assert epilogue_gelu_is_tanh(torch.device("cuda")), "CUDA's epilogue is not tanh-GELU: the fused path is off"
    mlp = backend._vision_model.encoder.layers[0].mlp
    x = torch.randn(2, 64, mlp.fc1.in_features, device="cuda")
    d = max_diff(_fused_gelu_mlp(mlp, x), mlp(x))
    assert d <= 1e-5, f"fused MLP differs from SiglipMLP by {d:.3g} (fp32)"
