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
