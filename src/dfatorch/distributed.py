"""Data-parallel training on ``torch.distributed``: the process group, the collectives the trainer
needs, and a launcher.

Every method trains data-parallel the same way. Each of ``N`` processes (ranks) holds the whole
model and engine; the engine's feedback is built from the same seed on every rank and checked to
be identical at the start (:func:`check_identical`). A global batch of ``B`` examples is split
across the ranks by position (rank ``r`` takes positions ``r, r + N, ...``; see
:class:`~dfatorch.data.BatchLoader`'s ``shard``), each rank computes its part of the loss scaled
so that averaging gradients over the ranks gives exactly the global batch's mean gradient
(:func:`shard_loss_scale`), and ``DistributedDataParallel`` averages the gradients during the
backward pass. DFA's cut graph and its single projection Function need nothing special: every
parameter is still reached from the output, once per backward, which is all DDP's reducer asks.

Launch with ``torchrun --nproc-per-node N -m dfatorch train ...`` or ``dfatorch train --nproc N
...`` (:func:`launch`, which also names the rank that failed). The process group is set up from
the usual environment variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``):
gloo on the CPU, NCCL on CUDA.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DDPOptions",
    "ProcessGroup",
    "RankLost",
    "all_reduce_sum",
    "average_gradients",
    "check_identical",
    "gather_batch",
    "gather_objects",
    "launch",
    "lost_contact",
    "process_group",
    "shard_loss_scale",
    "state_digest",
]


@dataclass(frozen=True)
class ProcessGroup:
    """Where this process stands: ``rank`` of ``world_size`` (1: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "backend": self.backend}


@dataclass(frozen=True)
class DDPOptions:
    """How the trainer wraps the model in ``DistributedDataParallel`` (the results do not depend
    on these; only the speed does)."""

    #: traverse the graph after each forward for parameters without a gradient (none in the zoo's
    #: models, under any method: DFA's cut graph still reaches every parameter)
    find_unused_parameters: bool = False
    #: gradient bucket size: an all-reduce starts as soon as a bucket's gradients are all there
    bucket_cap_mb: float = 25.0

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model,
            device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=self.find_unused_parameters,
            bucket_cap_mb=self.bucket_cap_mb,
        )


class RankLost(RuntimeError):
    """Another process of a data-parallel job stopped (killed, crashed): this one cannot go on."""


#: what gloo's and NCCL's errors say when the process at the other end has gone away
_LOST_MARKERS = ("Connection reset", "Connection closed", "Broken pipe", "NCCL communicator",
                 "Socket Timeout", "timed out")  # fmt: skip


def lost_contact(exc: BaseException) -> bool:
    """Whether ``exc`` says that another rank of the job is gone."""
    dist_error = getattr(dist, "DistError", ())
    return isinstance(exc, dist_error) or any(m in str(exc) for m in _LOST_MARKERS)


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


@contextlib.contextmanager
def process_group(device: torch.device, *, timeout_s: float = 600.0) -> Iterator[ProcessGroup]:
    """The process group this process trains in.

    If ``torch.distributed`` is already initialised (by the caller), it is used as it is and left
    alone. Otherwise, with ``WORLD_SIZE > 1`` in the environment (``torchrun`` or :func:`launch`),
    a group is initialised from the environment (gloo for a CPU ``device``, NCCL for CUDA) and
    destroyed on exit. Otherwise: one process, nothing to set up.
    """
    if dist.is_available() and dist.is_initialized():
        yield _describe()
        return
    if _env_world_size() <= 1:
        yield ProcessGroup()
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield _describe()
        # leave together: a rank tearing its transport down while a peer still writes its
        # checkpoint can abort the peer (gloo's threads end in std::terminate)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _describe() -> ProcessGroup:
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), local, str(dist.get_backend()))


def shard_loss_scale(local: int, total: int, world_size: int) -> float:
    """The factor on a rank's batch-mean loss so that averaging the ranks' gradients (what DDP
    does) gives the gradient of the mean loss over the whole global batch.

    Rank ``r`` holds ``n_r`` of the ``n`` examples: ``mean_r * n_r * N / n`` averaged over ``N``
    ranks is ``sum_i loss_i / n``. Exact also when the shards differ in size by one.
    """
    return local * world_size / total


def all_reduce_sum(
    values: Sequence[float], group: ProcessGroup, device: torch.device
) -> list[float]:
    """Sum ``values`` over the ranks (float64; one collective). Identity with one process."""
    if not group.enabled:
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def average_gradients(params: Iterable[nn.Parameter], group: ProcessGroup) -> None:
    """Average the ``.grad`` of ``params`` over the ranks (what DDP does for the model's own
    parameters), one collective for all of them. Every rank must pass the same parameters."""
    grads = [p.grad for p in params if p.requires_grad and p.grad is not None]
    if not group.enabled or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= group.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def gather_objects(obj: Any, group: ProcessGroup) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not group.enabled:
        return [obj]
    out: list[Any] = [None] * group.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_batch(x: Tensor, y: Tensor, group: ProcessGroup) -> tuple[Tensor, Tensor]:
    """The global batch, reassembled in its original order from the ranks' strided shards
    (position ``p`` lives on rank ``p % N`` at index ``p // N``). For rare uses: calibration."""
    if not group.enabled:
        return x, y
    parts = gather_objects((x.cpu(), y.cpu()), group)
    total = sum(len(py) for _, py in parts)
    xs = torch.empty((total, *x.shape[1:]), dtype=x.dtype)
    ys = torch.empty((total, *y.shape[1:]), dtype=y.dtype)
    for rank, (px, py) in enumerate(parts):
        xs[rank :: group.world_size] = px
        ys[rank :: group.world_size] = py
    return xs.to(x.device), ys.to(y.device)


def state_digest(module: nn.Module) -> str:
    """A SHA-256 of ``module.state_dict()``'s tensors (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        if not isinstance(value, Tensor):
            continue
        data = value.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def check_identical(what: str, module: nn.Module, group: ProcessGroup) -> None:
    """Refuse to train if ``module``'s state differs between ranks (e.g. feedback drawn from
    different seeds): ``RuntimeError`` naming the ranks that differ from rank 0."""
    digests = gather_objects(state_digest(module), group)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise RuntimeError(
            f"the {what} differs between ranks (ranks {differ} differ from rank 0): every rank "
            "must build it from the same seed and options"
        )


# -- the launcher -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def launch(
    argv: Sequence[str],
    nproc: int,
    *,
    threads: int | None = None,
    grace_s: float = 10.0,
    log: Any = None,
) -> int:
    """Run ``python -m dfatorch ARGV`` in ``nproc`` processes on this machine, as ``torchrun
    --nproc-per-node`` would (same environment variables, loopback rendezvous), and watch them.

    If one process fails, the others are stopped (SIGTERM, then SIGKILL after ``grace_s``) and one
    line names the rank and how it ended. The first Ctrl-C reaches every rank, which stop at a
    step boundary with a checkpoint; a second one stops them at once. ``threads``: intra-op
    threads per process (default: the CPU count divided by ``nproc``, at least 1), unless
    ``OMP_NUM_THREADS`` is already set. Returns 0, or the failed rank's exit code (128 + signal
    number for a killed process; 130 if interrupted).
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    base = dict(os.environ)
    base.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
    )
    if "OMP_NUM_THREADS" not in base:
        base["OMP_NUM_THREADS"] = str(threads or max(1, (os.cpu_count() or 1) // nproc))
    # Each rank in a session of its own: a Ctrl-C at the terminal reaches the launcher only, which
    # forwards it once, so every rank sees the same number of interrupts.
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dfatorch", *argv],
            env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            start_new_session=True,
        )
        for rank in range(nproc)
    ]
    interrupts = 0

    def forward(signum: int, frame: Any) -> None:
        nonlocal interrupts
        interrupts += 1
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    first: tuple[int, int] | None = None  # the rank that failed first, and its exit code
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed and first is None:
                # seen in the same poll: a rank killed by a signal is the cause, not the ranks
                # whose collectives failed because it was gone
                first = min(failed, key=lambda rc: (rc[1] >= 0, rc[0]))
            if all(c is not None for c in codes) or (first and not interrupts):
                break  # a rank died: the others would wait for it forever
            time.sleep(0.1)
        if first is None:
            return 130 if interrupts else 0  # a Ctrl-C the ranks took after their last step
        rank, code = first
        _stop_all(procs, grace_s)
        if interrupts:
            return 130
        say(f"error: rank {rank} of {nproc} {_describe_exit(code)}; the other ranks were stopped")
        return code if code > 0 else 128 - code
    finally:
        _stop_all(procs, grace_s)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stop_all(procs: Sequence[subprocess.Popen[Any]], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
