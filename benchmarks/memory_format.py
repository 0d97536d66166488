"""Channels-last against the contiguous layout: a training step and an evaluation pass per model
and rule, as the experiments run them; print JSON.

    python benchmarks/memory_format.py [--rounds 15] [--threads 1] [--models ...] [--out FILE]

``channels_last = true`` in a config (``--channels-last`` on ``train``) converts the model and
each batch to the channels-last layout: the same computation, summed in another order (results
differ at float rounding, as on another device). This measures whether it is faster. Per round,
every (rule, layout) pair takes one training step (Adam, the experiments' batch of 64, the
trainer's conversions) and one evaluation pass (``EVAL_BATCH_SIZE`` images, no gradients); the
layouts' order alternates round by round so that drift of a shared machine hits both alike; two
warm-up rounds are excluded. Reported per model and rule: the median milliseconds in each layout
and the median over rounds of the per-round ratio channels-last / contiguous (below 1: faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from _common import command, emit, options

import dfatorch
from dfatorch.models import build_model
from dfatorch.train import EVAL_BATCH_SIZE, environment

INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
#: the zoo's CIFAR models as the experiments build them, and the rules they train them by
MODELS: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "small_cnn_bn": ("small_cnn", {"activation": "relu", "batch_norm": True},
                     ["bp", "dfa_all", "dfa_fc", "bdfa_fc"]),
    "small_cnn_tanh": ("small_cnn", {"activation": "tanh"}, ["bp", "dfa_all", "dfa_fc", "bdfa_fc"]),
    "nokland_cnn": ("nokland_cnn", {"activation": "tanh"}, ["bp", "dfa_all", "dfa_fc"]),
    "resnet20": ("resnet20", {}, ["bp", "mod_dfa_bp"]),
}  # fmt: skip
RULES: dict[str, dict[str, Any]] = {
    "bp": {"method": "bp"},
    "dfa_all": {"method": "dfa", "scope": "all"},
    "dfa_fc": {"method": "dfa", "scope": "fc"},
    "bdfa_fc": {"method": "bdfa", "scope": "fc", "storage": "packed"},
    "mod_dfa_bp": {"method": "dfa", "scope": "module", "inner": "bp"},
}
BATCH = 64
EVAL_IMAGES = 2 * EVAL_BATCH_SIZE


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _runner(key: str, rule: str, channels_last: bool, x: torch.Tensor, y: torch.Tensor,
            test: torch.Tensor):  # fmt: skip
    """A training step and an evaluation pass: the model in the layout, each batch converted to
    it (as the trainer does), the rule attached with an example input of that layout."""
    name, kw, _ = MODELS[key]
    torch.manual_seed(0)
    model = build_model(name, INPUT_SHAPE, NUM_CLASSES, **kw)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    dfatorch.attach(model, example_input=_layout(x[:2], channels_last), **RULES[rule])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> float:
        model.train()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(_layout(x, channels_last)), y).backward()
        opt.step()
        return time.perf_counter() - start

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        start = time.perf_counter()
        for i in range(0, len(test), EVAL_BATCH_SIZE):
            model(_layout(test[i : i + EVAL_BATCH_SIZE], channels_last)).argmax(-1)
        return time.perf_counter() - start

    return step, evaluate


def measure(key: str, rounds: int, warmup: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *INPUT_SHAPE, generator=g)
    y = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
    test = torch.randn(EVAL_IMAGES, *INPUT_SHAPE, generator=g)
    result: dict[str, Any] = {}
    for rule in MODELS[key][2]:
        runners = {cl: _runner(key, rule, cl, x, y, test) for cl in (False, True)}
        times: dict[str, dict[bool, list[float]]] = {"step": {False: [], True: []},
                                                     "eval": {False: [], True: []}}  # fmt: skip
        for r in range(warmup + rounds):
            for cl in (False, True) if r % 2 == 0 else (True, False):
                step, evaluate = runners[cl]
                timed = (step(), evaluate())
                if r >= warmup:
                    times["step"][cl].append(timed[0])
                    times["eval"][cl].append(timed[1])
        entry: dict[str, Any] = {}
        for what, per in times.items():
            ratios = [c / p for c, p in zip(per[True], per[False])]
            entry[what] = {
                "ms_contiguous": round(1e3 * statistics.median(per[False]), 2),
                "ms_channels_last": round(1e3 * statistics.median(per[True]), 2),
                "ratio_channels_last": round(statistics.median(ratios), 3),
            }
        result[rule] = entry
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = {**options(args), "batch_size": BATCH, "eval_batch_size": EVAL_BATCH_SIZE,
              "eval_images": EVAL_IMAGES}  # fmt: skip
    before = os.getloadavg()  # a shared machine slows both layouts alike; the ratios compare
    models = {key: measure(key, args.rounds, args.warmup) for key in args.models}
    machine = {**environment(), "load_average_1_5_15min": {"before": before,
                                                           "after": os.getloadavg()}}  # fmt: skip
    report = {
        "benchmark": "memory_format",
        "command": command(__file__, argv),
        "config": {**config, "optimizer": "adam"},
        "machine": machine,
        "models": models,
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
