"""Layer selection and head aggregation."""

import pytest
import torch

from medvlm.core.aggregate import aggregate_heads, resolve_layers


def test_resolve_layers():
    assert resolve_layers("all", 8) == tuple(range(8))
    assert resolve_layers("last_half", 8) == (4, 5, 6, 7)
    assert resolve_layers("last_quarter", 34) == tuple(range(26, 34))
    assert resolve_layers([-1, 0, 0], 6) == (0, 5)
    with pytest.raises(ValueError, match="out of range for a model with 6 layers"):
        resolve_layers([6], 6)
    with pytest.raises(ValueError, match="unknown layer spec"):
        resolve_layers("middle", 6)


def test_head_modes_on_a_hand_case():
    focused = torch.tensor([1.0, 0.0, 0.0, 0.0])
    flat = torch.tensor([0.25, 0.25, 0.25, 0.25])
    rows = torch.stack([focused, flat])[None, :, None, :]  # [batch 1, head 2, query 1, key 4]
    assert torch.allclose(aggregate_heads(rows, "mean")[0, 0], torch.tensor([0.625, 0.125, 0.125, 0.125]))
    assert torch.allclose(aggregate_heads(rows, "max")[0, 0], torch.tensor([1.0, 0.25, 0.25, 0.25]))
    # entropy weights: focused head H = 0 -> weight 1; flat head H = log 4 -> weight 0
    assert torch.allclose(aggregate_heads(rows, "entropy")[0, 0], focused)
    assert aggregate_heads(rows, "none").shape == (1, 2, 1, 4)
    with pytest.raises(ValueError, match="valid: mean, max, entropy, none"):
        aggregate_heads(rows, "sum")


def test_entropy_mode_falls_back_to_mean_only_when_every_head_is_flat():
    flat = torch.full((1, 3, 1, 4), 0.25)
    assert torch.allclose(aggregate_heads(flat, "entropy"), aggregate_heads(flat, "mean"))
