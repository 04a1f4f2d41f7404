"""One small executor layer for embarrassingly parallel work (walk-forward tasks, searches, sweeps).

``local`` runs tasks in worker processes (``concurrent.futures.ProcessPoolExecutor``, spawn start
method so PyTorch and BLAS threads start clean), or in-process when ``workers == 1``. ``ray`` submits
them to a Ray cluster at ``address``: ``auto`` (the cluster this machine belongs to, e.g. after
``ray start --head`` or inside ``ray job submit``), ``ray://head:10001`` (Ray client), or ``local``
(start a private Ray instance on this machine with ``workers`` CPUs). When Ray is already initialised
in this process (a test, a notebook) that instance is used whatever the address. Ray is an optional
dependency (``pip install volmargin[distributed]``); its absence is reported as a clear error.

Workers only compute and return results: the driver is the only process that writes to MLflow (a
SQLite store has one writer). A Ray task runs with one BLAS/torch thread, as does a local pool worker
when there are at least as many workers as cores, so the same tasks give bit-identical results in
both (``tests/test_scale``). The thread count matters: a GARCH fit (``arch``, OpenBLAS) with two BLAS
threads differs from a one-thread fit in the fifth significant digit.

On Ray, ``workers > 1`` caps the tasks in flight (and so the task arguments held in the object
store); ``workers == 1``, the default, lets Ray run as many as the cluster has CPUs.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Executor", "TaskError", "make_executor", "shutdown_ray"]

log = logging.getLogger(__name__)

Backend = Literal["local", "ray"]

#: Ray addresses that start or join a cluster without a host name.
LOCAL_RAY = "local"

_ray_started_here = False
_ray_remote: Any = None


class TaskError(RuntimeError):
    """A task failed in a worker; ``index`` is its position in the task list."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def _init_worker(threads: int) -> None:
    # keep workers from oversubscribing the cores (torch / BLAS default to all cores each)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    try:  # BLAS already loaded (a reused Ray worker) ignores the variables: set it at run time
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    except Exception:  # pragma: no cover - threadpoolctl comes with scikit-learn
        pass
    try:
        import torch

        torch.set_num_threads(threads)
    except Exception:  # pragma: no cover - torch is a dependency, but never fail a worker on it
        pass


def _ray_call(fn: Callable[[Any], Any], task: Any) -> Any:
    """Body of every Ray task: one thread (Ray gives each task one CPU), then ``fn(task)``."""
    _init_worker(1)
    return fn(task)


def _import_ray() -> Any:
    try:
        import ray  # type: ignore[import-not-found]
    except ImportError:
        raise ValueError(
            "executor backend 'ray' needs the 'ray' package, which is not installed; "
            "install it with `pip install volmargin[distributed]` or use executor.backend: local"
        ) from None
    return ray


def _connect_ray(ray: Any, address: str, workers: int) -> None:
    """Initialise Ray in this process unless it already is (then the running instance is used)."""
    global _ray_started_here
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if address == LOCAL_RAY:
        kwargs["num_cpus"] = int(workers) if workers > 1 else None
        log.info("starting a local Ray instance (%s CPUs)", kwargs["num_cpus"] or "all")
    else:
        kwargs = {"address": address, "log_to_driver": True}
        log.info("connecting to the Ray cluster at %s", address)
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise ValueError(f"executor address {address!r}: could not connect to a Ray cluster ({exc})") from None
    _ray_started_here = True


def shutdown_ray() -> None:
    """Shut Ray down if an executor of this process initialised it (a Ray started by the caller is left up)."""
    global _ray_started_here, _ray_remote
    if not _ray_started_here:
        return
    import ray  # type: ignore[import-not-found]

    ray.shutdown()
    _ray_started_here = False
    _ray_remote = None


@dataclass(frozen=True)
class Executor:
    """Runs ``fn(task)`` for every task and yields ``(index, result)`` as they complete.

    Parameters
    ----------
    backend : {"local", "ray"}
        Local processes, or a Ray cluster.
    workers : int
        Worker processes (local; 1 runs in the calling process) or the cap on tasks in flight (ray;
        1 means no cap: as many as the cluster has CPUs).
    address : str, optional
        Ray cluster address (``auto``, ``ray://host:10001``, or ``local`` for a private instance on
        this machine); required for ``ray``.

    Notes
    -----
    ``fn`` must be a module-level function and the tasks picklable. Used as a context manager
    (``with make_executor(...) as ex:``), a local executor keeps one process pool for every ``map``
    inside the block (spawned workers import the project, torch included, which takes seconds) and a
    Ray executor shuts down at the end a Ray instance it started (:func:`shutdown_ray`). Outside a
    ``with`` block each ``map`` starts and stops its own pool, and Ray stops when the process exits.
    """

    backend: Backend = "local"
    workers: int = 1
    address: str | None = None
    _state: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.backend not in ("local", "ray"):
            raise ValueError(f"executor backend must be 'local' or 'ray', got {self.backend!r}")
        if int(self.workers) < 1:
            raise ValueError(f"executor workers must be >= 1, got {self.workers}")
        if self.backend == "ray" and not self.address:
            raise ValueError("executor backend 'ray' needs an address (e.g. ray://head:10001, auto or local)")

    def connect(self) -> Executor:
        """Connect to (or start) Ray now for the ``ray`` backend, e.g. before a Ray Tune search; no-op for local."""
        if self.backend == "ray":
            _connect_ray(_import_ray(), str(self.address), int(self.workers))
        return self

    def __enter__(self) -> Executor:
        self._state["keep_pool"] = True  # local: one process pool for every map inside the block
        return self

    def __exit__(self, *exc: object) -> None:
        self._state.pop("keep_pool", None)
        pool = self._state.pop("pool", None)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if self.backend == "ray":
            shutdown_ray()

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
    def _pool(self, n: int) -> ProcessPoolExecutor:
        pool = self._state.get("pool")
        if pool is None or self._state.get("pool_size", 0) < n:
            if pool is not None:
                pool.shutdown(wait=True)
            threads = max(1, (os.cpu_count() or 1) // n)
            pool = ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                       initargs=(threads,))
            if self._state.get("keep_pool"):
                self._state.update(pool=pool, pool_size=n)
        return pool

    def _local(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        n = int(self.workers) if self._state.get("keep_pool") else min(int(self.workers), len(tasks))
        pool = self._pool(n)
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
            if self._state.get("pool") is not pool:  # not kept for the next map: shut it down now
                pool.shutdown(wait=True)

    def _ray(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        global _ray_remote
        ray = _import_ray()
        _connect_ray(ray, str(self.address), int(self.workers))
        if _ray_remote is None:
            _ray_remote = ray.remote(num_cpus=1, max_retries=0)(_ray_call)
        remote = _ray_remote
        cap = int(self.workers) if self.workers > 1 else len(tasks)
        fn_ref = ray.put(fn)  # shipped once, not once per task
        in_flight: dict[Any, int] = {}
        queue = iter(enumerate(tasks))

        def submit() -> bool:
            nxt = next(queue, None)
            if nxt is None:
                return False
            in_flight[remote.remote(fn_ref, nxt[1])] = nxt[0]
            return True

        while len(in_flight) < cap and submit():
            pass
        try:
            while in_flight:
                done, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in done:
                    i = in_flight.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as exc:  # the task raised, or its worker died
                        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                        raise TaskError(i, f"task {i} failed: {type(cause).__name__}: {cause}") from exc
                    submit()
                    yield i, result
        finally:
            for ref in in_flight:
                ray.cancel(ref)


def make_executor(backend: str = "local", workers: int = 1, address: str | None = None) -> Executor:
    """Build an executor (``ExecutorConfig`` fields); Ray's absence is reported when tasks run."""
    return Executor(backend=backend, workers=int(workers), address=address)  # type: ignore[arg-type]
