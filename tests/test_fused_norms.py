"""Fused RMSNorm forwards (medvlm/core/fused_norms.py) against transformers' own modules, and
their installation: only inside the block, always removed, never on the compiled path."""

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from medvlm.core.fused_norms import FUSED, fused_rms_norms, norm_modules


def _norm(cls, d=64, seed=0):
    torch.manual_seed(seed)
    m = cls(d, eps=1e-6)
    with torch.no_grad():
        m.weight.normal_(0.0, 0.3)  # Gemma3 starts at zeros, Llama at ones: make both non-trivial
    return m


@pytest.mark.parametrize("cls", [Gemma3RMSNorm, LlamaRMSNorm])
def test_fused_forward_is_the_modules_forward(cls):
    m = _norm(cls)
    x = torch.randn(3, 5, 64) * 4
    fused = FUSED[cls.__name__]
    d = (fused(m, x) - m(x)).abs().max().item()
    assert d <= 1e-5, f"{cls.__name__} float32: fused differs by {d:.3g}"
    xb, mb = x.bfloat16(), _norm(cls).bfloat16()
    ref32 = _norm(cls)(xb.float())  # the float32 function on the same inputs
    err_fused = (fused(mb, xb).float() - ref32).abs().max().item()
    err_eager = (mb(xb).float() - ref32).abs().max().item()
    assert err_fused <= 2 * err_eager + 1e-6, f"bf16: fused {err_fused:.3g} vs eager {err_eager:.3g} from fp32"


def test_gemma_weight_cache_follows_the_weight():
    m = _norm(Gemma3RMSNorm)
    x = torch.randn(2, 64)
    FUSED["Gemma3RMSNorm"](m, x)
    with torch.no_grad():
        m.weight.add_(1.0)  # the cached 1 + w must not survive this
    d = (FUSED["Gemma3RMSNorm"](m, x) - m(x)).abs().max().item()
    assert d <= 1e-5, f"stale 1 + w: differs by {d:.3g}"


def test_installed_only_inside_and_always_removed():
    model = torch.nn.Sequential(_norm(Gemma3RMSNorm), torch.nn.Linear(64, 64), _norm(LlamaRMSNorm))
    norms = norm_modules(model)
    assert [type(m) for m in norms] == [Gemma3RMSNorm, LlamaRMSNorm]
    with fused_rms_norms(norms):
        assert all("forward" in vars(m) for m in norms)
    assert all("forward" not in vars(m) for m in norms)
    with pytest.raises(RuntimeError, match="boom"), fused_rms_norms(norms):
        raise RuntimeError("boom")
    assert all("forward" not in vars(m) for m in norms)


def test_the_backends_fuse_only_when_not_compiled(rgb_image):
    """A MedGemma pass runs its decoder's norms fused when eager and leaves them to compile()
    otherwise (the flag alone is flipped here; tests/test_medgemma.py compiles for real)."""
    from medgemma_enhanced import MedGemmaMedical

    backend = MedGemmaMedical.tiny()
    n_layers = backend.model.config.get_text_config().num_hidden_layers
    assert len(backend._norms) == 6 * n_layers + 2  # 6 per layer, the final norm, the projector's
    seen = []
    probe = backend._decoder.layers[0].input_layernorm.register_forward_pre_hook(
        lambda m, args: seen.append("forward" in vars(m))
    )
    try:
        backend.score(rgb_image, ["Is there a pleural effusion?"])
        backend.compiled = True
        backend.score(rgb_image, ["Is there a pleural effusion?"])
    finally:
        probe.remove()
    assert seen == [True, False]
    assert all("forward" not in vars(m) for m in backend._norms)


@pytest.mark.parametrize("cls", [Gemma3RMSNorm, LlamaRMSNorm])
def test_half_input_without_gradient_goes_to_the_kernel_as_it_is(cls, monkeypatch):
    """Scoring passes (bf16, no gradient) hand torch's fused kernel the bf16 hidden states
    themselves (no float32 copy; Gemma3's 1 + w in bf16). With a gradient recorded the float32
    form is kept (the modules' form) and the gradient is the module's. (On the CPU the kernel
    is torch's composite form; tests/test_gpu.py checks the CUDA kernel writes no float32.)"""
    import medvlm.core.fused_norms as fused_norms

    calls = []
    kernel = fused_norms._kernel
    monkeypatch.setattr(fused_norms, "_kernel", lambda x, w, eps: calls.append((x, w)) or kernel(x, w, eps))
    m = _norm(cls).bfloat16().requires_grad_(False)
    x = (torch.randn(3, 5, 64) * 4).bfloat16()
    with torch.no_grad():
        y = FUSED[cls.__name__](m, x)
    assert len(calls) == 1 and calls[0][0] is x, "the kernel did not get x itself"
    w = calls[0][1]
    assert (w is None) if cls is LlamaRMSNorm else (w.dtype == torch.bfloat16), w
    assert y.dtype == torch.bfloat16
    xg = x.clone().requires_grad_(True)
    y = FUSED[cls.__name__](m, xg)
    assert len(calls) == 1, "the kernel's half-precision form ran with a gradient recorded"
    g = torch.randn_like(y)
    want = torch.autograd.grad(m(xg), xg, g)[0].float()
    got = torch.autograd.grad(y, xg, g)[0].float()
    assert (got - want).abs().max().item() <= 2e-2 * want.abs().max().item()


@pytest.mark.parametrize("cls", [Gemma3RMSNorm, LlamaRMSNorm])
def test_half_input_stays_within_bf16_rounding_of_the_float32_function(cls):
    """Per element, the cast-free bf16 output is within 1.5 bf16 ulps of the float32 function on
    the same inputs (Gemma3's 1 + w rounded to bf16, then one rounding; the module's own bf16
    output: 0.5 ulp for Gemma3, Llama's two roundings up to 1.5)."""
    mb = _norm(cls, d=256).bfloat16()
    xb = (torch.randn(64, 256) * 4).bfloat16()
    ref = _norm(cls, d=256)
    ref.weight.data = mb.weight.data.float()
    want = ref(xb.float())
    ulp = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(1e-30))) - 7)  # bf16: 8 significant bits
    with torch.no_grad():
        got = FUSED[cls.__name__](mb, xb).float()
        eager = mb(xb).float()
    ulps = lambda y: ((y - want).abs() / ulp).max().item()  # noqa: E731
    assert ulps(eager) <= 1.5, f"the module itself: {ulps(eager):.3g} ulps"
    assert ulps(got) <= 1.5, f"{cls.__name__}: cast-free {ulps(got):.3g} ulps from float32 (module {ulps(eager):.3g})"
