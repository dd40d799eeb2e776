"""The packed pass's layout and masks (medvlm.engine), by hand on small cases. The packed
pass itself is compared with the eager full-prompt reference in test_medgemma.py and
test_llava_rad.py."""

from types import SimpleNamespace

import pytest
import torch

from medvlm.engine import pack_suffixes, packed_masks

PLAIN = SimpleNamespace(layer_types=None, sliding_window=None)


def test_pack_places_each_study_questions_in_its_own_row():
    layout = pack_suffixes([[7, 8], [9], [5, 6, 4]], rows=[0, 1, 0], n_studies=2, pad_id=0)
    assert layout.suffix_ids.tolist() == [[7, 8, 5, 6, 4], [9, 0, 0, 0, 0]]
    assert layout.owner.tolist() == [[0, 0, 2, 2, 2], [1, -1, -1, -1, -1]]
    assert layout.offset.tolist() == [[0, 1, 0, 1, 2], [0, 0, 0, 0, 0]]
    assert layout.start_of == (0, 0, 2)


def test_masks_keep_each_question_to_the_prefix_and_itself():
    P = 3
    layout = pack_suffixes([[7, 8], [5, 6, 4]], rows=[0, 0], n_studies=1, pad_id=0)
    mask, pos = packed_masks(PLAIN, layout, P, "cpu")
    assert pos.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]  # each question restarts at P
    m = mask[0, 0]
    # prefix: causal within the prefix, nothing after it
    assert m[:P, :P].tolist() == torch.ones(P, P, dtype=torch.bool).tril().tolist()
    assert not m[:P, P:].any()
    # question 0 (columns 3, 4) and question 1 (columns 5, 6, 7): the prefix, then its own earlier tokens
    assert m[P:, :P].all()
    assert m[3, 3:].tolist() == [True, False, False, False, False]
    assert m[4, 3:].tolist() == [True, True, False, False, False]
    assert m[6, 3:].tolist() == [False, False, True, True, False]
    assert m[7, 3:].tolist() == [False, False, True, True, True]


def test_pads_see_only_the_prefix():
    layout = pack_suffixes([[7, 8, 9], [5]], rows=[0, 1], n_studies=2, pad_id=0)
    mask, _ = packed_masks(PLAIN, layout, 2, "cpu")
    assert mask.shape == (2, 1, 5, 5)
    for pad in (3, 4):  # study 1's pads
        assert mask[1, 0, pad].tolist() == [True, True, False, False, False]


def test_bidirectional_span_and_sliding_window():
    """Gemma3's composition: AND(window, OR(causal, image block)), the block inside the prefix."""
    cfg = SimpleNamespace(layer_types=["sliding_attention", "full_attention"], sliding_window=2)
    layout = pack_suffixes([[7, 8]], rows=[0], n_studies=1, pad_id=0)
    masks, _ = packed_masks(cfg, layout, 4, "cpu", bidirectional_span=(1, 3))
    full, sliding = masks["full_attention"][0, 0], masks["sliding_attention"][0, 0]
    assert full[1, 2]  # image token 1 sees image token 2 (later)
    assert not full[0, 1]  # the text before the image does not see it early
    assert not full[3, 4] and full[4, 3]  # causal after the image
    assert full[5].tolist() == [True, True, True, True, True, True]  # position 5 sees all before it
    # window 2: position 5 keeps keys at positions 4 and 5 only; the prefix's row 3 keys 2, 3
    assert sliding[5].tolist() == [False, False, False, False, True, True]
    assert sliding[3].tolist() == [False, False, True, True, False, False]
    assert sliding[1, 2]  # the block survives inside the window


def test_bad_bidirectional_span_is_refused():
    layout = pack_suffixes([[7]], rows=[0], n_studies=1, pad_id=0)
    with pytest.raises(ValueError, match="not inside the 3-token prefix"):
        packed_masks(PLAIN, layout, 3, "cpu", bidirectional_span=(2, 5))


def test_sliding_model_without_layer_types_is_refused():
    cfg = SimpleNamespace(layer_types=None, sliding_window=8, use_sliding_window=True)
    layout = pack_suffixes([[7]], rows=[0], n_studies=1, pad_id=0)
    with pytest.raises(ValueError, match="without layer_types"):
        packed_masks(cfg, layout, 3, "cpu")
