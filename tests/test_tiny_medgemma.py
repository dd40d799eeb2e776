"""The demo's tiny MedGemma (DEMO_SHAPES): 4 px patches, a 32 x 32 grid pooled 2 x 2 into the
real 16 x 16 tokens; the demo and --tiny_random_models build it. (TINY_SHAPES, the real 64 x 64
grid pooled 4 x 4, is checked in test_medgemma.py.)"""

import numpy as np
import pytest
import torch

import run_medical_vlm_analysis as cli
from medgemma_enhanced import MedGemmaMedical, check_medgemma_facts
from medvlm.core.config import MedicalAttentionConfig
from medvlm.core.tiny_medgemma import DEMO_SHAPES, TINY_SHAPES, tiny_medgemma


@pytest.fixture(scope="module")
def demo_parts():
    return tiny_medgemma(shapes=DEMO_SHAPES)


def test_demo_shapes_differ_from_tiny_only_in_the_patch():
    assert DEMO_SHAPES["text"] == TINY_SHAPES["text"]
    assert {**DEMO_SHAPES["vision"], "patch_size": 2} == TINY_SHAPES["vision"]
    assert DEMO_SHAPES["vision"]["patch_size"] == 4 and TINY_SHAPES["vision"]["patch_size"] == 2


def test_demo_model_pools_a_32_grid_2_by_2_row_major(demo_parts):
    """Patch (pr, pc) of the 32 x 32 SigLIP grid feeds token (pr // 2) * 16 + pc // 2, and the
    tower's output is that grid: 1,024 patches."""
    model, processor = demo_parts
    facts = check_medgemma_facts(model, processor)
    assert facts.grid == (16, 16) and facts.patch_size == 4 and facts.image_size == 128
    with torch.no_grad():
        tower = model.model.vision_tower(pixel_values=torch.zeros(1, 3, 128, 128)).last_hidden_state
    assert tower.shape[1] == 32 * 32
    proj = model.model.multi_modal_projector
    hidden = model.config.vision_config.hidden_size
    base = proj(torch.zeros(1, 32 * 32, hidden))[0]
    for pr, pc in [(0, 0), (1, 0), (0, 1), (9, 30), (31, 2), (31, 31)]:
        x = torch.zeros(1, 32 * 32, hidden)
        x[0, pr * 32 + pc] = 100.0
        with torch.no_grad():
            out = proj(x)[0]
        changed = ((out - base).abs().sum(-1) > 1e-6).nonzero().flatten().tolist()
        assert changed == [(pr // 2) * 16 + pc // 2], (pr, pc, changed)


def test_demo_model_scores_with_a_map_per_token(demo_parts, rgb_image):
    model, processor = demo_parts
    backend = MedGemmaMedical(model, processor, MedicalAttentionConfig(), model_id="tiny-random-medgemma")
    s = backend.score(rgb_image, ["Is there an effusion?"])[0]
    assert 0.0 < s.p_yes < 1.0 and s.attention.shape[-1] == 256 and np.isfinite(s.attention).all()


@pytest.mark.parametrize("flag", ["--demo", "--tiny_random_models"])
def test_the_cli_builds_the_demo_shapes(tmp_path, flag):
    argv = ["--output_dir", str(tmp_path / "out"), flag] + (["--csv", str(tmp_path / "q.csv")] if flag != "--demo"
                                                            else [])  # fmt: skip
    backend = cli.get_backend_loader("medgemma")(cli.parse_args(argv))
    vision = backend.model.config.vision_config
    assert (vision.image_size, vision.patch_size) == (128, 4) and backend.grid == (16, 16)
