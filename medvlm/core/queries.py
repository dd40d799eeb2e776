"""Query positions: which suffix tokens' attention rows are read.

    "answer"    the last token of the prompt: the one whose next-token logits give the answer
    "question"  every token that overlaps the question text
    "finding"   every token that overlaps the finding phrase inside the question
                (case-insensitive; refused when the phrase is not in the question)
"""

from __future__ import annotations

from medvlm.core.config import QUERY_MODES, check_query_mode  # noqa: F401 - re-exported


def char_span_tokens(offsets: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of tokens whose character offsets overlap [start, end).

    offsets  per-token (char_start, char_end) as a fast tokenizer's offset mapping gives;
             zero-width tokens (specials) never overlap
    """
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not hits:
        raise ValueError(f"no token overlaps characters [{start}, {end})")
    return hits


def query_char_span(mode: str, text: str, question_start: int, question: str, finding: str | None):
    """Character span in `text` (where the question starts at question_start) for the mode,
    or None for "answer"."""
    check_query_mode(mode)
    if mode == "answer":
        return None
    if mode == "question":
        return question_start, question_start + len(question)
    if not finding:
        raise ValueError("query mode 'finding' needs the finding phrase")
    from medvlm.data.findings import find_phrase  # the term or a listed synonym, whole words

    span = find_phrase(question, finding)
    if span is None:
        raise ValueError(f"finding {finding!r} (nor a synonym of it) does not occur in question {question!r}")
    return question_start + span[0], question_start + span[1]


def suffix_query_positions(
    mode: str,
    suffix_offsets: list[tuple[int, int]],
    suffix_text: str,
    question: str,
    finding: str | None,
    n_suffix_tokens: int,
) -> list[int]:
    """Query positions within a suffix (token indices), for a suffix whose text contains the
    question once. `suffix_offsets` are the offsets of the suffix's tokens in `suffix_text`."""
    if mode == "answer":
        return [n_suffix_tokens - 1]
    q_start = suffix_text.find(question)
    if q_start < 0:
        raise ValueError(f"question {question!r} not found in its prompt suffix")
    span = query_char_span(mode, suffix_text, q_start, question, finding)
    return char_span_tokens(suffix_offsets, *span)
