"""Feedback bytes and projection multiply-adds per method and structure, against dense DFA; JSON.

    python benchmarks/feedback_cost.py [--models ...] [--out FILE]

No training: each variant is attached to the zoo model (CIFAR shape, 10 classes), its feedback
built from one forward pass on a zero batch, and the numbers are the engine's own accounting
(``DFAEngine.feedback_cost()``): the bytes of the direct ``B`` as its storage keeps it, of the
inner operators of module-wise DFA and of the scales; the multiply-adds per sample of the
projection ``e @ B`` (``C * D`` dense, the non-zeros for ``storage="sparse"``) and of the inner
operators. The reference is dense DFA (``dfa``, every hidden layer, ``uniform`` float32 ``B``):
attached where plain DFA can train the model, and counted from the layers' inputs
(``C * sum d_l``) for ``resnet20``, whose skip connections plain DFA refuses. ``training_vs_bp``
is the multiply-add floor of a whole training step over BP's (``models.training_macs``, with the
engine's cuts and its projection count). A variant the engine refuses (an inner operator over
the size limit) is recorded with its one-line reason.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from _common import command, emit, options

import dfatorch
from dfatorch.feedback import make_pattern
from dfatorch.models import build_model, layer_costs, training_macs
from dfatorch.train import environment

INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
MODELS = {"small_cnn": {}, "nokland_cnn": {}, "resnet20": {}}
ONE = 1 / NUM_CLASSES  # Crafton et al.'s one connection per unit

#: label -> attach() options; init is (name, options)
VARIANTS: dict[str, dict[str, Any]] = {
    "dfa dense (reference)": dict(method="dfa", scope="all"),
    "dfa seeded": dict(method="dfa", scope="all", storage="seeded"),
    "bdfa packed": dict(method="bdfa", scope="all", storage="packed"),
    "dfa sparse 1/K": dict(method="dfa", scope="all", init=("sparse", {"density": ONE}),
                           storage="sparse"),
    "dfa sparse 0.3": dict(method="dfa", scope="all", init=("sparse", {"density": 0.3}),
                           storage="sparse"),
    "module inner=bp, dense": dict(method="dfa", scope="module", inner="bp"),
    "module inner=bp, sparse 1/K": dict(method="dfa", scope="module", inner="bp",
                                        init=("sparse", {"density": ONE}), storage="sparse"),
    "module inner=bp, sparse 0.3": dict(method="dfa", scope="module", inner="bp",
                                        init=("sparse", {"density": 0.3}), storage="sparse"),
    "module inner=bp, bdfa packed": dict(method="bdfa", scope="module", inner="bp",
                                         storage="packed"),
    "module inner=dfa, dense": dict(method="dfa", scope="module", inner="dfa"),
    "module inner=dfa, sparse 1/K": dict(method="dfa", scope="module", inner="dfa",
                                         init=("sparse", {"density": ONE}), storage="sparse"),
    "module inner=dfa, conv k3": dict(method="dfa", scope="module", inner="dfa",
                                      init=("conv", {})),
    "module inner=dfa, conv k3 d2": dict(method="dfa", scope="module", inner="dfa",
                                         init=("conv", {"dilation": 2})),
    "module inner=dfa, conv k3 g4": dict(method="dfa", scope="module", inner="dfa",
                                         init=("conv", {"groups": 4})),
    "module inner=dfa, conv k1": dict(method="dfa", scope="module", inner="dfa",
                                      init=("conv", {"kernel": 1})),
    "module inner=dfa, conv k3, bdfa packed": dict(method="bdfa", scope="module", inner="dfa",
                                                   init=("conv", {}), storage="packed"),
}  # fmt: skip


def _structure(spec: Any) -> Any:
    if spec is None:
        return "uniform"
    name, opts = spec
    return make_pattern(name, **opts)


def measure(model_key: str) -> dict[str, Any]:
    x = torch.zeros(2, *INPUT_SHAPE)
    costs = layer_costs(build_model(model_key, INPUT_SHAPE, NUM_CLASSES), INPUT_SHAPE)
    bp_macs = training_macs(costs, [False] * len(costs), NUM_CLASSES)["total"]
    variants: dict[str, Any] = {}
    for label, spec in VARIANTS.items():
        spec = dict(spec)
        init = _structure(spec.pop("init", None))
        torch.manual_seed(0)
        model = build_model(model_key, INPUT_SHAPE, NUM_CLASSES)
        entry: dict[str, Any] = {
            **spec,
            "init": init if isinstance(init, str) else init.name,
            "init_options": {} if isinstance(init, str) else dict(init.options),
        }
        try:
            engine = dfatorch.attach(model, init=init, example_input=x, **spec)
        except ValueError as exc:
            variants[label] = {**entry, "refused": str(exc)}
            continue
        cost = engine.feedback_cost()
        projection = cost["total_macs"]
        macs = training_macs(costs, engine.input_cuts(), NUM_CLASSES, projection=projection)
        variants[label] = {
            **entry,
            **cost,
            "feedback_points": engine.feedback_layers,
            "training_vs_bp": round(macs["total"] / bp_macs, 4),
        }
    reference = variants["dfa dense (reference)"]
    if "refused" in reference:  # plain DFA cannot train it: count what it would hold
        units = sum(c.in_units for c in costs[1:])
        cut = [False] + [True] * (len(costs) - 1)
        reference = {
            "counted": "from the layers' inputs: plain DFA refuses this model",
            "units": units,
            "total_bytes": 4 * NUM_CLASSES * units,
            "total_macs": NUM_CLASSES * units,
            "training_vs_bp": round(training_macs(costs, cut, NUM_CLASSES)["total"] / bp_macs, 4),
        }
    for entry in variants.values():
        if "refused" not in entry:
            entry["bytes_vs_dense_dfa"] = round(entry["total_bytes"] / reference["total_bytes"], 5)
            entry["macs_vs_dense_dfa"] = round(entry["total_macs"] / reference["total_macs"], 5)
    return {
        "params": sum(
            p.numel() for p in build_model(model_key, INPUT_SHAPE, NUM_CLASSES).parameters()
        ),
        "bp_training_macs_per_sample": bp_macs,
        "reference": reference,
        "variants": variants,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        "benchmark": "feedback_cost",
        "command": command(__file__, argv),
        "config": options(args),
        "machine": environment(),
        "num_classes": NUM_CLASSES,
        "input_shape": list(INPUT_SHAPE),
        "models": {},
    }
    for key in args.models:
        print(f"counting {key} ...", file=sys.stderr, flush=True)
        report["models"][key] = measure(key)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
