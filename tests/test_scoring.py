"""Answer scoring on hand-built cases."""

import math

import pytest
import torch

from medvlm.core.queries import char_span_tokens, suffix_query_positions
from medvlm.core.scoring import AnswerTokens, parse_free_text, resolve_answer_tokens, yes_probability
from medvlm.core.tiny_medgemma import tiny_gemma_tokenizer


def test_p_yes_is_the_yes_mass_over_yes_plus_no():
    tokens = AnswerTokens(yes_ids=(1, 3), no_ids=(2,), yes_strings=("yes", "Yes"), no_strings=("no",))
    logits = torch.tensor([[0.0, math.log(2.0), math.log(3.0), math.log(1.0), math.log(4.0)]], dtype=torch.float64)
    # softmax: exp = [1, 2, 3, 1, 4] / 11 -> yes = (2 + 1) / 11, no = 3 / 11
    p_yes, coverage = yes_probability(logits, tokens)
    assert p_yes.item() == pytest.approx(3 / 6, abs=1e-12)
    assert coverage.item() == pytest.approx(6 / 11, abs=1e-12)
    logits[0, 2] = -1e4  # "no" impossible
    p_yes, _ = yes_probability(logits, tokens)
    assert p_yes.item() == pytest.approx(1.0, abs=1e-9)


def test_answer_tokens_cover_casings_and_leading_space():
    tok = tiny_gemma_tokenizer()
    t = resolve_answer_tokens(tok)
    yes = {tok.decode([i]) for i in t.yes_ids}
    no = {tok.decode([i]) for i in t.no_ids}
    assert {"yes", " yes", "Yes", " Yes", "YES", " YES"} <= yes
    assert {"no", " no", "No", " No", "NO", " NO"} <= no
    assert not set(t.yes_ids) & set(t.no_ids)


def test_tokenizer_without_answers_is_refused():
    class NoAnswers:
        unk_token_id = 0

        def encode(self, text, add_special_tokens=False):
            return [5, 6, 7]

        def decode(self, ids):
            return "x" * len(ids)

        def convert_tokens_to_ids(self, piece):
            return 0

    with pytest.raises(ValueError, match="no single-token yes/no answers"):
        resolve_answer_tokens(NoAnswers())


@pytest.mark.parametrize(
    "text,expected",
    [("Yes, there is an effusion.", "yes"), ("no.", "no"), ("I cannot tell.", None), ("Yes or no? Yes.", None),
     ("The answer: NO", "no"), ("Nothing seen. yes", "yes")],
)  # fmt: skip
def test_parse_free_text(text, expected):
    assert parse_free_text(text) == expected


def test_query_positions():
    offsets = [(0, 2), (2, 5), (5, 5), (5, 9)]
    assert char_span_tokens(offsets, 3, 6) == [1, 3]
    with pytest.raises(ValueError, match="no token overlaps"):
        char_span_tokens(offsets, 9, 12)
    text = "\n\nIs there a pneumothorax? Answer yes or no."
    assert suffix_query_positions("answer", [], text, "", None, 12) == [11]
    with pytest.raises(ValueError, match="does not occur"):
        suffix_query_positions("finding", offsets, text, "Is there a pneumothorax?", "effusion", 4)


def test_finding_mode_finds_a_lay_synonym():
    """--query_mode finding reads the finding's term or a listed synonym (medvlm.data.findings), so a
    lay paraphrase from the question bank still has its finding tokens."""
    from medvlm.core.queries import query_char_span

    q = "Is there fluid around the lung?"
    start, end = query_char_span("finding", q, 0, q, "pleural_effusion")
    assert q[start:end] == "fluid around the lung"
    with pytest.raises(ValueError, match="nor a synonym"):
        query_char_span("finding", "Is the heart enlarged?", 0, "Is the heart enlarged?", "pneumothorax")
