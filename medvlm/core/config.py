"""Configuration (frozen dataclasses passed down explicitly) and the names every stage shares.

Imports nothing heavy (no torch, no pandas): the CLI builds its parser and answers --help
from this module alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

MODEL_NAMES = ("llava_rad", "medgemma")
LAYER_SPECS = ("all", "last_quarter", "last_half")
HEAD_MODES = ("mean", "max", "entropy", "none")
QUERY_MODES = ("answer", "question", "finding")
ATTRIBUTION_KINDS = ("attention", "gradxinput", "relevancy")  # medvlm.core.attribution: the maps a run can make
CONTROLS = ("text_only", "blank")  # medvlm.analysis.controls: the same question without the image / on a grey image
GENERIC_PROMPT = "Write a general description of the image."  # Zhang et al. 2025's generic instruction
BLANK_GRAY = 128  # the blank control's uniform image value


def check_head_mode(mode: str) -> str:
    if mode not in HEAD_MODES:
        raise ValueError(f"unknown attention_head_mode {mode!r}; valid: {', '.join(HEAD_MODES)}")
    return mode


def check_query_mode(mode: str) -> str:
    if mode not in QUERY_MODES:
        raise ValueError(f"unknown query mode {mode!r}; valid: {', '.join(QUERY_MODES)}")
    return mode


def resolve_layers(spec: str | Sequence[int], n_layers: int) -> tuple[int, ...]:
    """Layer indices for a spec: "all", "last_quarter", "last_half", or explicit indices
    (negative counts from the end). Returns sorted unique indices in [0, n_layers)."""
    if isinstance(spec, str):
        if spec == "all":
            return tuple(range(n_layers))
        if spec == "last_half":
            return tuple(range(n_layers - max(1, n_layers // 2), n_layers))
        if spec == "last_quarter":
            return tuple(range(n_layers - max(1, n_layers // 4), n_layers))
        raise ValueError(f"unknown layer spec {spec!r}; valid: {', '.join(LAYER_SPECS)} or a list of indices")
    out = set()
    for i in spec:
        j = int(i)
        if not -n_layers <= j < n_layers:
            raise ValueError(
                f"layer index {j} out of range for a model with {n_layers} layers (valid: 0..{n_layers - 1}, "
                f"or -{n_layers}..-1 from the end)"
            )
        out.add(j % n_layers)
    if not out:
        raise ValueError("empty layer list")
    return tuple(sorted(out))


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
    controls             CONTROLS to answer each question under too (P(yes) only): "text_only"
                         (no image), "blank" (a uniform grey image); one shared prefix per pass
    generic_prompt       None, or the instruction whose attention is the denominator of relative
                         attention (GENERIC_PROMPT): asked once per study in the same template,
                         packed with the study's questions, no answer suffix
    """

    colormap: str = "hot"
    attention_head_mode: str = "mean"
    layers: str | tuple[int, ...] = "all"
    query_mode: str = "answer"
    answer_suffix: str = "Answer yes or no."
    generate: bool = False
    max_new_tokens: int = 24
    controls: tuple[str, ...] = ()
    generic_prompt: str | None = None

    def __post_init__(self):
        unknown = [c for c in self.controls if c not in CONTROLS]
        if unknown:
            raise ValueError(f"unknown control(s) {unknown}; valid: {', '.join(CONTROLS)}")
        if self.generic_prompt is not None and not self.generic_prompt.strip():
            raise ValueError("generic_prompt must be None or a non-empty instruction")
        check_head_mode(self.attention_head_mode)
        check_query_mode(self.query_mode)
        if isinstance(self.layers, str) and self.layers not in LAYER_SPECS:
            raise ValueError(f"unknown layers {self.layers!r}; valid: {', '.join(LAYER_SPECS)} or a tuple")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def full_question(self, question: str) -> str:
        q = question.strip()
        return f"{q} {self.answer_suffix}".strip() if self.answer_suffix else q


@dataclass(frozen=True)
class RunConfig:
    """Everything a run is made of; recorded in the manifest."""

    output_dir: Path
    csv: Path | None = None
    image_root: Path | None = None
    models: tuple[str, ...] = MODEL_NAMES
    n_studies: int | None = None
    sample: int | None = None
    seed: int = 0
    cluster_by: str = "study_id"
    llava_rad_model: str = "microsoft/llava-rad"
    llava_rad_base: str = "lmsys/vicuna-7b-v1.5"
    medgemma_model: str = "google/medgemma-4b-it"
    dtype: str | None = None
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    batch_size: int | None = None  # questions per forward; None: the backend's default
    compile: bool = False  # torch.compile the backends' norms, MLPs and vision layers (long runs)
    overlap_tower: bool = False  # each pass's vision tower on a second CUDA stream (VLMBackend.overlap_tower)
    strict: bool = False
    overwrite: bool = False
    analyze_only: bool = False
    demo: bool = False
    random_models: str | None = None  # None (real weights), "tiny" or "full" (random, real shapes: timing)
    attention: MedicalAttentionConfig = field(default_factory=MedicalAttentionConfig)
    n_boot: int = 10_000
    bootstrap_seed: int = 0
    n_figure_studies: int = 3
    figure_studies: tuple[str, ...] | None = None  # draw these studies (default: the first n_figure_studies)
    figure_findings: tuple[str, ...] | None = None  # draw only these findings (default: all)
    map_kinds: tuple[str, ...] = ("attention", "relative")  # maps the figures and grounding report
    regions: tuple[Path, ...] = ()  # expert region files (medvlm.data.regions) for grounding
    finding_map: Path | None = None  # overrides of the dataset label -> finding table (medvlm.data.findings)
    image_dependence_threshold: float = 0.1  # medvlm.analysis.controls: mean |dP(yes)| that counts as image-dependent
    exclude_sinks: bool = False  # renormalise maps without the detected attention-sink tokens
    # + "gradxinput", "relevancy": gradient maps (medvlm.core.attribution)
    attribution: tuple[str, ...] = ("attention",)
    # deletion / insertion curves per map (medvlm.analysis.faithfulness), while each model is loaded
    faithfulness: bool = False
    faithfulness_steps: int = 16
    faithfulness_variants: str = "0"  # "0", "all" or "0,3"
    substrate: str = "blur"  # deletion's replacement: "blur" or "mean"
    faithfulness_random: int = 3  # seeded random orders averaged as the baseline
    # the first N studies get curves, or the studies of these ids, or these (study id, finding)
    # units (the demo's choice); None: all
    faithfulness_studies: int | tuple[str | tuple[str, str], ...] | None = None
    debug: bool = False  # tracebacks for user mistakes too
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self):
        unknown = [m for m in self.models if m not in MODEL_NAMES]
        if unknown or not self.models:
            raise ValueError(f"unknown model(s) {unknown}; valid: {', '.join(MODEL_NAMES)}")
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("choose one of --load_in_8bit and --load_in_4bit")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.n_studies is not None and self.sample is not None:
            raise ValueError("--n_studies and --sample are exclusive")
        if self.random_models not in (None, "tiny", "full"):
            raise ValueError(f"random_models must be None, 'tiny' or 'full', got {self.random_models!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")

    @property
    def device(self) -> str:
        """This process's device: its own GPU under `accelerate launch`, else cuda or cpu."""
        import torch

        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"

    @property
    def quantization(self) -> str | None:
        return "8bit" if self.load_in_8bit else "4bit" if self.load_in_4bit else None

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the environment `accelerate launch` / torchrun set."""
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))
