"""What K-FAC adds to a training step, broken down: factor statistics, decompositions, applying
the preconditioner; print JSON.

    python benchmarks/kfac_overhead.py [--rounds 7] [--batch-size 128] [--models ...]
                                       [--methods ...] [--compute-method eigen] [--device cpu]
                                       [--out FILE]

Per model and method (``bp``; the BDFA hybrid ``bdfa_fc``), two copies of the same network are
timed in the same rounds, interleaved (warm-up excluded): a plain step (forward, backward, SGD
step) and a K-FAC step whose parts are timed one by one:

- ``factor``: what the statistics' hooks add to forward + backward (the K-FAC step's forward +
  backward minus the plain one's, per round) plus :meth:`KFACPreconditioner.update_factors`
  (the reduction over ranks, none here, and the running averages); factors every step;
- ``eigen``: :meth:`~KFACPreconditioner.update_decompositions` per call, and amortised over
  ``--inv-steps`` steps (its share of every step);
- ``apply``: :meth:`~KFACPreconditioner.apply` (preconditioning and the KL clip).

Reported: medians in milliseconds, the K-FAC step (plain + factor + eigen / inv_steps + apply) and
its ratio to the plain step (median of per-round ratios), and each layer's factor dimensions
(``groups x dim A / groups x dim G``).
One process: the distributed share of the decompositions divides ``eigen`` by up to the number of
ranks (and adds the broadcasts).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _common import command, emit, options

import dfatorch
from dfatorch.kfac import KFACPreconditioner
from dfatorch.models import build_model
from dfatorch.train import environment, resolve_device

MODELS = {
    "small_cnn": dict(name="small_cnn", shape=(3, 32, 32), options={}),
    "mlp_3x800": dict(name="mlp_3x800", shape=(3, 32, 32), options={}),
    "nokland_cnn": dict(name="nokland_cnn", shape=(3, 32, 32), options={}),
}
METHODS = {"bp": {"method": "bp"}, "bdfa_fc": {"method": "bdfa", "scope": "fc"}}
PARTS = ("forward_backward", "update_factors", "eigen", "apply")


def _timer(device: torch.device) -> Callable[[], float]:
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    return now


def _network(key: str, method: dict[str, Any], device: torch.device):
    spec = MODELS[key]
    torch.manual_seed(0)
    model = build_model(spec["name"], spec["shape"], 10, **spec["options"]).to(device)
    dfatorch.attach(model, **method)
    return model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)


def measure(key: str, method: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    now = _timer(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, *MODELS[key]["shape"], generator=g).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    plain, plain_opt = _network(key, method, device)
    model, opt = _network(key, method, device)
    precond = KFACPreconditioner(model, compute_method=args.compute_method, kl_clip=1e-3,
                                 lr=1e-3, inv_update_steps=args.inv_steps)  # fmt: skip

    def plain_step() -> tuple[float, float]:
        """(forward + backward, the whole step)"""
        start = now()
        plain_opt.zero_grad(set_to_none=True)
        F.cross_entropy(plain(x), y).backward()
        middle = now()
        plain_opt.step()
        return middle - start, now() - start

    def kfac_step() -> dict[str, float]:
        t = [now()]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        t.append(now())
        precond.update_factors()
        t.append(now())
        precond.update_decompositions()
        t.append(now())
        precond.apply()
        t.append(now())
        opt.step()
        precond.steps += 1
        return {part: t[i + 1] - t[i] for i, part in enumerate(PARTS)}

    for _ in range(args.warmup):
        plain_step()
        kfac_step()
    rounds: list[dict[str, float]] = []
    for _ in range(args.rounds):
        plain_fb, base = plain_step()
        parts = kfac_step()
        hooks = max(parts["forward_backward"] - plain_fb, 0.0)
        factor = hooks + parts["update_factors"]
        total = base + factor + parts["eigen"] / args.inv_steps + parts["apply"]
        rounds.append({"plain": base, "hooks": hooks, "factor": factor, "eigen": parts["eigen"],
                       "apply": parts["apply"], "kfac_step": total,
                       "ratio": total / base})  # fmt: skip

    def median(k: str) -> float:
        return statistics.median(r[k] for r in rounds)

    ms = {k: round(1e3 * median(k), 3) for k in ("plain", "hooks", "factor", "eigen", "apply")}
    return {
        "ms_median": {**ms, "eigen_per_step": round(ms["eigen"] / args.inv_steps, 3),
                      "kfac_step": round(1e3 * median("kfac_step"), 3)},
        "ratio_to_plain": round(median("ratio"), 3),
        "factor_dims": {layer.name: f"{layer.groups}x{layer.a_dim} / {layer.groups}x{layer.g_dim}"
                        for layer in precond.layers},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--inv-steps", type=int, default=10, help="steps per decomposition")
    parser.add_argument("--compute-method", default="eigen", choices=("eigen", "inverse"))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "benchmark": "kfac_overhead",
        "command": command(__file__, argv),
        "config": options(args, skip=("out",)),
        "machine": environment(),
        "models": {},
    }
    for key in args.models:
        for name in args.methods:
            print(f"timing {key} {name} ...", file=sys.stderr, flush=True)
            report["models"].setdefault(key, {})[name] = measure(key, METHODS[name], args)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
