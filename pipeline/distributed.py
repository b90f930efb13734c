"""Data-parallel training under torchrun: the process group, rank helpers and the few collectives.

A single process is the default. ``torchrun`` (``python -m torch.distributed.run``) starts one
process per GPU and gives each WORLD_SIZE, RANK and LOCAL_RANK; when all three are set,
``init`` joins the process group (nccl on CUDA, each rank on ``cuda:LOCAL_RANK``; gloo on CPU)
and every other call here becomes a collective. Without them, ``SINGLE`` answers every call
locally, so the trainer has one code path.

What a distributed run means for training (``pipeline/train.py``):

- ``train.batch_size`` and ``buffer.size`` are per rank: one optimizer step sees
  ``world_size * batch_size`` real images, and the replay memory is ``world_size`` buffers.
- Each rank reads a disjoint share of every epoch's permutation (``shard``), keeps its own
  replay buffer and Langevin chains, and draws its noise from a generator seeded with
  ``train.seed + rank``. Gradients are averaged by DistributedDataParallel.
- Statistics are averaged over ranks before they are checked or logged (``reduce_stats``), so
  every rank takes the same decision on divergence and on a stop signal.
- Rank 0 alone writes checkpoints and outputs and talks to MLflow. A checkpoint holds every
  rank's buffer and RNG states (``gather``); on resume rank 0 reads it and hands each rank its
  own (``share_state``), so other nodes need not see rank 0's disk.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from pipeline.config import RuntimeConfig
from pipeline.runtime import resolve_device

T = TypeVar("T")

ENV_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
# Debugging and tests: each rank appends its own (not averaged) statistics to this JSONL file.
DEBUG_STATS_ENV = "EBM_DEBUG_RANK_STATS"
# Statistics whose maximum over ranks matters, not their mean.
MAX_KEYS = ("max_abs_score",)
# Checkpoint entries that each rank has its own of.
RANK_KEYS = ("buffer", "rng")



class DistributedError(RuntimeError):
    """A distributed set-up problem (inconsistent ranks, unsupported device), worded as one line."""

class Dist:
    """This process's place in the run: world size, rank, local rank, and the collectives.

    ``Dist()`` is a single process (every method is a local no-op); ``init`` returns a
    distributed one under torchrun.
    """

    def __init__(
        self,
        world_size: int = 1,
        rank: int = 0,
        local_rank: int = 0,
        device: torch.device | None = None,
        enabled: bool = False,
    ) -> None:
        self.world_size, self.rank, self.local_rank = world_size, rank, local_rank
        self.device = device or torch.device("cpu")  # where collectives run: cuda:LOCAL_RANK with nccl
        self.enabled = enabled

    def __repr__(self) -> str:
        where = f"world_size={self.world_size}, rank={self.rank}, local_rank={self.local_rank}"
        return f"Dist({where}, enabled={self.enabled})"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------ model and data

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel around ``model`` (its gradients are averaged over ranks), or ``model``."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's share of ``indices``, as DistributedSampler(drop_last=True) takes it.

        Rank r gets ``indices[r::world_size]`` cut to ``len(indices) // world_size`` entries:
        the shares are disjoint and equal; a single process gets ``indices`` unchanged.
        """
        per_rank = len(indices) // self.world_size
        return indices[self.rank : per_rank * self.world_size : self.world_size]

    # ------------------------------------------------------------ collectives

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's ``obj``, in rank order, on rank 0; None on the other ranks."""
        if not self.enabled:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(obj, out, dst=0)
        if out is not None:
            out[0] = obj  # rank 0's own object, not a copy: torch.save then stores shared tensors once
        return out

    def scatter(self, objs: list[T] | None) -> T:
        """Element ``rank`` of rank 0's list ``objs`` (one element per rank)."""
        if not self.enabled:
            assert objs is not None
            return objs[0]
        box: list[Any] = [None]
        torch.distributed.scatter_object_list(box, objs if self.is_main else None, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T], *, share: bool = False) -> T | None:
        """Run ``fn`` on rank 0 only. Its exception is raised on every rank, so none is left waiting.

        The result stays on rank 0 (None elsewhere), or reaches every rank with ``share=True``.
        """
        if not self.enabled:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                error = exc
        error = self.broadcast(_picklable(error))
        if error is not None:
            raise error
        return self.broadcast(result) if share else result

    def reduce_stats(self, values: dict[str, float], *, step: int, stop: bool = False) -> tuple[dict[str, float], bool]:
        """The means of ``values`` over ranks (the maximum for MAX_KEYS), and whether any rank wants to stop.

        One all_gather of a float64 vector; every rank computes the same numbers from the same
        gathered tensor, so decisions taken on them are identical everywhere. A NaN on one rank
        makes the mean NaN on all. A single process gets ``values`` and ``stop`` back unchanged.
        """
        record_rank_stats(self, step, values)
        if not self.enabled:
            return values, stop
        keys = sorted(values)
        local = torch.tensor([values[k] for k in keys] + [float(stop)], dtype=torch.float64, device=self.device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, local)
        table = torch.stack(parts).cpu()  # (world_size, len(keys) + 1)
        out = {k: float(table[:, i].max() if k in MAX_KEYS else table[:, i].mean()) for i, k in enumerate(keys)}
        return out, bool(table[:, -1].max() > 0)

    def check_same(self, value: str, what: str) -> None:
        """Fail on every rank, with one line, unless ``value`` is the same on all ranks."""
        if not self.enabled:
            return
        values = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            raise DistributedError(f"distributed: {what} differ between rank 0 and rank(s) {differ}")

    def share_state(self, read: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
        """A checkpoint read on rank 0, with this rank's own RANK_KEYS entries at the top level.

        A distributed run's checkpoint keeps rank r's buffer and RNG states in
        ``state["ranks"][r]``, and rank 0's also at the top level, where a single process finds
        them. Rank 0 runs ``read`` (None: no usable checkpoint), broadcasts the shared part and
        scatters the per-rank parts. A rank the checkpoint has nothing for (it was written by
        fewer processes) gets the buffer of rank ``rank % saved`` and no RNG state (``None``).
        """

        def split() -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
            state = read()
            if state is None:
                return None
            saved = state.pop("ranks", None) or [{k: state[k] for k in RANK_KEYS}]
            if len(saved) != self.world_size:
                print(
                    f"train: the checkpoint was written by {len(saved)} process(es), this run has "
                    f"{self.world_size}; training goes on, but not exactly as an uninterrupted run would",
                    file=sys.stderr,
                )
            own = [saved[r] if r < len(saved) else {"buffer": saved[r % len(saved)]["buffer"], "rng": None}
                   for r in range(self.world_size)]
            return {k: v for k, v in state.items() if k not in RANK_KEYS}, own

        if not self.enabled:
            parts = split()
            return None if parts is None else {**parts[0], **parts[1][0]}
        parts = self.on_main(split)
        shared = self.broadcast(parts[0] if parts else None)
        if shared is None:
            return None
        return {**shared, **self.scatter(parts[1] if parts else None)}


SINGLE = Dist()


def _picklable(error: BaseException | None) -> BaseException | None:
    """``error`` itself when it can cross to other ranks, else a RuntimeError with its text."""
    if error is None:
        return None
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(error).__name__}: {error}")


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in ENV_VARS)


def init(runtime: RuntimeConfig) -> tuple[Dist, torch.device]:
    """This process's ``Dist`` and training device; joins the process group under torchrun.

    Under torchrun a CUDA device is always ``cuda:LOCAL_RANK`` (choose the GPUs with
    CUDA_VISIBLE_DEVICES), and the backend is nccl; on CPU it is gloo.
    """
    device = resolve_device(runtime)
    if not launched_by_torchrun():
        return SINGLE, device
    if not torch.distributed.is_available():
        raise DistributedError("distributed: this PyTorch build has no torch.distributed; run a single process")
    world_size, rank, local_rank = (int(os.environ[v]) for v in ENV_VARS)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise DistributedError(
            f"distributed: runtime.device={runtime.device} is not supported under torchrun; use cuda or cpu"
        )
    if not torch.distributed.is_initialized():
        bound = {"device_id": device} if backend == "nccl" else {}  # nccl: this rank's GPU, known up front
        torch.distributed.init_process_group(backend=backend, world_size=world_size, rank=rank, **bound)
    return Dist(world_size, rank, local_rank, device, enabled=True), device


def teardown(dist: Dist) -> None:
    """Leave the process group (a no-op for a single process)."""
    if dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def record_rank_stats(dist: Dist, step: int, values: dict[str, float]) -> None:
    """With EBM_DEBUG_RANK_STATS=path, append this rank's own statistics of ``step`` to path (JSONL)."""
    path = os.environ.get(DEBUG_STATS_ENV)
    if not path:
        return
    line = json.dumps({"rank": dist.rank, "world_size": dist.world_size, "step": step, **values}) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one short write in append mode: lines of ranks never interleave
    finally:
        os.close(fd)


__all__ = ["DEBUG_STATS_ENV", "SINGLE", "Dist", "init", "launched_by_torchrun", "record_rank_stats", "teardown"]
