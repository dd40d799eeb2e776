"""Answer scoring: yes/no token ids, P(yes) from next-token logits, parsing free text."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

YES_WORDS = ("yes", "Yes", "YES")
NO_WORDS = ("no", "No", "NO")


@dataclass(frozen=True)
class AnswerTokens:
    """Token ids whose next-token probability counts as "yes" / "no"."""

    yes_ids: tuple[int, ...]
    no_ids: tuple[int, ...]
    yes_strings: tuple[str, ...]
    no_strings: tuple[str, ...]


def resolve_answer_tokens(tokenizer) -> AnswerTokens:
    """Every single-token form of yes/no: all casings, bare and with a leading space
    (sentencepiece "▁yes", byte-level "Ġyes"). A form that the tokenizer splits into
    several tokens is not a first-token answer and is skipped. Refuses when none is found.
    """

    def single_ids(words: Sequence[str]) -> tuple[tuple[int, ...], tuple[str, ...]]:
        ids: dict[int, str] = {}
        for w in words:
            for form in (w, " " + w):
                enc = tokenizer.encode(form, add_special_tokens=False)
                # sentencepiece may emit a bare "▁" before the word; keep the word's token
                toks = [t for t in enc if tokenizer.decode([t]).strip() != ""]
                if len(toks) == 1 and tokenizer.decode(toks).strip() == w:
                    ids.setdefault(toks[0], form)
            for piece in (w, "▁" + w, "Ġ" + w):
                tid = tokenizer.convert_tokens_to_ids(piece)
                unk = getattr(tokenizer, "unk_token_id", None)
                if isinstance(tid, int) and tid >= 0 and tid != unk:
                    ids.setdefault(tid, piece)
        return tuple(sorted(ids)), tuple(ids[i] for i in sorted(ids))

    yes_ids, yes_str = single_ids(YES_WORDS)
    no_ids, no_str = single_ids(NO_WORDS)
    if not yes_ids or not no_ids:
        raise ValueError(
            f"the tokenizer has no single-token yes/no answers (yes: {len(yes_ids)}, no: {len(no_ids)})"
        )
    overlap = set(yes_ids) & set(no_ids)
    if overlap:
        raise ValueError(f"token ids {sorted(overlap)} count as both yes and no")
    return AnswerTokens(yes_ids, no_ids, yes_str, no_str)


def yes_probability(logits: torch.Tensor, tokens: AnswerTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, vocab] -> (p_yes [n], coverage [n]), both float64.

    p_yes    = sum softmax[yes ids] / (sum softmax[yes ids] + sum softmax[no ids])
    coverage = sum softmax[yes ids] + sum softmax[no ids]
    """
    logp = torch.log_softmax(logits.double(), dim=-1)
    n_yes = len(tokens.yes_ids)
    # the ids sent without blocking (indexing by a list makes a blocking copy, a host sync
    # inside the pass; from pageable memory the driver stages them before returning)
    ids = torch.tensor([*tokens.yes_ids, *tokens.no_ids]).to(logits.device, non_blocking=True)
    picked = logp.index_select(1, ids)
    ly = torch.logsumexp(picked[:, :n_yes], dim=-1)
    ln = torch.logsumexp(picked[:, n_yes:], dim=-1)
    p_yes = torch.sigmoid(ly - ln)
    coverage = torch.exp(ly) + torch.exp(ln)
    return p_yes, coverage


def answer_from_p(p_yes: float) -> str:
    return "yes" if p_yes >= 0.5 else "no"


_ANSWER_RE = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def parse_free_text(text: str) -> str | None:
    """The first standalone yes/no in a generated answer, or None when there is none or
    the text contradicts itself in its first sentence ("yes ... no")."""
    first = re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0]
    found = {m.group(1).lower() for m in _ANSWER_RE.finditer(first)}
    if len(found) == 1:
        return found.pop()
    if not found:
        m = _ANSWER_RE.search(text)
        return m.group(1).lower() if m else None
    return None
