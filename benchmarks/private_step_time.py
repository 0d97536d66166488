"""What privacy costs per training step: BP and DFA without privacy, with the native per-example
engine and with opacus's; print JSON.

    python benchmarks/private_step_time.py [--rounds 7] [--batch-size 256] [--out FILE]

Every variant of a model is timed in the same run, interleaved round by round, warm-up excluded;
reported: the median milliseconds per step (forward, backward, per-example clipping and noise,
SGD step) and each variant's ratio to the same method without privacy (median of per-round
ratios). The models are the ones of the private-training experiment: a 784-256-256-10 MLP (tanh)
on Fashion-MNIST-sized inputs and ``small_cnn`` (tanh) on CIFAR-sized ones.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _common import command, emit, options

import dfatorch
from dfatorch.callbacks import TrainState
from dfatorch.models import build_model
from dfatorch.privacy import DifferentialPrivacy
from dfatorch.train import TrainConfig, environment

MODELS = {
    "mlp_784_256_256": dict(name="mlp", shape=(1, 28, 28), options={"width": 0.32}),
    "small_cnn": dict(name="small_cnn", shape=(3, 32, 32), options={}),
}
METHODS = {"bp": {"method": "bp"}, "dfa_all": {"method": "dfa", "scope": "all"}}
ENGINES = ["off", "native", "opacus"]


def make_step(model_key: str, method: dict[str, Any], engine: str, batch: int,
              workdir: str) -> Callable[[], None]:  # fmt: skip
    spec = MODELS[model_key]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *spec["shape"], generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    torch.manual_seed(0)
    model = build_model(spec["name"], spec["shape"], 10, activation="tanh", **spec["options"])
    attached = dfatorch.attach(model, example_input=x[:2], **method)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if engine == "off":

        def plain() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        return plain
    dp = DifferentialPrivacy(clip=1.0, delta=1e-5, batch_size=batch, noise_multiplier=1.0,
                             engine=engine)  # fmt: skip
    state = TrainState(config=TrainConfig(epochs=1), run_dir=workdir, model=model,  # type: ignore[arg-type]
                       engine=attached, optimizer=opt, loss_fn=F.cross_entropy,
                       steps_per_epoch=100, train_size=60000)  # fmt: skip
    dp.on_train_start(state)

    def private() -> None:
        opt.zero_grad(set_to_none=True)
        dp.on_batch_start(state)
        with dp.step_context(state):
            F.cross_entropy(model(x), y).backward()
        dp.before_step(state)
        opt.step()
        dp.after_step(state)

    return private


def measure(model_key: str, args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    steps = {(m, e): make_step(model_key, spec, e, args.batch_size, workdir)
             for m, spec in METHODS.items() for e in ENGINES}  # fmt: skip
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[tuple[str, str], list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    out: dict[str, Any] = {}
    for (m, e), ts in times.items():
        base = times[(m, "off")]
        out.setdefault(m, {})[e] = {
            "ms_median": round(1e3 * statistics.median(ts), 2),
            "ratio_to_non_private": round(statistics.median(t / b for t, b in zip(ts, base)), 3),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "benchmark": "private_step_time",
        "command": command(__file__, argv),
        "config": options(args, skip=("out",)),
        "machine": environment(),
        "models": {},
    }
    with tempfile.TemporaryDirectory() as workdir:
        for key in MODELS:
            print(f"timing {key} ...", file=sys.stderr, flush=True)
            report["models"][key] = measure(key, args, workdir)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
