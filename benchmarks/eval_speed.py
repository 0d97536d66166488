"""Evaluation throughput per model and batch size (forward only, eval mode, no gradients); print
JSON.

    python benchmarks/eval_speed.py [--rounds 5] [--images 1000] [--threads 1] [--models ...]
                                    [--batch-sizes ...] [--out FILE]

The trainer's evaluation batch (``dfatorch.train.EVAL_BATCH_SIZE``) is chosen from this. Batch
sizes are interleaved round by round, their order rotated each round, so that drift of a shared
machine hits all alike; two warm-up batches per model and batch size are excluded. Reported: the
median images per second over rounds, and each batch size's ratio to the trainer's (the median of
the per-round ratios, so not quite the ratio of the medians).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
from _common import command, emit, options

from dfatorch.models import build_model
from dfatorch.train import EVAL_BATCH_SIZE, environment

INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
#: the zoo's CIFAR models as the experiments build them
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "small_cnn": ("small_cnn", {"batch_norm": True, "activation": "relu"}),
    "small_cnn_tanh": ("small_cnn", {}),
    "nokland_cnn": ("nokland_cnn", {}),
    "resnet20": ("resnet20", {}),
    "mlp": ("mlp", {}),
}


@torch.no_grad()
def _images_per_second(model: torch.nn.Module, x: torch.Tensor, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        model(x[i : i + batch]).argmax(-1)
    return len(x) / (time.perf_counter() - start)


def measure(key: str, batches: list[int], images: int, rounds: int) -> dict[str, Any]:
    name, kw = MODELS[key]
    torch.manual_seed(0)
    model = build_model(name, INPUT_SHAPE, NUM_CLASSES, **kw).eval()
    x = torch.randn(images, *INPUT_SHAPE)
    sizes = sorted({*batches, EVAL_BATCH_SIZE})
    for b in sizes:  # warm-up
        _images_per_second(model, x[: 2 * b], b)
    speed: dict[int, list[float]] = {b: [] for b in sizes}
    for r in range(rounds):
        for b in sizes[r % len(sizes) :] + sizes[: r % len(sizes)]:
            speed[b].append(_images_per_second(model, x, b))
    return {
        str(b): {
            "images_per_s": round(statistics.median(v), 1),
            "vs_trainer": round(
                statistics.median(s / t for s, t in zip(v, speed[EVAL_BATCH_SIZE])), 3
            ),
        }
        for b, v in speed.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 64, 128, 256, 500, 1000])
    parser.add_argument("--images", type=int, default=1000, help="images per timed pass")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (as the experiments)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if min(args.rounds, args.images, args.threads, *args.batch_sizes) < 1:
        parser.error("--rounds, --images, --threads and --batch-sizes must be positive")
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "benchmark": "eval_speed",
        "command": command(__file__, argv),
        "config": options(args),
        "machine": environment(),
        "trainer_eval_batch_size": EVAL_BATCH_SIZE,
        "models": {},
    }
    for key in args.models:
        print(f"timing {key} ...", file=sys.stderr, flush=True)
        report["models"][key] = measure(key, args.batch_sizes, args.images, args.rounds)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
