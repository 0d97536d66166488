"""The peer column of issue 21: the rules biotorch 0.0.16 shares with dfatorch, on the same model.

    pip install --no-deps biotorch==0.0.16
    python benchmarks/biotorch_peer.py [--rules bp fa usf brsf frsf dfa] [--model small_cnn]
                                       [--rounds 7] [--batch-size 128] [--threads 1]
                                       [--no-check] [--no-time] [--biotorch-path DIR] [--out FILE]
    python benchmarks/biotorch_peer.py --train [--rules ...] [--seeds 0 1 2] [--runs DIR]
                                       [--epochs N] [--fraction F] [--out FILE]

The model is ``small_cnn`` (tanh; conv32-conv64-conv64 with 2x2 max-pools, fc256-fc256-fc10),
every hidden layer under the rule (``scope="all"``); ``--model resnet20`` (ReLU, batch norm, skip
connections: no ``dfa``, which dfatorch refuses across a skip) or ``nokland_cnn`` instead, and
with ``--train`` the model of ``--experiment`` (``fa_family_resnet20.toml`` with its
``--summary``). On ``resnet20`` the ``usf`` check runs with biotorch's ``init="kaiming"`` only:
with Xavier's scale the gradients differ by a product over the paths above a layer, not one
factor. biotorch's side is ``BioModule(model, mode)``
with ``copy_weights=True``: the same weights, its layers swapped in. Only
``biotorch.module.biomodule`` (and the layer and autograd modules it imports) is loaded: nothing
of biotorch's that imports torchvision, which the package lists as a dependency but these code
paths never use, so the ``--no-deps`` install works with this torch. ``--biotorch-path DIR`` puts
``DIR`` first on ``sys.path`` (for ``pip install --no-deps --target DIR biotorch==0.0.16``).

1. **Gradient agreement** (default; ``--no-check`` skips it): one float64 batch through both
   libraries, same weights, same feedback; per layer ``max|g_biotorch - g_dfatorch| /
   max|g_dfatorch|`` of the weight and bias gradients. Made equal: ``fa``, ``frsf``: dfatorch's
   ``B`` (``frsf``: its magnitude ``s |P|``), read from the engine's raw buffers, is copied into
   biotorch's ``weight_backward``. ``brsf``: both draw ``|B|`` anew every step, from different
   generators (biotorch: torch's global RNG), so dfatorch's draw of the step is replaced by the
   one biotorch made in its forward pass (the layer's ``_draw`` overridden on the instance); each
   library forms ``B = |draw| o sign(W)`` with its own code. ``usf``: nothing random; run with
   biotorch's default ``init="xavier"`` (scale ``sqrt(2/(fan_in+fan_out))``, not dfatorch's
   ``1/sqrt(3 fan_in)``: the gradients must differ by the product of the per-layer ratios above
   each layer, which is checked) and with ``init="kaiming"`` (biotorch's scale is then
   dfatorch's). ``dfa``: biotorch's conv DFA sends the output error, repeated over the layer's
   output positions, back through a transposed convolution with a ``(C, in, k, k)`` kernel; the
   dense ``(C, in*H*W)`` matrix that amounts to is built from its kernels and copied into
   dfatorch's dense feedback. Also reported: the RMS of each library's own default feedback
   (biotorch Xavier-uniform, dfatorch ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``).
   Found on the way (biotorch 0.0.16): its ``brsf`` layers raise ``NameError`` with
   ``init != "xavier"`` (``init.kaiming_uniform_`` without the import); its conv DFA fails on
   grouped convolutions; its DFA computes ``W^T delta`` and then replaces it (a hook), and that
   hook (``register_backward_hook``) is deprecated by torch, which warns but still runs it.
2. **Step time** (default; ``--no-time`` skips it): one training step (forward + backward + SGD
   step, float32, batch 128) of every rule in dfatorch and in biotorch, interleaved round by round
   with a BP baseline as in ``step_time.py`` (warm-up excluded; ratio = median over rounds of the
   per-round ratio to ``bp``; ``biotorch_over_dfatorch`` likewise per rule).
3. **Accuracy** (``--train``): biotorch's converted model trained by dfatorch's own loop
   (:func:`dfatorch.train.train` with ``model_transform``, method ``bp`` so that dfatorch attaches
   nothing) with the cells of ``--experiment`` (default ``experiments/fa_family.toml``: 10% of
   CIFAR-10 class-stratified, augmentation, SGD momentum 0.9, weight decay 1e-4, batch 64, 20
   epochs), the learning rate its search chose per rule (``--summary``, default
   ``experiments/results/fa-family/summary.json``), seeds 0, 1, 2. Finished runs in ``--runs``
   are read (refused if trained with another configuration than the experiment now gives, for
   example before its search moved a rate), unfinished ones resumed. Each run folder gets a
   ``peer.json`` (its ``config.json`` says ``method: bp``: the rule is in the converted layers).
   The JSON lists every run's final test accuracy and, per rule, the mean beside dfatorch's from
   the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from _common import command, emit, options
from torch import Tensor, nn

import dfatorch
from dfatorch._io import portable_path
from dfatorch.callbacks import Callback, TrainingDiverged, TrainState
from dfatorch.experiment import DIVERGED, NEUTRAL, load_experiment
from dfatorch.models import build_model
from dfatorch.rundir import RunDir
from dfatorch.train import environment, is_finished, read_metrics, summarize, train

RULES = ["bp", "fa", "usf", "brsf", "frsf", "dfa"]
INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
LAYERS = (nn.Linear, nn.Conv2d)
#: models without skip connections: each layer's error comes from the next layer only
CHAINS = ("small_cnn", "nokland_cnn")
PARAMS = ("weight", "bias")
ROOT = Path(__file__).resolve().parents[1]
#: float64 agreement is to rounding (~1e-15), except where dfatorch's feedback scale ``s`` enters
#: (usf): it is a float32 buffer, rounded by up to 2^-24 per layer (~5e-8 over small_cnn)
TOLERANCE = 1e-6


def load_biotorch(path: str | None) -> ModuleType:
    """``biotorch.module.biomodule``, or exit with one line saying how to install it."""
    if path:
        sys.path.insert(0, str(Path(path).resolve()))
    try:
        from biotorch.module import biomodule
    except ImportError as exc:
        raise SystemExit(
            f"biotorch_peer: biotorch is not importable ({exc}); install it with "
            "`pip install --no-deps biotorch==0.0.16` (or pass --biotorch-path DIR)"
        ) from None
    return biomodule


def biotorch_info(bt: ModuleType) -> dict[str, Any]:
    from importlib import metadata

    try:
        version = metadata.version("biotorch")
    except metadata.PackageNotFoundError:
        version = None
    return {
        "version": version,
        "modules_loaded": sorted(m for m in sys.modules if m.startswith("biotorch")),
        "torchvision_loaded": "torchvision" in sys.modules,
    }


# -- the two sides -----------------------------------------------------------------------------


class Peer(nn.Module):
    """biotorch's ``BioModule`` as a plain ``model(x)``. In DFA mode its training forward pass
    needs the targets and the loss (it computes ``e = dLoss/dy`` there): set :attr:`targets`
    before each training forward (:class:`FeedTargets` does in the training loop)."""

    def __init__(self, bio: nn.Module) -> None:
        super().__init__()
        self.bio = bio
        self.targets: Tensor | None = None

    @property
    def layers(self) -> list[tuple[str, nn.Module]]:
        return weight_layers(self.bio.module)

    def forward(self, x: Tensor) -> Tensor:
        if self.bio.mode == "dfa" and self.training:
            return self.bio(x, self.targets, F.cross_entropy)
        return self.bio(x)


class FeedTargets(Callback):
    """Hands each batch's labels to :class:`Peer` (biotorch's DFA needs them in forward)."""

    def on_batch_start(self, state: TrainState) -> None:
        state.model.targets = state.y


def to_biotorch(bt: ModuleType, model: nn.Module, rule: str, *, init: str = "xavier") -> Peer:
    """``model`` with its layers swapped for biotorch's (in place; the same weight tensors).
    ``init`` is biotorch's layer option: ``xavier`` (its default) or ``kaiming``."""
    if rule == "brsf" and init != "xavier":
        # biotorch/layers/fa_constructor/{linear,conv}.py call init.kaiming_uniform_ without
        # importing init: every forward pass would raise NameError
        raise ValueError("biotorch 0.0.16's brsf layers fail with init != 'xavier' (NameError)")
    mode = "backpropagation" if rule == "bp" else rule
    layer_config = {
        "type": mode,
        "options": {"constrain_weights": False, "gradient_clip": False, "init": init},
    }
    with contextlib.redirect_stdout(io.StringIO()):  # its converter prints a summary
        bio = bt.BioModule(
            model,
            mode=mode,
            copy_weights=True,
            layer_config=layer_config,
            output_dim=NUM_CLASSES if rule == "dfa" else None,
        )
    return Peer(bio)


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LAYERS)]


#: each model's own hidden activation, as the experiments use them
ACTIVATION = {"small_cnn": "tanh", "nokland_cnn": "tanh", "resnet20": "relu"}


def base_model(model: str = "small_cnn", seed: int = 0) -> nn.Module:
    """``model`` for CIFAR-10 with its own activation (:data:`ACTIVATION`)."""
    torch.manual_seed(seed)
    return build_model(model, INPUT_SHAPE, NUM_CLASSES, activation=ACTIVATION[model])


def describe(model: str, activation: str | None = None) -> str:
    """The ``model`` line of the JSON, e.g. ``small_cnn (tanh), scope=all``.

    ``activation`` unset: the model's own (:data:`ACTIVATION`), as an experiment file that names
    none builds it.
    """
    return f"{model} ({activation or ACTIVATION.get(model, 'its own activation')}), scope=all"


def fans(weight: Tensor) -> tuple[int, int]:
    receptive = weight[0, 0].numel()
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def rms(t: Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


# -- 1. gradient agreement ---------------------------------------------------------------------


def dense_dfa_feedback(layer: nn.Module, input_shape: tuple[int, ...], classes: int) -> Tensor:
    """biotorch's DFA feedback into ``layer``'s input as a dense ``(C, d)`` matrix: its hook
    returns ``e @ B`` (Linear) or ``conv2d_input(e repeated over the layer's output positions,
    B)`` (Conv2d, ``B`` of shape ``(C, in, k, k)``); both are linear in ``e``, so ``e = I``
    gives the matrix."""
    b = layer.weight_backward.detach()
    if isinstance(layer, nn.Linear):
        return b.clone()
    with torch.no_grad():
        out = layer._conv_forward(torch.zeros(1, *input_shape, dtype=b.dtype), layer.weight, None)
    eye = torch.eye(classes, dtype=b.dtype).view(classes, classes, 1, 1)
    grad_out = eye.expand(classes, classes, *out.shape[-2:])
    cols = torch.nn.grad.conv2d_input(
        (classes, *input_shape),
        b,
        grad_out,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
    )
    return cols.reshape(classes, -1)


def input_shapes(layers: list[tuple[str, nn.Module]], run: Callable[[], Any]) -> list[tuple]:
    shapes: list[tuple] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape[1:])))
        for _, m in layers
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return shapes


def gradients(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def gradient_check(
    bt: ModuleType,
    rule: str,
    *,
    model: str = "small_cnn",
    init: str = "xavier",
    batch: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """One float64 batch through dfatorch's ``rule`` and biotorch's, same weights and feedback."""
    base = base_model(model, seed).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, *INPUT_SHAPE, generator=g, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)

    ours = copy.deepcopy(base)
    engine = dfatorch.attach(ours, rule, scope="all", seed=seed, example_input=x[:2]).double()
    torch.manual_seed(seed + 2)  # biotorch draws its feedback from the global RNG
    theirs = to_biotorch(bt, copy.deepcopy(base), rule, init=init).double()
    ours_layers, their_layers = weight_layers(ours), theirs.layers
    assert [n for n, _ in ours_layers] == [n for n, _ in their_layers]
    hidden = [n for n, _ in ours_layers[:-1]]
    shapes = input_shapes(their_layers, lambda: theirs.bio.module(x[:1]))
    out: dict[str, Any] = {"rule": rule, "biotorch_init": init}

    # each library's own default feedback, before anything is copied: RMS per layer
    if rule in ("fa", "frsf"):
        out["default_feedback_rms"] = {
            name: {
                "dfatorch": rms(engine.layer_feedback[name].pattern)
                * engine.layer_feedback[name].scales.item(),
                "biotorch": rms(their_layers[i + 1][1].weight_backward),
            }
            for i, name in enumerate(hidden)
        }
    if rule == "dfa":
        fm = engine.feedback
        blocks = fm.full_pattern(torch.float64).split(fm.sizes, 1)
        dense = [
            dense_dfa_feedback(their_layers[i + 1][1], shapes[i + 1], NUM_CLASSES)
            for i in range(len(hidden))
        ]
        out["default_feedback_rms"] = {
            name: {
                "dfatorch": rms(blocks[i]) * float(fm.scales[i]),
                "biotorch": rms(dense[i]),
                "biotorch_kernel": rms(their_layers[i + 1][1].weight_backward),
            }
            for i, name in enumerate(fm.names)
        }

    # the same feedback on both sides
    with torch.no_grad():
        if rule in ("fa", "frsf"):  # fa: B = s P; frsf: |B| = s |P| (the sign comes from W)
            what = "B = s * P" if rule == "fa" else "|B| = s |P|"
            out["feedback"] = f"dfatorch's {what} (raw buffers) copied into biotorch"
            for i, name in enumerate(hidden):
                fb = engine.layer_feedback[name]
                b = fb.pattern.double().view(fb.shape) * fb.scales.double()
                their_layers[i + 1][1].weight_backward.copy_(b)
        elif rule == "dfa":
            out["feedback"] = (
                "biotorch's DFA kernels (C, in, k, k), as the dense (C, in*H*W) matrices they "
                "amount to, copied into dfatorch's dense feedback"
            )
            fm = engine.feedback
            assert fm.names == hidden and fm.storage == "dense"
            parts = [d / float(s) for d, s in zip(dense, fm.scales)]
            fm.pattern.copy_(torch.cat(parts, 1).to(fm.pattern.dtype))
        elif rule == "usf":
            out["feedback"] = "nothing to copy: B = s sign(W) on both sides"
        elif rule == "brsf":
            out["feedback"] = "this step's draw |B| of biotorch replaces dfatorch's draw"
        else:
            out["feedback"] = "none (both back-propagate)"

    theirs.targets = y
    F.cross_entropy(theirs(x), y).backward()
    if rule == "brsf":  # biotorch drew |B| in its forward pass and kept B in weight_backward
        for i, name in enumerate(hidden):
            fb = engine.layer_feedback[name]
            drawn = their_layers[i + 1][1].weight_backward.detach().abs() / fb.scales.double()
            fb._draw = lambda advance, d=drawn: d  # type: ignore[method-assign]
    F.cross_entropy(ours(x), y).backward()
    got_ours, got_theirs = gradients(ours), gradients(theirs.bio.module)
    assert got_ours.keys() == got_theirs.keys()

    # usf with Xavier's scale: biotorch's delta at layer l is dfatorch's times the product of
    # r_k = s_biotorch / s_dfatorch over the layers k above l (f' and the forward are the same)
    factor = {n: 1.0 for n, _ in ours_layers}
    if rule == "usf" and init == "xavier":
        ratios = {}
        for name, layer in ours_layers:
            fan_in, fan_out = fans(layer.weight)
            ratios[name] = math.sqrt(2.0 / (fan_in + fan_out)) * math.sqrt(3.0 * fan_in)
        running = 1.0
        for i in range(len(ours_layers) - 1, -1, -1):
            factor[ours_layers[i][0]] = running
            running *= ratios[ours_layers[i][0]]
        out["scale_ratio_per_layer"] = {k: round(v, 4) for k, v in ratios.items()}
        out["predicted_gradient_ratio"] = {k: round(v, 4) for k, v in factor.items()}

    layers: dict[str, dict[str, float]] = {}
    rescaled = 0.0
    for key, mine in got_ours.items():
        layer, kind = key.rsplit(".", 1)
        theirs_g = got_theirs[key]
        scale = float(mine.abs().max())
        layers.setdefault(layer, {})[kind] = float((theirs_g - mine).abs().max()) / scale
        if factor.get(layer, 1.0) != 1.0:  # batch norm's parameters: 1 (only usf on a chain)
            layers[layer][f"{kind}_ratio_median"] = float((theirs_g / mine).median())
            rescaled = max(rescaled, float((theirs_g / factor[layer] - mine).abs().max()) / scale)
    # resnet20's convolutions have no bias
    out["max_rel_diff"] = max(v for d in layers.values() for k, v in d.items() if k in PARAMS)
    out["layers"] = layers
    out["agree"] = out["max_rel_diff"] <= TOLERANCE
    if rule == "usf" and init == "xavier":
        out["rescaled_max_rel_diff"] = rescaled
        out["agree_after_rescaling"] = rescaled <= TOLERANCE
    out["must_agree"] = not (rule == "usf" and init == "xavier")
    out["why"] = WHY[(rule, init if rule == "usf" else "xavier")]
    return out


WHY = {
    ("bp", "xavier"): "both back-propagate (biotorch's 'backpropagation' layers are plain layers)",
    ("fa", "xavier"): "same equation: delta_l = (delta_{l+1} B_{l+1}) f'(a_l), conv B of the "
    "kernel's shape in both; with B copied the gradients agree. Defaults differ: biotorch draws B "
    "Xavier-uniform, dfatorch U(+-1/sqrt(fan_in)) (see default_feedback_rms)",
    ("frsf", "xavier"): "same equation: B = |B0| o sign(W) with |B0| fixed; with |B0| copied the "
    "gradients agree. Defaults differ as for fa (Xavier-uniform vs U(+-1/sqrt(fan_in)))",
    ("brsf", "xavier"): "same equation: B = |B_t| o sign(W), |B_t| drawn again every step; with "
    "this step's draw shared the gradients agree. The draws come from different generators "
    "(biotorch: torch's global RNG, Xavier-uniform; dfatorch: its own seeded generator, "
    "U(+-1/sqrt(fan_in))), so runs differ step by step",
    ("usf", "xavier"): "same sign structure, different scale: biotorch's default init='xavier' "
    "sets s = sqrt(2/(fan_in+fan_out)), dfatorch s = 1/sqrt(3 fan_in) (biotorch's s for its "
    "'kaiming' init); the gradient of layer l then differs by the product of the ratios of the "
    "layers above it (predicted_gradient_ratio), and agrees after dividing by it",
    ("usf", "kaiming"): "same equation and scale: B = sign(W) / sqrt(3 fan_in)",
    ("dfa", "xavier"): "same equation at the same points (the input of the next layer): "
    "delta_l = (e B_l) f'(a_l), with B_l biotorch's effective matrix. Not the same feedback "
    "by default: biotorch's conv DFA is a transposed convolution of the error repeated over "
    "positions with a (C, in, k, k) kernel, a matrix that is the same at every interior "
    "position (rank <= C per channel map, spatially constant), while dfatorch's B_l is dense "
    "U(+-1/sqrt(d_l)) over all C*H*W units; biotorch also computes and discards W^T delta",
}


def run_checks(bt: ModuleType, rules: list[str], model: str = "small_cnn") -> dict[str, Any]:
    checks: dict[str, Any] = {}
    for rule in rules:
        print(f"gradient check {rule} ...", file=sys.stderr, flush=True)
        # usf with Xavier's scale differs by a product over the layers above: a chain's only
        if rule == "usf" and model in CHAINS:
            checks["usf"] = gradient_check(bt, "usf", model=model, init="xavier")
        if rule == "usf":
            checks["usf_kaiming"] = gradient_check(bt, "usf", model=model, init="kaiming")
        else:
            checks[rule] = gradient_check(bt, rule, model=model)
    return checks


# -- 2. step time ------------------------------------------------------------------------------


def make_steps(
    bt: ModuleType, rules: list[str], x: Tensor, y: Tensor, model_name: str = "small_cnn"
) -> dict[str, Callable[[], None]]:
    steps: dict[str, Callable[[], None]] = {}

    def sgd_step(model: nn.Module, params: list[nn.Parameter]) -> Callable[[], None]:
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            if isinstance(model, Peer):
                model.targets = y
            F.cross_entropy(model(x), y).backward()
            opt.step()

        return step

    for rule in ["bp", *[r for r in rules if r != "bp"]]:
        model = base_model(model_name)
        engine = dfatorch.attach(model, rule, scope="all", example_input=x[:2])
        steps[rule if rule == "bp" else f"dfatorch/{rule}"] = sgd_step(
            model, [*model.parameters(), *engine.parameters()]
        )
        if rule != "bp":
            peer = to_biotorch(bt, base_model(model_name), rule)
            steps[f"biotorch/{rule}"] = sgd_step(peer, list(peer.parameters()))
    return steps


def step_time(
    bt: ModuleType,
    rules: list[str],
    rounds: int,
    warmup: int,
    batch: int,
    model: str = "small_cnn",
) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *INPUT_SHAPE, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    steps = make_steps(bt, rules, x, y, model)
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {key: [] for key in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    entries: dict[str, Any] = {}
    for key, ts in times.items():
        entries[key] = {
            "ms_median": round(1e3 * statistics.median(ts), 2),
            "ms_min": round(1e3 * min(ts), 2),
            "ratio_to_bp": round(statistics.median(t / b for t, b in zip(ts, times["bp"])), 3),
        }
    peers = {
        rule: round(
            statistics.median(
                t / o for t, o in zip(times[f"biotorch/{rule}"], times[f"dfatorch/{rule}"])
            ),
            3,
        )
        for rule in rules
        if rule != "bp"
    }
    return {"entries": entries, "biotorch_over_dfatorch": peers}


# -- 3. accuracy -------------------------------------------------------------------------------


def train_peers(bt: ModuleType, args: argparse.Namespace) -> dict[str, Any]:
    """biotorch's converted model through dfatorch's loop, the cells of ``--experiment``."""
    exp = load_experiment(args.experiment)
    summary = json.loads(Path(args.summary).read_text())
    chosen = summary["chosen"]
    overrides: dict[str, Any] = {"method": "bp"}  # dfatorch attaches nothing: biotorch's layers
    for key in ("epochs", "fraction", "data_dir"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    runs_root = Path(args.runs)
    runs: list[dict[str, Any]] = []
    for cell in exp.cells(chosen):
        rule, seed = cell.labels["method"], cell.config.seed
        if rule not in args.rules or seed not in args.seeds:
            continue
        config = type(cell.config).from_dict({**cell.config.to_dict(), **overrides})
        run_dir = runs_root / cell.key
        marker = {
            "library": "biotorch",
            "version": biotorch_info(bt)["version"],
            "mode": rule,
            "init": "xavier",
            "cell": cell.key,
            "note": "config.json says method bp: the rule is in biotorch's converted layers",
        }
        peer_file = run_dir / "peer.json"
        if peer_file.exists() and json.loads(peer_file.read_text()) != marker:
            raise SystemExit(f"biotorch_peer: {run_dir} holds another run ({peer_file})")
        saved = RunDir(run_dir)
        # a finished run at an old learning rate (the search moved it) must not pass for a new one
        if saved.config.exists():
            before = type(config).from_dict(saved.read_config()).to_dict()
            diff = {
                k: (v, before[k])
                for k, v in config.to_dict().items()
                if k not in NEUTRAL and before[k] != v
            }
            if diff:
                raise SystemExit(
                    f"biotorch_peer: {run_dir} was trained with another configuration than "
                    f"{portable_path(str(args.experiment))} now gives (now, then): {diff}; move "
                    "it away to retrain"
                )
        diverged_file = run_dir / DIVERGED
        diverged = (
            json.loads(diverged_file.read_text())["message"] if diverged_file.exists() else None
        )
        if diverged is not None or is_finished(run_dir):
            history = read_metrics(run_dir)
        else:
            print(f"training biotorch/{cell.key} ...", file=sys.stderr, flush=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            peer_file.write_text(json.dumps(marker, indent=2) + "\n")
            try:
                history = train(
                    config,
                    run_dir,
                    resume=True,
                    progress=not args.no_progress,
                    model_transform=partial(_convert, bt, rule),
                    callbacks=[FeedTargets()] if rule == "dfa" else [],
                ).history
            except TrainingDiverged as exc:  # a result at this learning rate, as in experiments
                diverged = str(exc)
                diverged_file.write_text(json.dumps({"message": diverged}, indent=2) + "\n")
                history = read_metrics(run_dir)
        summary_of_run = {k: v for k, v in summarize(history).items() if k != "final_bpc"}
        if diverged is not None:  # its last evaluation is not a final accuracy
            summary_of_run.update(final_acc=None, best_acc=None, diverged=diverged)
        runs.append(
            {"rule": rule, "seed": seed, "lr": config.lr, "run": cell.key, **summary_of_run}
        )
    theirs = {row["method"]: row for row in summary.get("rows", [])}
    table: dict[str, Any] = {}
    for rule in args.rules:
        mine = [r for r in runs if r["rule"] == rule]
        accs = [r["final_acc"] for r in mine if r.get("final_acc") is not None]
        failed = sum(1 for r in mine if r.get("diverged"))
        if not accs and not failed:
            continue
        ref = theirs.get(rule, {})
        table[rule] = {
            "lr": chosen.get(rule, {}).get("lr"),
            "biotorch_final_acc_mean": statistics.mean(accs) if accs else None,
            "biotorch_final_acc_std": statistics.stdev(accs) if len(accs) > 1 else None,
            "biotorch_seeds": len(accs),
            "biotorch_diverged": failed,
            "dfatorch_final_acc_mean": ref.get("final_acc_mean"),
            "dfatorch_final_acc_std": ref.get("final_acc_std"),
            "dfatorch_seeds": ref.get("seeds"),
            # per run, for the report's interval of the difference
            "biotorch_final_acc_runs": accs,
            "dfatorch_final_acc_runs": [
                r["final_acc"] for r in ref.get("runs", []) if r.get("final_acc") is not None
            ],
        }
    return {
        "budget_from": portable_path(str(args.experiment)),
        # the dfatorch columns are fa-family's: comparable only without overrides
        "budget_overridden": {k: v for k, v in overrides.items() if k != "method"},
        "runs_root": portable_path(str(runs_root)),
        "runs": runs,
        "by_rule": table,
    }


def _convert(bt: ModuleType, rule: str, model: nn.Module) -> nn.Module:
    return to_biotorch(bt, model, rule)


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rules", nargs="+", default=RULES, choices=RULES)
    parser.add_argument("--biotorch-path", help="put this folder first on sys.path")
    parser.add_argument(
        "--model",
        choices=["small_cnn", "nokland_cnn", "resnet20"],
        help="checks and step time: the model (default small_cnn); --train: the experiment's",
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's own)")
    parser.add_argument("--no-check", action="store_true", help="skip the gradient check")
    parser.add_argument("--no-time", action="store_true", help="skip the step time")
    parser.add_argument("--train", action="store_true", help="train instead (accuracy)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--runs", default="runs/biotorch-peer", help="--train: run folders")
    parser.add_argument("--experiment", default=str(ROOT / "experiments" / "fa_family.toml"))
    parser.add_argument(
        "--summary", default=str(ROOT / "experiments" / "results" / "fa-family" / "summary.json")
    )
    parser.add_argument("--epochs", type=int, help="--train: override the budget's epochs")
    parser.add_argument("--fraction", type=float, help="--train: override the data fraction")
    parser.add_argument("--data-dir", help="--train: dataset folder (default: dfatorch's)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    bt = load_biotorch(args.biotorch_path)
    model = args.model or "small_cnn"
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "benchmark": "biotorch_peer",
        "command": command(__file__, argv),
        "config": options(args),
        "machine": environment(),
        "biotorch": biotorch_info(bt),
        "model": describe(model),
    }
    if args.train:
        base = load_experiment(args.experiment).base
        if args.model not in (None, base["model"]):
            parser.error(f"--model {args.model}: --train trains {args.experiment}'s model")
        report["model"] = describe(base["model"], base.get("activation"))
        report["accuracy"] = train_peers(bt, args)
    else:
        if args.model not in (None, *CHAINS) and "dfa" in args.rules:
            parser.error(f"--model {args.model} has skip connections: dfa refuses it, leave it out")
        if not args.no_check:
            report["gradient_check"] = run_checks(bt, args.rules, model)
        if not args.no_time:
            print("timing ...", file=sys.stderr, flush=True)
            before = os.getloadavg()  # a shared machine slows every rule; ratios stay comparable
            report["step_time"] = step_time(
                bt, args.rules, args.rounds, args.warmup, args.batch_size, model
            )
            report["step_time"]["load_average_1_5_15min"] = {
                "before": before,
                "after": os.getloadavg(),
            }
    report["biotorch"]["torchvision_loaded"] = "torchvision" in sys.modules
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
