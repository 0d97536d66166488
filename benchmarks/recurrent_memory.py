"""Saved-activation bytes and step time of recurrent models, BPTT against DFA; print JSON.

    python benchmarks/recurrent_memory.py [--cells lstm gru] [--steps 28 784] [--out FILE]

For each cell (``lstm``, ``gru``: the zoo's one-layer models, ``--hidden`` units), sequence
length ``T`` (28: rows of an MNIST image, 28 pixels a step; 784: permuted pixels, one a step) and
method (``bp``: back-propagation through time; ``dfa``: every step's state gets ``e @ B``, the
recurrent connection cut), on random inputs with a last-step classification loss:

* **saved bytes**: the tensors autograd saves for the backward pass during the forward pass,
  counted in a ``torch.autograd.graph.saved_tensors_hooks`` pack hook: exact and
  device-independent. ``saved_bytes`` counts each distinct storage once (what the graph holds),
  parameters excluded (they live anyway); ``saved_tensors`` is how many tensors were packed.
* **step time**: forward, backward and an SGD step; the methods timed in one process,
  interleaved round by round, warm-up excluded; the median over rounds, and the median of the
  per-round ratio ``dfa / bp``.

Both methods keep every step's local graph until the loss is known (DFA's weight gradient at
step ``t`` needs ``f'(a_t)``, ``h_{t-1}`` and ``x_t``, and the error arrives at the end), so both
save ``O(T)`` bytes; DFA drops what only the chain through time needed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from _common import command, emit, options

import dfatorch
from dfatorch.models import build_model
from dfatorch.train import environment

METHODS = ("bp", "dfa")
NUM_CLASSES = 10


def input_shape(steps: int) -> tuple[int, int, int]:
    """28 steps of 28 pixels, or ``steps`` steps of one pixel."""
    return (1, 28, 28) if steps == 28 else (1, steps, 1)


def make_step(cell: str, steps: int, method: str, batch: int, hidden: int, device: torch.device):
    """A seeded model, batch and optimiser; returns ``step()``."""
    torch.manual_seed(0)
    shape = input_shape(steps)
    model = build_model(cell, shape, NUM_CLASSES, hidden_size=hidden).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
    dfatorch.attach(model, method, scope="all", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return model, x, y, step


def saved(cell: str, steps: int, method: str, batch: int, hidden: int, device: torch.device):
    """Bytes of the distinct storages autograd saves for backward (parameters excluded)."""
    model, x, y, _ = make_step(cell, steps, method, batch, hidden, device)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return {"saved_bytes": sum(storages.values()), "saved_tensors": count}


def timing(cell: str, steps: int, batch: int, hidden: int, device: torch.device,
           rounds: int, warmup: int) -> dict[str, Any]:  # fmt: skip
    runs = {m: make_step(cell, steps, m, batch, hidden, device)[3] for m in METHODS}

    def timed(step) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for step in runs.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(rounds):
        for m, step in runs.items():
            times[m].append(timed(step))
    out: dict[str, Any] = {m: {"ms_median": round(1e3 * statistics.median(t), 2)} for m, t in
                           times.items()}  # fmt: skip
    out["dfa_over_bp"] = round(
        statistics.median(d / b for d, b in zip(times["dfa"], times["bp"])), 3
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cells", nargs="+", default=["lstm", "gru"], choices=["rnn", "gru", "lstm"]
    )
    parser.add_argument("--steps", nargs="+", type=int, default=[28, 784])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results: dict[str, Any] = {}
    for cell in args.cells:
        results[cell] = {}
        for steps in args.steps:
            print(f"{cell} T={steps}", file=sys.stderr, flush=True)
            row: dict[str, Any] = {
                m: saved(cell, steps, m, args.batch, args.hidden, device) for m in METHODS
            }
            row["saved_dfa_over_bp"] = round(
                row["dfa"]["saved_bytes"] / row["bp"]["saved_bytes"], 3
            )
            row["time"] = timing(cell, steps, args.batch, args.hidden, device, args.rounds,
                                 args.warmup)  # fmt: skip
            results[cell][str(steps)] = row
    scaling: dict[str, Any] = {}
    lo, hi = min(args.steps), max(args.steps)
    if lo != hi:
        for cell, rows in results.items():
            scaling[cell] = {
                m: {
                    "saved_bytes_ratio": round(
                        rows[str(hi)][m]["saved_bytes"] / rows[str(lo)][m]["saved_bytes"], 2
                    ),
                    "time_ratio": round(
                        rows[str(hi)]["time"][m]["ms_median"]
                        / rows[str(lo)]["time"][m]["ms_median"],
                        2,
                    ),
                }
                for m in METHODS
            }
            scaling[cell]["steps_ratio"] = round(hi / lo, 2)
    report = {
        "benchmark": "recurrent_memory",
        "command": command(__file__, argv),
        "config": options(args),
        "results": results,
        f"scaling_T{lo}_to_T{hi}": scaling,
        "environment": environment(),
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
