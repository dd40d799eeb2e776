"""Image preprocessing in worker processes.

Preparing a pass means running K images through the model's image transform (resize to 896
or 518 px, normalise). Done in a thread beside the one that launches the GPU's kernels, its
Python work competes with that thread for the interpreter lock and slows every pass (about
4-6 ms per MedGemma study on an H200). Worker processes have interpreters of their own: the
parent only sends the images and receives float32 arrays through pipes (no shared memory,
so small /dev/shm limits in containers do not matter), and the result is bit-identical to
the same transform run in the parent.

    pool = PreprocessPool(transform, workers=4)   # transform: image -> [3, S, S] float32, picklable
    pixels = pool.map(images)                     # [K, 3, S, S] float32, in order
    pool.close()
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

# One per worker process, set by _init: the transform the pool was started with.
_TRANSFORM: Callable | None = None


def _init(transform: Callable) -> None:
    global _TRANSFORM
    torch.set_num_threads(1)  # several workers share the host's cores
    _TRANSFORM = transform


def _run(image) -> np.ndarray:
    out = _TRANSFORM(image)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.ndim != 3:
        raise TypeError(f"the transform must return a [3, S, S] float32 tensor, got {type(out).__name__} "
                        f"{getattr(out, 'dtype', '')} {tuple(getattr(out, 'shape', ()))}")  # fmt: skip
    return out.contiguous().numpy()


def default_workers(share: int = 1) -> int:
    """Workers for a GPU run: half of this process's share of the host's cores (share =
    processes on the host, e.g. one per GPU), at most 8 (a pass is 8-16 images)."""
    return max(1, min(8, (os.cpu_count() or 2) // (2 * share)))


class PreprocessPool:
    """A pool of spawned processes that run one image transform.

    transform  picklable callable: PIL image -> [3, S, S] float32 tensor
    workers    number of processes (>= 1); they start now and import torch (seconds), so
               start the pool before the first pass needs it
    """

    def __init__(self, transform: Callable, workers: int):
        if workers < 1:
            raise ValueError(f"expected at least 1 worker, got {workers}")
        self.workers = workers
        ctx = multiprocessing.get_context("spawn")  # no fork: the parent holds CUDA and threads
        self._pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init, initargs=(transform,))

    def map(self, images: Sequence) -> torch.Tensor:
        """[K, 3, S, S] float32 for K images, in order. A transform's error is raised here."""
        if not images:
            raise ValueError("no images to preprocess")
        return torch.stack([torch.from_numpy(a) for a in self._pool.map(_run, images)])

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> PreprocessPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
