"""Layer selection and head aggregation: small pure functions over captured attention rows.

Shapes follow the capture: rows are [batch, head, query, key] (fp32 softmax probabilities).
"""

from __future__ import annotations

import torch

from medvlm.core.config import HEAD_MODES, LAYER_SPECS, check_head_mode, resolve_layers  # noqa: E402,F401 - re-exported


def aggregate_heads(rows: torch.Tensor, mode: str) -> torch.Tensor:
    """Aggregate heads of rows [batch, head, query, key].

    mean     -> [batch, query, key]: average over heads
    max      -> [batch, query, key]: elementwise max over heads
    entropy  -> [batch, query, key]: heads weighted by 1 - H(p_h) / log(n_keys), where p_h is
                head h's row renormalised over the keys given; focused heads count more.
                Heads whose row has no mass get weight 0; if every head has weight 0 the
                result is the plain mean.
    none     -> [batch, head, query, key] unchanged
    """
    check_head_mode(mode)
    if rows.ndim != 4:
        raise ValueError(f"expected rows [batch, head, query, key], got shape {tuple(rows.shape)}")
    if mode == "none":
        return rows
    if mode == "mean":
        return rows.mean(dim=1)
    if mode == "max":
        return rows.amax(dim=1)
    n_keys = rows.shape[-1]
    mass = rows.sum(dim=-1, keepdim=True)
    p = rows / mass.clamp_min(torch.finfo(rows.dtype).tiny)
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # [b, h, q]
    weight = (1.0 - ent / max(torch.log(torch.tensor(float(n_keys))).item(), 1e-12)).clamp_min(0.0)
    weight = torch.where(mass.squeeze(-1) > 0, weight, torch.zeros_like(weight))
    total = weight.sum(dim=1, keepdim=True)  # [b, 1, q]
    uniform = torch.full_like(weight, 1.0 / rows.shape[1])
    weight = torch.where(total > 0, weight / total.clamp_min(1e-30), uniform)
    return (rows * weight.unsqueeze(-1)).sum(dim=1)
