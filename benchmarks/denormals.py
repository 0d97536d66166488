"""A training step with dead channels whose weights have decayed to denormal floats, with and
without flushing denormals to zero; print JSON.

    python benchmarks/denormals.py [--rounds 9] [--steps 5] [--dead 4] [--threads 1] [--out FILE]

Under Adam with L2 weight decay, a channel that batch norm and ReLU have switched off gets no
gradient but the decay's, and its weights and first moments shrink until they are denormal
(below ``1.2e-38``), where each multiply runs in microcode. A 30-epoch CIFAR-10 run of
``small_cnn`` (ReLU, batch norm, Adam, weight decay 5e-4; ``cifar-converged``'s ``bp``, seed 0)
reached that state from about epoch 12 on, its epochs slowing several-fold; its checkpoint after
epoch 16 held 4 such channels of the third conv layer (6% of that layer's weights and of the
first fully connected layer's). ``dfatorch.train`` and the command line now flush denormals
(:func:`dfatorch.train.flush_denormals`).

This builds that state on purpose, reproducibly: ``small_cnn`` as the experiments build it
(channels-last), one Adam step to create the optimiser's state, then ``--dead`` channels of the
third conv layer switched off (their batch-norm scale and shift set to 0, with zero first
moments, so that Adam leaves them there) and their incoming conv weights, their outgoing fully
connected weights and those weights' first moments set to denormal values. Per round, a fresh
copy takes ``--steps`` training steps with the flag off and another with it on (order alternating
round by round; one warm-up round excluded). Reported: milliseconds per step in each mode
(medians), the median per-round ratio on / off, and how many denormal weights each mode leaves
after its steps (without the flag, all of them stay). Run it with ``--threads 1``: the flag
reaches only the calling thread (and threads started after it is set), so with more threads
part of the work would still meet denormals.
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

from dfatorch.models import build_model
from dfatorch.train import environment

INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
BATCH = 64
CONV, NORM, FC = 8, 9, 13  # small_cnn's third conv layer, its batch norm, the first linear layer
DENORMAL = 1e-39  # below torch.finfo(torch.float32).tiny = 1.18e-38
#: from that run: such a weight's second moment (about 2.6e-12 two epochs later) and Adam's step
#: count after epoch 16 (782 steps an epoch). The decay's gradient alone, normalised by it,
#: shrinks the weight by about a third a step, so it stays denormal for tens of steps
SECOND_MOMENT = 2.6e-12
STEP = 16 * 782
WEIGHT_DECAY = 5e-4


def denormal_count(model: torch.nn.Module) -> int:
    tiny = torch.finfo(torch.float32).tiny
    return sum(int(((p.abs() > 0) & (p.abs() < tiny)).sum()) for p in model.parameters())


def decayed_model(dead: int, x: torch.Tensor, y: torch.Tensor):
    """``small_cnn`` and its Adam optimiser with ``dead`` channels of the third conv layer off and
    their weights (and first moments) denormal."""
    torch.manual_seed(0)
    model = build_model("small_cnn", INPUT_SHAPE, NUM_CLASSES, activation="relu", batch_norm=True,
                        dropout=0.5).to(memory_format=torch.channels_last)  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=WEIGHT_DECAY)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    conv, norm, fc = model[CONV], model[NORM], model[FC]
    positions = fc.in_features // conv.out_channels  # flattened inputs per channel
    channels = torch.arange(dead)
    columns = (channels[:, None] * positions + torch.arange(positions)).flatten()
    with torch.no_grad():
        for param in (norm.weight, norm.bias):
            param[channels] = 0.0
            opt.state[param]["exp_avg"][channels] = 0.0
            opt.state[param]["exp_avg_sq"][channels] = SECOND_MOMENT
        for weight, index in ((conv.weight, (channels,)), (fc.weight, (slice(None), columns))):
            weight[index] = DENORMAL * torch.sign(weight[index])
            # the first moment tracks the decay's gradient, weight_decay * w (denormal too)
            opt.state[weight]["exp_avg"][index] = WEIGHT_DECAY * weight[index]
            opt.state[weight]["exp_avg_sq"][index] = SECOND_MOMENT
        for state in opt.state.values():  # late in the run: Adam's bias corrections are ~1
            state["step"].fill_(STEP)
    return model, opt


def steps(flush: bool, dead: int, n: int, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """Seconds per step over ``n`` steps of a fresh decayed model, and its denormals after."""
    model, opt = decayed_model(dead, x, y)
    torch.set_flush_denormal(flush)
    try:
        start = time.perf_counter()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        seconds = (time.perf_counter() - start) / n
    finally:
        torch.set_flush_denormal(False)
    return seconds, denormal_count(model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="training steps per timing")
    parser.add_argument("--dead", type=int, default=4, help="dead channels of the third conv")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not torch.set_flush_denormal(False):
        raise SystemExit("this CPU cannot flush denormals (no SSE3): nothing to compare")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *INPUT_SHAPE, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
    before = os.getloadavg()
    times: dict[bool, list[float]] = {False: [], True: []}
    left: dict[bool, list[int]] = {False: [], True: []}
    injected = denormal_count(decayed_model(args.dead, x, y)[0])
    for r in range(args.warmup + args.rounds):
        for flush in (False, True) if r % 2 == 0 else (True, False):
            seconds, count = steps(flush, args.dead, args.steps, x, y)
            if r >= args.warmup:
                times[flush].append(seconds)
                left[flush].append(count)
    ratios = [on / off for on, off in zip(times[True], times[False])]
    result: dict[str, Any] = {
        "denormal_weights_injected": injected,
        "ms_per_step_flush_off": round(1e3 * statistics.median(times[False]), 2),
        "ms_per_step_flush_on": round(1e3 * statistics.median(times[True]), 2),
        "ratio_on_off": round(statistics.median(ratios), 3),
        "denormal_weights_after_steps": {
            "flush_off": min(left[False]),
            "flush_on": max(left[True]),
        },
    }
    machine = {**environment(), "load_average_1_5_15min": {"before": before,
                                                           "after": os.getloadavg()}}  # fmt: skip
    emit({
        "benchmark": "denormals",
        "command": command(__file__, argv),
        "config": {**options(args), "batch_size": BATCH, "model": "small_cnn (relu, batch norm)",
                   "optimizer": "adam, weight decay 5e-4"},
        "machine": machine,
        "result": result,
    }, args.out)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
