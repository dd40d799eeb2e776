"""Configuration shared by both backends (frozen, passed down explicitly)."""

from __future__ import annotations

from dataclasses import dataclass

from medvlm.aggregate import LAYER_SPECS, check_head_mode
from medvlm.queries import check_query_mode


@dataclass(frozen=True)
class MedicalAttentionConfig:
    """How a backend scores questions and captures attention.

    colormap             matplotlib colormap for heatmaps
    attention_head_mode  "mean", "max", "entropy" (focused heads weigh more) or "none" (per head)
    layers               "all", "last_quarter", "last_half", or a tuple of layer indices
    query_mode           "answer" (the answering token), "question" (all question tokens),
                         "finding" (the tokens of the finding phrase)
    answer_suffix        text appended after the question ("" for none); recorded in outputs
    generate             also generate a free-text answer (batched, KV cached)
    max_new_tokens       generation length
    """

    colormap: str = "hot"
    attention_head_mode: str = "mean"
    layers: str | tuple[int, ...] = "all"
    query_mode: str = "answer"
    answer_suffix: str = "Answer yes or no."
    generate: bool = False
    max_new_tokens: int = 24

    def __post_init__(self):
        check_head_mode(self.attention_head_mode)
        check_query_mode(self.query_mode)
        if isinstance(self.layers, str) and self.layers not in LAYER_SPECS:
            raise ValueError(f"unknown layers {self.layers!r}; valid: {', '.join(LAYER_SPECS)} or a tuple")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def full_question(self, question: str) -> str:
        q = question.strip()
        return f"{q} {self.answer_suffix}".strip() if self.answer_suffix else q
