"""Data-parallel scaling: images per second at 1 and N processes, and what the gradients cost to
send; print JSON.

    python benchmarks/scaling.py [--nproc 2] [--rounds 15] [--batch-size 128] [--out FILE]

Each process runs one intra-op thread (on a 2-core machine, 2 processes use both cores). The
global batch is the same at every process count (each of N processes computes batch/N examples),
so images per second compare directly. The one-process phase runs before and after the
N-process phase, and its median over both is the baseline, so that drift of a shared machine shows
up as a difference between the two one-process phases (both are recorded).

Per model and method, per phase: median milliseconds per training step (forward, backward with
DDP's gradient all-reduce, SGD step); at N processes also the same step without communication
(DDP's ``no_sync``), their difference (the communication that computation did not hide), the
median time of one bare all-reduce of the model's gradients, and when in the backward pass the
first and the last parameter gradient were ready (DDP starts sending a bucket when all of its
gradients are ready). The communication volume per step is the gradients' bytes; a ring
all-reduce sends ``2 (N - 1) / N`` times that from each process, which decides scaling on a real
cluster more than anything a 2-core machine can show.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _common import command, emit, options

import dfatorch
from dfatorch.distributed import DDPOptions, _free_port
from dfatorch.models import build_model, count_parameters
from dfatorch.train import environment

MODELS = {"small_cnn": {"activation": "tanh"}, "nokland_cnn": {"activation": "tanh"}}
METHODS: dict[str, dict[str, Any]] = {
    "bp": {"method": "bp"},
    "dfa_all": {"method": "dfa", "scope": "all"},
    "bdfa_fc": {"method": "bdfa", "scope": "fc"},
}
INPUT_SHAPE = (3, 32, 32)


class _Step:
    """One model under one method, ready to time (the model wrapped in DDP when distributed)."""

    def __init__(self, model_key: str, method: dict[str, Any], x: torch.Tensor, y: torch.Tensor,
                 distributed: bool) -> None:  # fmt: skip
        torch.manual_seed(0)
        self.model = build_model(model_key, INPUT_SHAPE, 10, **MODELS[model_key])
        self.engine = dfatorch.attach(self.model, example_input=x[:2], **method)
        self.net = DDPOptions().wrap(self.model, x.device) if distributed else self.model
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.x, self.y = x, y
        self.ready: list[float] = []
        for p in self.model.parameters():
            p.register_post_accumulate_grad_hook(lambda _: self.ready.append(time.perf_counter()))

    def __call__(self, communicate: bool = True) -> tuple[float, float, float]:
        """Seconds for the whole step; seconds from the backward's start to the first and the
        last parameter gradient."""
        self.ready.clear()
        self.opt.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = F.cross_entropy(self.net(self.x), self.y)
        backward = time.perf_counter()
        if communicate or not isinstance(self.net, torch.nn.parallel.DistributedDataParallel):
            loss.backward()
        else:
            with self.net.no_sync():
                loss.backward()
        self.opt.step()
        end = time.perf_counter()
        return end - start, min(self.ready) - backward, max(self.ready) - backward


def _batch(batch: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *INPUT_SHAPE, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return x[rank::world].contiguous(), y[rank::world].contiguous()


def _median_ms(values: list[float]) -> float:
    return round(1000 * statistics.median(values), 3)


def _phase(rank: int, world: int, args: argparse.Namespace) -> dict[str, Any]:
    """Time every model and method in this process (one of ``world``), interleaved by round."""
    x, y = _batch(args.batch_size, rank, world)
    steps = {(m, k): _Step(m, spec, x, y, world > 1) for m in MODELS for k, spec in METHODS.items()}
    modes = [True, False] if world > 1 else [True]
    times: dict[tuple[str, str, bool], list[tuple[float, float, float]]] = {
        (m, k, c): [] for (m, k) in steps for c in modes
    }
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    for _ in range(args.rounds):
        for (m, k), step in steps.items():
            for c in modes:
                if world > 1:
                    dist.barrier()  # every rank starts the step together
                times[(m, k, c)].append(step(c))
    out: dict[str, Any] = {}
    for (m, k), step in steps.items():
        full = times[(m, k, True)]
        row = {
            "step_ms": _median_ms([t[0] for t in full]),
            "images_per_second": round(args.batch_size / statistics.median(t[0] for t in full), 1),
            "first_gradient_ready_ms": _median_ms([t[1] for t in full]),
            "last_gradient_ready_ms": _median_ms([t[2] for t in full]),
        }
        if world > 1:
            alone = times[(m, k, False)]
            row["step_without_communication_ms"] = _median_ms([t[0] for t in alone])
            row["unhidden_communication_ms"] = round(
                row["step_ms"] - row["step_without_communication_ms"], 3
            )
            flat = torch.zeros(sum(p.numel() for p in step.model.parameters()))
            reduce_times = []
            for _ in range(args.rounds):
                dist.barrier()
                start = time.perf_counter()
                dist.all_reduce(flat)
                reduce_times.append(time.perf_counter() - start)
            row["bare_all_reduce_ms"] = _median_ms(reduce_times)
        out.setdefault(m, {})[k] = row
    return out


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _phase(rank, world, args)
        if rank == 0:
            torch.save(result, out)
        dist.barrier()  # leave together (see distributed.process_group)
    finally:
        dist.destroy_process_group()


def _distributed_phase(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "phase.pt")
        mp.start_processes(_worker, args=(args.nproc, _free_port(), args, out),
                           nprocs=args.nproc, start_method="spawn")  # fmt: skip
        return torch.load(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128, help="the global batch")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    before = _phase(0, 1, args)
    spread = _distributed_phase(args)
    after = _phase(0, 1, args)
    results: dict[str, Any] = {}
    for m in MODELS:
        params = count_parameters(build_model(m, INPUT_SHAPE, 10, **MODELS[m]))
        grad_bytes = 4 * params
        results[m] = {
            "parameters": params,
            "gradient_bytes_per_step": grad_bytes,
            "ring_all_reduce_bytes_sent_per_process": round(
                2 * (args.nproc - 1) / args.nproc * grad_bytes
            ),
            "methods": {},
        }
        for k in METHODS:
            one = statistics.mean([before[m][k]["step_ms"], after[m][k]["step_ms"]])
            results[m]["methods"][k] = {
                "one_process": {"before": before[m][k], "after": after[m][k]},
                f"{args.nproc}_processes": spread[m][k],
                "speedup": round(one / spread[m][k]["step_ms"], 3),
            }
    report = {
        "benchmark": "scaling",
        "command": command(__file__, argv),
        "config": options(args, skip=("out",)),
        "machine": {**environment(), "threads_per_process": 1},
        "results": results,
    }
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
