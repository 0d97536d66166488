"""Time one training step (forward + backward + SGD step) per model and rule; print JSON.

    python benchmarks/step_time.py [--rounds 7] [--batch-size 128] [--models ...] [--rules ...]
                                   [--out FILE]

Conv nets are timed in both memory layouts (contiguous NCHW and channels-last), each layout with
its own BP baseline. Every rule of a model is timed in the same run, interleaved round by round
(bp, dfa, ..., bp, dfa, ...) so that drift of a shared machine hits all alike; warm-up steps are
excluded. Reported: the median milliseconds per step, each rule's ratio to ``bp`` (the median over
rounds of the per-round ratio), the floor that counting multiply-adds gives for that ratio
(forward + weight gradients + input gradients where computed + projections, over BP's forward +
weight + input gradients; ``kp`` adds one more weight gradient per learned ``B``, ``dkp`` one
``e^T h`` per learned block), the gap between the two, and the bytes of feedback each rule stores.
The feedback-alignment family (``fa``, ``usf``, ``brsf``, ``frsf``, ``kp``, ``dkp``) is timed in
the same rounds; learned feedback is in the optimiser, as in training. So is module-wise DFA
(``mod_*``: ``scope="module"`` with each model's default modules, inner BP or inner DFA with dense,
sparse or conv feedback), the only DFA that trains ``resnet20``; its floor counts the engine's own
cuts and feedback multiply-adds (``DFAEngine.input_cuts()``, ``feedback_cost()``). A rule the
engine refuses for a model (plain DFA on ``resnet20``'s skip connections, an inner operator over
the size limit) is listed with its reason, untimed.
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
from dfatorch.feedback import make_pattern
from dfatorch.models import build_model, layer_costs, model_stats, training_macs
from dfatorch.train import environment

MODELS = {
    "mlp_3x800": dict(name="mlp_3x800", options={"activation": "tanh"}),
    "small_cnn": dict(name="small_cnn", options={"activation": "relu"}),
    "nokland_cnn": dict(name="nokland_cnn", options={"activation": "tanh"}),
    "resnet20": dict(name="resnet20", options={}),
}
RULES: dict[str, dict[str, Any]] = {
    "bp": {"method": "bp"},
    "dfa_all": {"method": "dfa", "scope": "all"},
    "dfa_fc": {"method": "dfa", "scope": "fc"},
    "bdfa_fc_packed": {"method": "bdfa", "scope": "fc", "storage": "packed"},
    "bdfa_fc_seeded": {"method": "bdfa", "scope": "fc", "storage": "seeded"},
    "bdfa_all_packed": {"method": "bdfa", "scope": "all", "storage": "packed"},
    # the feedback-alignment family, every hidden layer
    "fa_all": {"method": "fa", "scope": "all"},
    "usf_all": {"method": "usf", "scope": "all"},
    "brsf_all": {"method": "brsf", "scope": "all"},
    "frsf_all": {"method": "frsf", "scope": "all"},
    "kp_all": {"method": "kp", "scope": "all"},
    "dkp_all": {"method": "dkp", "scope": "all"},
    # module-wise DFA (the model's default modules)
    "mod_dfa_bp": {"method": "dfa", "scope": "module", "inner": "bp"},
    "mod_dfa_bp_sparse": {"method": "dfa", "scope": "module", "inner": "bp", "init": "sparse",
                          "init_options": {"density": 0.1}, "storage": "sparse"},
    "mod_bdfa_bp_packed": {"method": "bdfa", "scope": "module", "inner": "bp",
                           "storage": "packed"},
    "mod_dfa_dense": {"method": "dfa", "scope": "module", "inner": "dfa"},
    "mod_dfa_conv": {"method": "dfa", "scope": "module", "inner": "dfa", "init": "conv"},
    "mod_dfa_conv_d2": {"method": "dfa", "scope": "module", "inner": "dfa", "init": "conv",
                        "init_options": {"dilation": 2}},
    "mod_dfa_conv_g4": {"method": "dfa", "scope": "module", "inner": "dfa", "init": "conv",
                        "init_options": {"groups": 4}},
    "mod_bdfa_conv": {"method": "bdfa", "scope": "module", "inner": "dfa", "init": "conv"},
}  # fmt: skip
INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10


def make_step(model_key: str, rule: dict[str, Any], x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(0)
    spec = MODELS[model_key]
    model = build_model(spec["name"], INPUT_SHAPE, NUM_CLASSES, **spec["options"]).to(x.device)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        model = model.to(memory_format=torch.channels_last)
    rule = dict(rule)
    init = make_pattern(rule.pop("init", "uniform"), **rule.pop("init_options", {}))
    engine = dfatorch.attach(model, init=init, example_input=x[:2], **rule)
    params = [*model.parameters(), *engine.parameters()]  # learned feedback (kp, dkp) trains too
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return model, engine, step


def learned_macs(engine: dfatorch.DFAEngine, costs: list[Any], num_classes: int) -> int:
    """Multiply-adds per sample of the learned feedback's gradients: a second weight gradient of
    every layer whose ``B`` is learned (``kp``), ``e^T h`` of every learned block (``dkp``)."""
    total = 0
    for i, info in enumerate(engine.layers[:-1]):
        if info.rule.value == "kp":
            total += costs[i + 1].macs
        elif info.rule.value == "dkp":
            total += num_classes * costs[i + 1].in_units
    return total


def measure(
    model_key: str,
    rounds: int,
    warmup: int,
    batch: int,
    channels_last: bool,
    rules_wanted: list[str],
) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *INPUT_SHAPE, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    chosen = {key: RULES[key] for key in ["bp", *rules_wanted] if key in RULES}
    built, refused = {}, {}
    for key, rule in chosen.items():
        try:
            built[key] = make_step(model_key, rule, x, y)
        except ValueError as exc:  # not for this model: say why
            refused[key] = {**RULES[key], "refused": str(exc)}
    chosen = {key: chosen[key] for key in built}
    for _, _, step in built.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {key: [] for key in chosen}
    for _ in range(rounds):
        for key, (_, _, step) in built.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    model, _, _ = built["bp"]
    stats = model_stats(model, INPUT_SHAPE)
    costs = layer_costs(model, INPUT_SHAPE)
    bp_macs = training_macs(costs, [False] * len(costs), NUM_CLASSES)["total"]
    float_bytes = None
    result: dict[str, Any] = {
        "memory_format": "channels_last" if channels_last else "contiguous",
        "params": stats.params,
        "forward_macs_per_sample": stats.macs,
    }
    rules: dict[str, Any] = {}
    for key, (_, engine, _) in built.items():
        # the engine's cuts and feedback multiply-adds (module outputs, inner operators, sparse B)
        projection = None if engine.feedback is None else engine.feedback_cost()["total_macs"]
        macs = training_macs(costs, engine.input_cuts(), NUM_CLASSES, projection=projection)
        macs["total"] += learned_macs(engine, costs, NUM_CLASSES)
        ratios = [t / b for t, b in zip(times[key], times["bp"])]
        fb = engine.storage_bytes()
        if key == "dfa_all":
            float_bytes = fb["pattern"]
        ratio = statistics.median(ratios)
        floor = macs["total"] / bp_macs
        rules[key] = {
            **RULES[key],
            "ms_median": round(1e3 * statistics.median(times[key]), 2),
            "ms_min": round(1e3 * min(times[key]), 2),
            "ratio_to_bp": round(ratio, 3),
            "floor_from_macs": round(floor, 3),
            "gap": round(ratio - floor, 3),
            "feedback_points": engine.feedback_layers,
            "layerwise_feedback": list(engine.layer_feedback),
            "feedback_units": 0 if engine.feedback is None else engine.feedback.total_size,
            "feedback_pattern_bytes": fb["pattern"],
            "feedback_scale_bytes": fb["scales"],
        }
    for entry in rules.values():
        float32 = 4 * NUM_CLASSES * entry["feedback_units"]
        entry["float32_bytes_same_points"] = float32
        share = entry["feedback_pattern_bytes"] / float32 if float32 else None
        entry["bytes_vs_float32"] = None if share is None else round(share, 5)
    result["rules"] = {**rules, **refused}
    result["float32_bytes_dfa_all"] = float_bytes
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--rules", nargs="+", default=list(RULES), choices=list(RULES), help="bp is always timed"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--contiguous-only", action="store_true", help="skip channels-last")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "benchmark": "step_time",
        "command": command(__file__, argv),
        "config": options(args),
        "machine": environment(),
        "models": {},
    }
    before = os.getloadavg()  # a shared machine slows every rule alike; the ratios stay comparable
    for key in args.models:
        # conv nets in both layouts: channels-last is the faster one on CPU, for BP and DFA alike
        layouts = [False, True] if key != "mlp_3x800" and not args.contiguous_only else [False]
        for channels_last in layouts:
            name = f"{key}/{'channels_last' if channels_last else 'contiguous'}"
            print(f"timing {name} ...", file=sys.stderr, flush=True)
            report["models"][name] = measure(
                key, args.rounds, args.warmup, args.batch_size, channels_last, args.rules
            )
    report["machine"]["load_average_1_5_15min"] = {"before": before, "after": os.getloadavg()}
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
