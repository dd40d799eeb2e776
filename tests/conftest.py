import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def tool_cache(tmp_path_factory):
    """The tool's cache (medvlm.core.tiny_llava_rad.cache_root) in a folder of this test session,
    for every test and the processes they start."""
    import os

    folder = tmp_path_factory.mktemp("medvlm-cache")
    old = os.environ.get("MEDVLM_CACHE")
    os.environ["MEDVLM_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("MEDVLM_CACHE", None)
    else:
        os.environ["MEDVLM_CACHE"] = old


@pytest.fixture(scope="session")
def rgb_image() -> Image.Image:
    """A non-square random RGB image (300 x 200)."""
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((200, 300, 3)) * 255).astype("uint8"))


def max_diff(a, b) -> float:
    import torch

    a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).double()
    b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).double()
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a - b).abs().max().item()


@pytest.fixture
def causal_calls(monkeypatch):
    """How many attention calls ran on medvlm.core.engine's pure-causal fast path."""
    from medvlm.core import engine

    calls = []
    real = engine._causal_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_causal_attention", counted)
    return calls
