"""MedGemma's SigLIP tower without two avoidable costs (siglip_fast_path), installed for one
call and always removed: the patch embeddings made contiguous once, and each MLP's fc1 bias
and tanh-GELU in cuBLASLt's matmul epilogue where the device computes tanh-GELU there
(epilogue_gelu_is_tanh, checked once per device type). Used by medgemma_enhanced's passes and
medvlm.core.attribution; the names are importable from medgemma_enhanced too.
"""

from __future__ import annotations

import contextlib

import torch

from medvlm.core.fused_norms import module_forward, patched_forwards

# SigLIP's MLP activation that cuBLASLt's GELU epilogue computes (tanh approximation)
GELU_TANH_ACTS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


def _fused_gelu_mlp(mlp, hidden: torch.Tensor) -> torch.Tensor:
    """SiglipMLP.forward with fc1's bias and tanh-GELU in the matmul's epilogue (cuBLASLt):
    one kernel instead of a matmul and an elementwise pass over [tokens, 4304].
    hidden [batch, tokens, width] -> [batch, tokens, width]."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    inner = torch._addmm_activation(mlp.fc1.bias, flat, mlp.fc1.weight.t(), use_gelu=True)
    return mlp.fc2(inner).view(*hidden.shape[:-1], -1)


_EPILOGUE_IS_TANH: dict[str, bool] = {}


def epilogue_gelu_is_tanh(device: torch.device) -> bool:
    """Whether torch._addmm_activation(use_gelu=True) computes tanh-GELU on this device type,
    checked once per device type against linear + gelu(approximate="tanh") in float32. (It
    does on CUDA: cuBLASLt's epilogue and its fallback; on the CPU it computes the erf GELU,
    so the CPU never takes the fused path.)"""
    kind = torch.device(device).type
    if kind not in _EPILOGUE_IS_TANH:
        g = torch.Generator(device="cpu").manual_seed(0)
        x, w, b = (torch.randn(*shape, generator=g).to(device) for shape in ((64, 32), (48, 32), (48,)))
        try:
            fused = torch._addmm_activation(b, x, w.t(), use_gelu=True)
            ref = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b), approximate="tanh")
            _EPILOGUE_IS_TANH[kind] = bool((fused - ref).abs().max() <= 1e-5)
        except (RuntimeError, AttributeError):  # an op this torch or device lacks: the unfused forward
            _EPILOGUE_IS_TANH[kind] = False
    return _EPILOGUE_IS_TANH[kind]


@contextlib.contextmanager
def siglip_fast_path(vision_model: torch.nn.Module):
    """The SigLIP tower's forward without two avoidable costs, installed for one call and
    always removed (the model is left as it was):

    - the patch embeddings leave the convolution as a transposed view ([B, C, N] in memory),
      and every residual add keeps that layout, so each layer norm copies its input and each
      residual add runs the strided kernel: the embeddings are made contiguous once (the
      same values, so the same result);
    - where the device's epilogue computes tanh-GELU (epilogue_gelu_is_tanh), each MLP's fc1
      bias and GELU run in the matmul's epilogue (_fused_gelu_mlp): the same function, the
      GELU applied before the bf16 rounding instead of after.
    vision_model  SiglipVisionTransformer (.embeddings, .encoder.layers[i].mlp)
    """
    fuse = epilogue_gelu_is_tanh(vision_model.embeddings.patch_embedding.weight.device)
    patches = []
    for layer in vision_model.encoder.layers if fuse else ():
        mlp = layer.mlp
        plain = type(mlp.fc1) is torch.nn.Linear and mlp.fc1.bias is not None  # not 8-/4-bit layers
        if plain and getattr(mlp.config, "hidden_act", None) in GELU_TANH_ACTS:
            patches.append((mlp, module_forward(mlp, _fused_gelu_mlp)))
    hook = vision_model.embeddings.register_forward_hook(lambda m, args, out: out.contiguous())
    try:
        with patched_forwards(patches):
            yield
    finally:
        hook.remove()
