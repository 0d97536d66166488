"""How close the gradients are with activations stored at 8 and 4 bits; print JSON.

    python benchmarks/activation_gradients.py [--batch-size 128] [--out FILE]

One batch of CIFAR-10 training images (normalised, not augmented; random inputs if the data is not
there), each zoo CNN at its initialisation, the weight gradient of every layer with the saved
activations stored at 8 and 4 bits against float32 storage: cosine and relative error
``|g - g_exact| / |g_exact|``, for ``bp`` and the ``bdfa`` hybrid. Batch norm (``vgg_cnn``, and
``small_cnn`` with ``batch_norm``) is measured beside the same net without it: batch norm runs as
the fused op that stores ``x_hat`` (``dfatorch.compression``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import torch.nn.functional as F
from _common import command, emit, options
from torch import nn

import dfatorch
from dfatorch.models import build_model
from dfatorch.train import environment

VARIANTS: dict[str, dict[str, Any]] = {
    "small_cnn/tanh": {"name": "small_cnn", "activation": "tanh"},
    "small_cnn/relu": {"name": "small_cnn", "activation": "relu"},
    "small_cnn/relu+bn": {"name": "small_cnn", "activation": "relu", "batch_norm": True},
    "nokland_cnn/tanh": {"name": "nokland_cnn"},
    "vgg_cnn/relu+bn": {"name": "vgg_cnn"},
    "vgg_cnn/relu": {"name": "vgg_cnn", "batch_norm": False},
}
RULES = {"bp": {"method": "bp"}, "bdfa": {"method": "bdfa", "scope": "fc", "storage": "packed"}}


def batch(size: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    try:
        from dfatorch.data import load_dataset

        splits = load_dataset("cifar10")
        x = splits.train.images[:size].float() / 255
        x = (x - torch.as_tensor(splits.mean).view(1, -1, 1, 1)) / torch.as_tensor(splits.std).view(
            1, -1, 1, 1
        )
        return x, splits.train.labels[:size], "cifar10 train[:batch]"
    except Exception as error:  # no data here: random inputs, said in the output
        print(f"CIFAR-10 unavailable ({error}); random inputs", file=sys.stderr)
        g = torch.Generator().manual_seed(0)
        return torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,)), "random"


def grads(model: nn.Module, x, y, bits: int) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    if bits == 32:
        F.cross_entropy(model(x), y).backward()
    else:
        with dfatorch.compressed_activations(bits):
            F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith("weight")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, y, source = batch(args.batch_size)
    report: dict[str, Any] = {
        "benchmark": "activation_gradients",
        "command": command(__file__, argv),
        "config": options(args),
        "inputs": source,
        "machine": environment(),
        "models": {},
    }
    for key, spec in VARIANTS.items():
        model_options = {k: v for k, v in spec.items() if k != "name"}
        for rule, attach in RULES.items():
            print(f"{key} {rule}", file=sys.stderr, flush=True)
            torch.manual_seed(0)
            model = build_model(spec["name"], (3, 32, 32), 10, **model_options)
            dfatorch.attach(model, example_input=x[:2], seed=0, **attach)
            exact = grads(model, x, y, 32)
            entry: dict[str, Any] = {}
            for bits in (8, 4):
                approx = grads(model, x, y, bits)
                entry[str(bits)] = {
                    name: {
                        "cosine": round(
                            F.cosine_similarity(g.flatten(), approx[name].flatten(), 0).item(), 5
                        ),
                        "relative_error": round(
                            ((approx[name] - g).norm() / g.norm().clamp(min=1e-30)).item(), 5
                        ),
                    }
                    for name, g in exact.items()
                }
                cosines = [v["cosine"] for v in entry[str(bits)].values()]
                entry[f"min_cosine_{bits}"] = min(cosines)
            report["models"].setdefault(key, {})[rule] = entry
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
