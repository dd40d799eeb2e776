"""The backend contract: what the runner asks of each model.

Both backends (llava_rad_medical_only.LLaVARadMedical, medgemma_enhanced.MedGemmaMedical)
subclass :class:`VLMBackend`. The runner never knows which model it drives.

    backend.score(image, questions, findings)  -> list[QuestionScore], one per question
    backend.score_many([(image, questions, findings), ...]) -> one such list per study
        (= backend.score_prepared(backend.prepare(items)): host work, then device work;
        score_prepared = launch_prepared(...).result(): the device work launched, then read)
    backend.grid                               -> (rows, cols) of the image-token grid
    backend.geometry(width, height)            -> Geometry: where the grid sits on the image

What score / score_many / prepare accept (both backends alike: prepare() first runs
VLMBackend.checked_items, the one place these rules live):
    image      a path (PNG/JPEG/DICOM, through medvlm.data.images.load_image, the CLI's loader),
               a PIL image of any mode or a numpy array ([H, W] grayscale of any integer or
               float dtype, [H, W, 3] uint8); all made 8-bit RGB by medvlm.data.images.as_rgb8, so
               16-bit and float images are scaled by the min-max of their range, never clipped
    questions  a list of strings, or one string (= a list of that one question)
    findings   None, or one finding per question (one string for one question)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from medvlm.core.geometry import Geometry
from medvlm.core.scoring import answer_from_p, parse_free_text
from medvlm.data.images import as_rgb8


@dataclass(frozen=True)
class QuestionScore:
    """What one question about one image yields.

    question     the question text as asked (without the answer-format suffix)
    prompt       the full prompt text the model saw (image placeholder left symbolic)
    p_yes        P(yes) / (P(yes) + P(no)) at the answering position, summed over every
                 yes/no token id (casings, leading-space forms)
    coverage     P(yes) + P(no): how much of the next-token mass the two answers hold
    answer       "yes" if p_yes >= 0.5 else "no"
    attention    float32 [n_layers, n_image_tokens] (head-aggregated) or
                 [n_layers, n_heads, n_image_tokens] (head_mode "none"): the attention the
                 chosen query tokens pay to each image token, averaged over those query
                 tokens, raw softmax mass (not renormalised over the image)
    layers       the layer indices the first axis of `attention` stands for
    image_mass   float32 [n_layers]: total attention mass on the image span per layer
                 (before head aggregation: mean over heads)
    n_query_tokens  how many query tokens were averaged
    generated_text  free-text answer when generation was requested, else None
    generated_answer "yes" / "no" / None (unparseable or not requested)
    controls     {control: P(yes)} under each of config.controls (medvlm.analysis.controls)
    generic_attention  float32 [n_layers, n_image_tokens] (or with heads): the study's
                 generic-prompt attention (config.generic_prompt), the same array for every
                 question of the study; None when not asked
    image_token_norms  float32 [n_layers, n_image_tokens]: the L2 norm of each image token's
                 hidden state entering each decoder layer in `layers` (the layer's input, =
                 output_hidden_states' hidden_states[layer]), the study's, the same array for
                 every question of the study (medvlm.analysis.sinks: high-norm outliers); None when not
                 captured
    """

    question: str
    prompt: str
    p_yes: float
    coverage: float
    answer: str
    attention: np.ndarray
    layers: tuple[int, ...]
    image_mass: np.ndarray
    n_query_tokens: int
    generated_text: str | None = None
    generated_answer: str | None = None
    extra: dict = field(default_factory=dict)
    controls: dict = field(default_factory=dict)
    generic_attention: np.ndarray | None = None
    image_token_norms: np.ndarray | None = None


#: the owner index (study k, GENERIC) of a study's generic prompt in a pass (config.generic_prompt)
GENERIC = -1


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """The longest prefix all token sequences share, leaving each at least one token of its own
    (a control pass's shared prefix: the packed forward of prefix + suffix_i equals the full
    prompt i whatever the split)."""
    if not seqs:
        raise ValueError("no sequences")
    limit = min(len(x) for x in seqs) - 1
    n = 0
    while n < limit and all(x[n] == seqs[0][n] for x in seqs):
        n += 1
    return n


def blank_image(size: tuple[int, int]) -> Image.Image:
    """The blank control's image: uniform mid-grey (config.BLANK_GRAY) RGB of the given size."""
    from medvlm.core.config import BLANK_GRAY

    return Image.new("RGB", tuple(int(v) for v in size), (BLANK_GRAY,) * 3)


class ControlMemo:
    """P(yes) under each control, computed once per unique prompt of a loaded model.

    A control's prompt names no study: text_only has no image, and blank's grey image
    preprocesses to the same pixels at every size (tests/test_controls_backends.py). So a
    control's P(yes) is a function of its prompt's token ids alone, and a run that asks the
    same paraphrases of many studies (a question bank) scores each once per control, in the
    first pass that meets it; later passes read it here. Keys: (control, context, ids), where
    context names what else the value depends on (the model's dtype). Bounded: at `limit`
    entries it starts over. Cleared when the model is unloaded.
    """

    def __init__(self, limit: int = 1 << 16):
        self.limit = int(limit)
        self._p: dict[tuple, float] = {}
        self.computed = 0  # prompts scored (unique misses), for the manifest and the benchmark
        self.reused = 0  # prompts answered from the memo or from a duplicate in the same call

    def __len__(self) -> int:
        return len(self._p)

    def clear(self) -> None:
        """Forget every value, and zero the counts."""
        self._p.clear()
        self.computed = self.reused = 0

    def resolve(self, control: str, context: tuple, ids: Sequence[Sequence[int]], compute) -> np.ndarray:
        """[n] float64: P(yes) of n control prompts (their token ids).

        compute(indices) -> P(yes) of ids[i] for each i in indices ([m] array-like, same order):
        called once, with the first index of every prompt not yet known (none: not called)."""
        keys = [(control, context, tuple(int(t) for t in x)) for x in ids]
        known = {k: self._p[k] for k in keys if k in self._p}
        first: dict[tuple, int] = {}
        for i, k in enumerate(keys):
            if k not in known:
                first.setdefault(k, i)
        if first:
            values = np.asarray(compute(list(first.values())), dtype=np.float64).reshape(-1)
            if values.shape != (len(first),):
                raise RuntimeError(f"control {control}: expected {len(first)} P(yes) values, got {values.shape[0]}")
            known.update(zip(first, values.tolist(), strict=True))
            if len(self._p) + len(first) > self.limit:
                self._p.clear()
            self._p.update((k, known[k]) for k in first)
        self.computed += len(first)
        self.reused += len(keys) - len(first)
        return np.array([known[k] for k in keys], dtype=np.float64)


def question_scores(
    out,
    items: Sequence[tuple],
    owners: Sequence[tuple[int, int]],
    prompts: Sequence[str],
    texts: Sequence[str | None],
    extras: Sequence[dict],
    keep_logits: bool = False,
    controls: dict | None = None,
) -> list[list[QuestionScore]]:
    """One list of QuestionScore per study from a pass's engine output.

    out      medvlm.core.engine.PackedScores over the pass's Q packed prompts
    items    the pass's (image, questions, findings) per study
    owners   per packed prompt r: (study k, index i of the question within items[k]), or
             (k, GENERIC) for study k's generic prompt (its map goes to generic_attention)
    prompts, texts, extras  per packed prompt: prompt text, generated text (or None), extra fields
    keep_logits  also put the next-token logits [vocab] in extra["logits"]
    controls {control: P(yes) [n_questions]} in the order of the non-generic owners
    """
    attention = out.attention.float().cpu().numpy()
    image_mass = out.image_mass.float().cpu().numpy()
    p_yes, coverage, n_query = out.p_yes.tolist(), out.coverage.tolist(), out.n_query.tolist()
    image_norms = getattr(out, "image_norms", None)  # [K, L, n_image]: one array per study, shared by its questions
    norms = list(image_norms.float().cpu().numpy()) if image_norms is not None else None
    generic = {k: attention[r] for r, (k, i) in enumerate(owners) if i == GENERIC}
    control_p = {name: [float(x) for x in np.asarray(p, dtype=np.float64).reshape(-1)]
                 for name, p in (controls or {}).items()}
    results: list[list[QuestionScore]] = [[] for _ in items]
    j = -1  # index among the questions (generic prompts left out)
    for r, (k, i) in enumerate(owners):
        if i == GENERIC:
            continue
        j += 1
        extra = dict(extras[r])
        if keep_logits:
            extra["logits"] = out.logits[r].float().cpu()
        results[k].append(
            QuestionScore(
                question=items[k][1][i],
                prompt=prompts[r],
                p_yes=p_yes[r],
                coverage=coverage[r],
                answer=answer_from_p(p_yes[r]),
                attention=attention[r],
                layers=out.layers,
                image_mass=image_mass[r],
                n_query_tokens=int(n_query[r]),
                generated_text=texts[r],
                generated_answer=parse_free_text(texts[r]) if texts[r] is not None else None,
                extra=extra,
                controls={name: p[j] for name, p in control_p.items()},
                generic_attention=generic.get(k),
                image_token_norms=norms[k] if norms is not None else None,
            )
        )
    return results


class PendingScores:
    """A pass whose device work is launched and whose results are on their way to the host
    (medvlm.core.engine.to_host). result() waits for that pass's copies alone, not for work
    launched after it, then builds its QuestionScores (once; later calls return the same).

    build  () -> list[list[QuestionScore]], run on the host copies once they have landed
    ready  the CUDA event recorded after the copies, or None (nothing to wait for)
    """

    def __init__(self, build: Callable[[], list[list[QuestionScore]]], ready=None):
        self._build, self._ready, self._scores = build, ready, None

    @classmethod
    def done(cls, scores: list[list[QuestionScore]]) -> PendingScores:
        """Scores already on the host (a backend without a launched half)."""
        return cls(lambda: scores)

    def result(self) -> list[list[QuestionScore]]:
        if self._build is not None:
            if self._ready is not None:
                self._ready.synchronize()
            self._scores, self._build, self._ready = self._build(), None, None
        return self._scores


class VLMBackend(ABC):
    """A model that answers yes/no questions about one image and reports where it looked."""

    #: registry name ("llava_rad", "medgemma")
    name: str = ""
    #: questions per forward pass when the run does not say (studies are packed whole)
    default_batch_size: int = 36
    #: whether compile() has run (recorded in the manifest)
    compiled: bool = False
    #: the second CUDA stream each pass's vision tower is queued on (overlap_tower); None: the
    #: pass's own stream
    tower_stream: torch.cuda.Stream | None = None

    @property
    @abstractmethod
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the image-token grid; rows * cols image tokens, row-major."""

    @abstractmethod
    def geometry(self, width: int, height: int) -> Geometry:
        """How an original image of width x height maps onto the model's token grid."""

    @abstractmethod
    def score(
        self,
        image: Image.Image,
        questions: Sequence[str],
        findings: Sequence[str] | None = None,
    ) -> list[QuestionScore]:
        """Score questions about one image in one batched pass.

        image      the original image, any size: a path, a PIL image of any mode or a numpy
                   array (see the module docstring; made 8-bit RGB by medvlm.data.images.as_rgb8)
        questions  Q question strings (one string: Q = 1)
        findings   Q finding phrases (used by query mode "finding"), or None
        returns    Q QuestionScore, in the order of `questions`
        """

    def score_many(self, items: Sequence[tuple]) -> list[list[QuestionScore]]:
        """Several studies at once: items are (image, questions, findings or None); returns one
        list of QuestionScore per item. Backends batch the studies' prefixes in one pass; this
        default scores them one by one. Equal to score_prepared(prepare(items))."""
        return [self.score(image, questions, findings) for image, questions, findings in items]

    def prepare(self, items: Sequence[tuple]):
        """The host-side work of score_many (prompts, pixel values), so a runner can do it in
        a thread for the next pass while the device runs this one. A backend's prepare() runs
        checked_items(items) first. Default: nothing to do."""
        return items

    @staticmethod
    def model_image(image) -> Image.Image:
        """Any accepted image (path, PIL image of any mode, numpy array) -> 8-bit RGB PIL image,
        by the CLI loader's rules (medvlm.data.images.as_rgb8); an RGB PIL image comes back as is."""
        return as_rgb8(image).image

    @classmethod
    def checked_items(cls, items: Sequence[tuple]) -> list[tuple[Image.Image, list[str], list | None]]:
        """score_many's items, checked and made uniform (what each backend's prepare() runs first).

        items    K tuples (image, questions, findings or None); see the module docstring
        returns  K tuples (8-bit RGB PIL image, list of Q question strings, list of Q findings
                 or None). ValueError, saying what to pass, for anything else.
        """
        if isinstance(items, tuple | str) or not isinstance(items, Sequence):
            raise ValueError("score_many takes a list of (image, questions, findings) tuples, one per study")
        if not items:
            raise ValueError("no studies to score: pass at least one (image, questions, findings) tuple")
        out = []
        for k, item in enumerate(items):
            if not isinstance(item, tuple | list) or len(item) != 3:
                what = type(item).__name__ + (f" of length {len(item)}" if isinstance(item, tuple | list) else "")
                raise ValueError(f"study {k}: expected a tuple (image, questions, findings or None), got {what}")
            image, questions, findings = item
            questions = [questions] if isinstance(questions, str) else list(questions)
            if not questions:
                raise ValueError(f"study {k}: no questions: pass a non-empty list of question strings")
            bad = [type(q).__name__ for q in questions if not isinstance(q, str)]
            if bad:
                raise ValueError(f"study {k}: questions must be strings, found {', '.join(sorted(set(bad)))}")
            if findings is not None:
                findings = [findings] if isinstance(findings, str) else list(findings)
                if len(findings) != len(questions):
                    raise ValueError(f"study {k}: {len(questions)} questions but {len(findings)} findings: "
                                     "pass one finding per question, or None")
            out.append((cls.model_image(image), questions, findings))
        return out

    def score_prepared(self, prepared) -> list[list[QuestionScore]]:
        """The device-side work of score_many, on what prepare() returned."""
        return VLMBackend.score_many(self, prepared)

    def launch_prepared(self, prepared) -> PendingScores:
        """score_prepared in two halves: launch the pass's device work and queue its results'
        copies to the host, without waiting; PendingScores.result() then waits for this pass
        alone and builds its scores. A runner launches the next pass before reading this one,
        so the GPU does not idle while the host reads results (medvlm.core.pipeline.run_model).
        Equal to score_prepared(prepared) once read. Default: score_prepared, already done."""
        return PendingScores.done(self.score_prepared(prepared))

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The model's image preprocessing: PIL image -> [3, S, S] (what prepare() runs on
        each image): float32 pixel values, or uint8 whose last step (rescale, normalise) the
        backend's device half runs."""
        raise NotImplementedError(f"backend {self.name!r} has no image preprocessing")

    def text_only_ids(self, question: str) -> list[int]:
        """The text-only control's full prompt ids: the same conversation without the image."""
        raise NotImplementedError(f"backend {self.name!r} has no text-only prompt")

    def prepare_controls(self, items: Sequence[tuple]) -> dict:
        """The host-side part of the controls (config.controls) for a pass of checked items:
        "text_only_ids": each question's full text-only prompt ids, in question order;
        "blank": True when the blank control is on (its pixels: blank_pixels())."""
        out = {}
        if "text_only" in self.config.controls:
            out["text_only_ids"] = [self.text_only_ids(q) for _, questions, _ in items for q in questions]
        if "blank" in self.config.controls:
            out["blank"] = True
        return out

    def blank_pixels(self) -> torch.Tensor:
        """[1, 3, S, S]: the grey image's model-input pixels, preprocessed once per backend (a
        uniform image preprocesses to the same pixels at every size, tested), and only when a
        control pass needs them (the control memo answers most passes without)."""
        px = self.__dict__.get("_blank_pixels")
        if px is None:
            px = self.__dict__["_blank_pixels"] = self.pixel_values([blank_image((64, 64))])
        return px

    @property
    def control_memo(self) -> ControlMemo:
        """The controls' P(yes) by prompt (ControlMemo), made on first use."""
        memo = self.__dict__.get("_control_memo")
        if memo is None:
            memo = self.__dict__["_control_memo"] = ControlMemo()
        return memo

    @staticmethod
    def split_common_prefix(ids: Sequence[Sequence[int]]) -> tuple[list[int], list[list[int]]]:
        """(the prefix every sequence shares, the rest of each): a control pass packs the rests
        after one copy of the prefix."""
        c = common_prefix_len(ids)
        return list(ids[0][:c]), [list(x[c:]) for x in ids]

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[K, 3, S, S]: preprocess() on K images, in threads (the resize releases the
        interpreter)."""
        if len(images) == 1:
            return self.preprocess(images[0])[None]
        with ThreadPoolExecutor(max_workers=min(len(images), 8)) as pool:
            return torch.stack(list(pool.map(self.preprocess, images)))

    def compile_regions(self) -> list[tuple[torch.nn.Module, bool | None]]:
        """(module, dynamic) pairs that compile() hands to torch.compile: modules made of
        elementwise work around matmuls (norms, MLPs, vision-encoder layers), never the
        attention or the row capture. None by default."""
        return []

    def compile(self) -> int:
        """torch.compile the compile_regions() in place (their elementwise kernels fused).
        The attention, the masks and the row capture stay eager. Compilation runs during the
        first passes (10-20 s on an H200), so it pays on long runs only. Returns the
        number of modules compiled."""
        regions = self.compile_regions()
        if not regions:
            raise ValueError(f"backend {self.name!r} has nothing to compile")
        for module, dynamic in regions:
            module.compile(dynamic=dynamic)
        self.compiled = True
        return len(regions)

    def vision_device(self) -> torch.device | None:
        """The device each pass's vision tower runs on; None where the backend runs no tower
        of its own in its passes (overlap_tower then refuses)."""
        return None

    def overlap_tower(self, on: bool = True) -> None:
        """Queue each scoring pass's vision tower (and projector) on a second CUDA stream
        (medvlm.core.engine.on_stream), so that a runner launching pass n + 1 before reading
        pass n (medvlm.core.pipeline) has the GPU run the next pass's tower beside this pass's
        decoder; the decoder of a pass still waits for its own tower. The same kernels on the
        same inputs: the same results. Off by default; recorded in the manifest. Refused
        (ValueError) where the tower is not on a CUDA device."""
        if not on:
            self.tower_stream = None
            return
        device = self.vision_device()
        if device is None or device.type != "cuda":
            raise ValueError(f"--overlap_tower needs the vision tower on a CUDA device; model {self.name!r} has it on "
                             f"{device or 'no device of its own'}")  # fmt: skip
        self.tower_stream = torch.cuda.Stream(device)

    def describe(self) -> dict:
        """Facts for the manifest: model id, revision, dtype, attention implementation,
        prompt template, query mode, layers and head mode."""
        return {"name": self.name}

    @abstractmethod
    def unload(self) -> None:
        """Free the model's memory (GPU included)."""
