"""One small executor layer for embarrassingly parallel work (walk-forward tasks, backtest sweeps).

``local`` runs tasks in worker processes (``concurrent.futures.ProcessPoolExecutor``, spawn start
method so PyTorch and BLAS threads start clean), or in-process when ``workers == 1``. ``ray`` submits
them to a Ray cluster at ``address``; Ray is an optional dependency and its absence is reported as a
clear error. Workers only compute and return results: the driver is the only process that writes to
MLflow (a SQLite store has one writer).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Executor", "TaskError", "make_executor"]

log = logging.getLogger(__name__)

Backend = Literal["local", "ray"]


class TaskError(RuntimeError):
    """A task failed in a worker; ``index`` is its position in the task list."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def _init_worker(threads: int) -> None:
    # keep workers from oversubscribing the cores (torch / BLAS default to all cores each)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    try:
        import torch

        torch.set_num_threads(threads)
    except Exception:  # pragma: no cover - torch is a dependency, but never fail a worker on it
        pass


@dataclass(frozen=True)
class Executor:
    """Runs ``fn(task)`` for every task and yields ``(index, result)`` as they complete.

    Parameters
    ----------
    backend : {"local", "ray"}
        Local processes, or a Ray cluster.
    workers : int
        Worker processes (local) or concurrent tasks (ray); 1 runs in the calling process.
    address : str, optional
        Ray cluster address (``ray://host:10001`` or ``auto``); required for ``ray``.
    """

    backend: Backend = "local"
    workers: int = 1
    address: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in ("local", "ray"):
            raise ValueError(f"executor backend must be 'local' or 'ray', got {self.backend!r}")
        if int(self.workers) < 1:
            raise ValueError(f"executor workers must be >= 1, got {self.workers}")
        if self.backend == "ray" and not self.address:
            raise ValueError("executor backend 'ray' needs an address (e.g. ray://head:10001 or auto)")

    def map_unordered(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, fn(tasks[index]))`` in completion order; a failed task raises ``TaskError``."""
        if self.backend == "ray":
            yield from self._ray(fn, tasks)
        elif self.workers == 1 or len(tasks) <= 1:
            for i, t in enumerate(tasks):
                yield i, fn(t)
        else:
            yield from self._local(fn, tasks)

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> list[Any]:
        """Results in task order."""
        out: list[Any] = [None] * len(tasks)
        for i, r in self.map_unordered(fn, tasks):
            out[i] = r
        return out

    # ------------------------------------------------------------------ backends
    def _local(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        n = min(int(self.workers), len(tasks))
        threads = max(1, (os.cpu_count() or 1) // n)
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
            futures: dict[Future[Any], int] = {pool.submit(fn, t): i for i, t in enumerate(tasks)}
            pending = set(futures)
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        i = futures[fut]
                        exc = fut.exception()
                        if exc is not None:
                            raise TaskError(i, f"task {i} failed: {type(exc).__name__}: {exc}") from exc
                        yield i, fut.result()
            finally:
                for fut in pending:
                    fut.cancel()

    def _ray(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        try:
            import ray  # type: ignore[import-not-found]
        except ModuleNotFoundError:
            raise ValueError(
                "executor backend 'ray' needs the 'ray' package, which is not installed; "
                "install ray or use executor.backend: local"
            ) from None
        if not ray.is_initialized():  # pragma: no cover - needs a cluster
            ray.init(address=self.address)
        remote = ray.remote(fn)  # pragma: no cover
        refs = {remote.remote(t): i for i, t in enumerate(tasks)}  # pragma: no cover
        pending = list(refs)  # pragma: no cover
        while pending:  # pragma: no cover
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                yield refs[ref], ray.get(ref)


def make_executor(backend: str = "local", workers: int = 1, address: str | None = None) -> Executor:
    """Build an executor (``ExecutorConfig`` fields); Ray's absence is reported when tasks run."""
    return Executor(backend=backend, workers=int(workers), address=address)  # type: ignore[arg-type]
