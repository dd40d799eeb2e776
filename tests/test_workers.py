"""Image preprocessing in worker processes (medvlm/workers.py, VLMBackend.start_workers):
bit-identical to the same transform in this process, for both backends' real transforms;
errors reach the caller; the workers end with stop_workers(). (Spawning costs seconds per
pool, so one test covers both backends.)"""

import numpy as np
import pytest
import torch
from PIL import Image

from llava_rad_medical_only import LLaVARadMedical
from medgemma_enhanced import MedGemmaMedical
from medvlm.tiny_llava_rad import write_tiny_llava_rad
from medvlm.workers import PreprocessPool


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    sizes = [(300, 200), (120, 260), (64, 64)]
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for w, h in sizes]


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    llava = LLaVARadMedical().load_model(*write_tiny_llava_rad(tmp_path_factory.mktemp("tiny"), seed=0), device="cpu")
    return [MedGemmaMedical.tiny(), llava]


def test_workers_give_the_same_pixels_and_scores_as_threads(backends):
    images = _images()
    items = [(im, ["Is there a pleural effusion?", "Is the heart enlarged?"], None) for im in images]
    for backend in backends:
        in_process = backend.pixel_values(images)
        before = backend.score_many(items)
        backend.start_workers(2)
        try:
            assert backend.preprocess_workers == 2 and backend.describe()["preprocess_workers"] == 2
            pooled = backend.pixel_values(images)
            assert pooled.dtype == torch.float32 and pooled.shape == in_process.shape
            d = (pooled - in_process).abs().max()
            assert torch.equal(pooled, in_process), f"{backend.name}: pixels differ by {d}"
            after = backend.score_many(items)
            if backend.name == "llava_rad":  # a transform's error reaches the caller; the pool survives it
                with pytest.raises(ValueError, match="not 8-bit") as err:
                    backend.pixel_values([Image.new("I;16", (40, 40))])
                assert "_RemoteTraceback" in type(err.value.__cause__).__name__, "not raised in a worker"
                assert torch.equal(backend.pixel_values(images[:1]), in_process[:1])
        finally:
            backend.stop_workers()
        assert backend.preprocess_workers == 0
        for b, a in zip(before, after, strict=True):
            assert [x.p_yes for x in b] == [x.p_yes for x in a]
            for x, y in zip(b, a, strict=True):
                assert torch.equal(torch.as_tensor(x.attention), torch.as_tensor(y.attention))


def test_bad_worker_counts_and_empty_batches_are_refused(backends):
    with pytest.raises(ValueError, match="at least 1 worker, got 0"):
        PreprocessPool(backends[0].pixel_transform(), workers=0)
    with PreprocessPool(backends[0].pixel_transform(), workers=1) as pool:
        with pytest.raises(ValueError, match="no images"):
            pool.map([])
