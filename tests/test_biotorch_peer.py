"""biotorch 0.0.16 as the peer of the feedback-alignment family (issue 21): where the mathematics
says that dfatorch and biotorch compute the same weight gradients (same weights, same feedback,
float64), they do, on a tiny MLP and a tiny CNN (stride 2, groups 2, max-pool).

The feedback is made the same as ``benchmarks/biotorch_peer.py`` makes it: ``fa``/``frsf``
dfatorch's ``B`` (``|B|``) from its raw buffers into biotorch's ``weight_backward``; ``brsf`` the
step's draw of biotorch replaces dfatorch's; ``usf`` nothing (biotorch's ``init="kaiming"`` scale
is dfatorch's; with its default ``"xavier"`` the gradients differ by a known product of ratios);
``dfa`` biotorch's kernels as the dense matrices they amount to, into dfatorch's dense feedback.
Skipped where biotorch is not importable: ``pip install --no-deps biotorch==0.0.16``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfatorch

biomodule = pytest.importorskip(
    "biotorch.module.biomodule",
    reason="biotorch is not installed (pip install --no-deps biotorch==0.0.16)",
)
pytestmark = [
    pytest.mark.peer,
    # biotorch's DFA layers use register_backward_hook, which torch deprecates (it still works)
    pytest.mark.filterwarnings("ignore:Using a non-full backward hook:FutureWarning"),
]

CLASSES = 5
LAYERS = (nn.Linear, nn.Conv2d)


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def make_model(kind: str, groups: int = 2) -> nn.Sequential:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 14), nn.Tanh(), nn.Linear(14, CLASSES)
        )
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=groups), nn.Tanh(), nn.Flatten(),
        nn.Linear(6 * 2 * 2, 10), nn.Tanh(), nn.Linear(10, CLASSES),
    )  # fmt: skip


def make_batch(kind: str):
    g = torch.Generator().manual_seed(1)
    shape = (12,) if kind == "mlp" else (2, 8, 8)
    return torch.randn(6, *shape, generator=g), torch.randint(0, CLASSES, (6,), generator=g)


def layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, LAYERS)]


def convert(model: nn.Module, rule: str, init: str) -> nn.Module:
    mode = "backpropagation" if rule == "bp" else rule
    config = {"type": mode, "options": {"constrain_weights": False, "gradient_clip": False,
                                        "init": init}}  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        return biomodule.BioModule(
            model, mode=mode, layer_config=config, output_dim=CLASSES if rule == "dfa" else None
        )


def dense(layer: nn.Module, x_shape: tuple[int, ...]) -> torch.Tensor:
    """biotorch's DFA feedback into ``layer``'s input, as a ``(C, d)`` matrix (``e = I``)."""
    b = layer.weight_backward.detach()
    if isinstance(layer, nn.Linear):
        return b.clone()
    out = layer._conv_forward(torch.zeros(1, *x_shape), layer.weight, None).shape[-2:]
    eye = torch.eye(CLASSES).view(CLASSES, CLASSES, 1, 1).expand(CLASSES, CLASSES, *out)
    cols = torch.nn.grad.conv2d_input((CLASSES, *x_shape), b, eye, stride=layer.stride,
                                      padding=layer.padding, groups=layer.groups)  # fmt: skip
    return cols.reshape(CLASSES, -1)


def both(kind: str, rule: str, init: str = "xavier"):
    """dfatorch's and biotorch's weight gradients on one batch, the feedback made the same."""
    # biotorch's conv DFA kernel is (C, in, k, k) whatever the groups: it fails on groups > 1
    base = make_model(kind, groups=1 if rule == "dfa" else 2)
    x, y = make_batch(kind)
    ours = copy.deepcopy(base)
    engine = dfatorch.attach(ours, rule, seed=3, example_input=x[:2]).double()
    theirs = convert(copy.deepcopy(base), rule, init)
    ours_layers, their_layers = layers(ours), layers(theirs.module)
    hidden = [n for n, m in ours.named_modules() if isinstance(m, LAYERS)][:-1]
    with torch.no_grad():
        if rule in ("fa", "frsf"):  # B (frsf: |B|) from dfatorch's raw buffers
            for i, name in enumerate(hidden):
                fb = engine.layer_feedback[name]
                their_layers[i + 1].weight_backward.copy_(fb.pattern.view(fb.shape) * fb.scales)
        if rule == "dfa":
            shapes = []
            hooks = [m.register_forward_pre_hook(lambda _m, a: shapes.append(a[0].shape[1:]))
                     for m in their_layers]  # fmt: skip
            theirs.module(x[:1])
            for h in hooks:
                h.remove()
            fm = engine.feedback
            mats = [dense(their_layers[i + 1], shapes[i + 1]) / s for i, s in enumerate(fm.scales)]
            fm.pattern.copy_(torch.cat(mats, 1))
    out = theirs(x, y, F.cross_entropy) if rule == "dfa" else theirs(x)
    F.cross_entropy(out, y).backward()
    if rule == "brsf":  # biotorch's draw of this step (B = |draw| sign(W)) replaces dfatorch's
        for i, name in enumerate(hidden):
            fb = engine.layer_feedback[name]
            drawn = their_layers[i + 1].weight_backward.detach().abs() / fb.scales
            fb._draw = lambda advance, d=drawn: d
    F.cross_entropy(ours(x), y).backward()
    grads = [{k: v.grad for k, v in m.named_parameters() if v.requires_grad}
             for m in (ours, theirs.module)]  # fmt: skip
    return grads[0], grads[1], ours_layers


def assert_same(ours, theirs, tol: float, factor=None):
    assert ours.keys() == theirs.keys()
    for key, mine in ours.items():
        scale = 1.0 if factor is None else factor[key.rsplit(".", 1)[0]]
        diff = (theirs[key] / scale - mine).abs().max() / mine.abs().max()
        assert diff <= tol, f"{key}: max relative difference {float(diff):.3g}"


# float64 to rounding; usf's scale s is a float32 buffer in dfatorch (2^-24 per layer)
CASES = [("bp", "xavier", 1e-12), ("fa", "xavier", 1e-12), ("frsf", "xavier", 1e-12),
         ("brsf", "xavier", 1e-12), ("usf", "kaiming", 1e-6), ("dfa", "xavier", 1e-12)]  # fmt: skip


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize(("rule", "init", "tol"), CASES, ids=[c[0] for c in CASES])
def test_gradients_agree_with_biotorch(kind, rule, init, tol):
    ours, theirs, _ = both(kind, rule, init)
    assert_same(ours, theirs, tol)
    if rule != "bp":  # not trivially: the rule is not back-propagation
        plain = make_model(kind, groups=1 if rule == "dfa" else 2)
        x, y = make_batch(kind)
        F.cross_entropy(plain(x), y).backward()
        first = next(n for n, _ in plain.named_parameters())
        assert not torch.allclose(plain.get_parameter(first).grad, ours[first])


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_usf_with_biotorchs_default_scale_differs_by_the_predicted_factor(kind):
    """biotorch's default init='xavier' gives s = sqrt(2/(fan_in+fan_out)), dfatorch's
    s = 1/sqrt(3 fan_in): layer l's gradient is scaled by the product of the ratios above it."""
    ours, theirs, ours_layers = both(kind, "usf", "xavier")
    names = [n for n, m in make_model(kind).named_modules() if isinstance(m, LAYERS)]
    factor, running = {}, 1.0
    for name, layer in reversed(list(zip(names, ours_layers))):
        factor[name] = running
        w = layer.weight
        fan_in, fan_out = w[0].numel(), w.shape[0] * w[0, 0].numel()
        running *= math.sqrt(2.0 / (fan_in + fan_out)) * math.sqrt(3.0 * fan_in)
    assert factor[names[0]] > 1.5  # a real difference, not rounding
    assert_same(ours, theirs, 1e-6, factor)
