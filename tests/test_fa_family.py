"""The feedback-alignment family (fa, usf, brsf, frsf, kp, dkp) against explicit formulas, in
float64: every weight gradient written out layer by layer with the feedback matrices read from the
engine's raw state (never through the code that builds them), the learned feedback's update, the
random state of brsf, exact resume and the refused combinations."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from test_engine import MatmulCounter, batch, output_error, step
from torch import nn

import dfatorch
from dfatorch.alignment import gradient_alignment, weight_alignment
from dfatorch.cli import main
from dfatorch.models import build_model
from dfatorch.train import TrainConfig, load_checkpoint, probe_batch, read_metrics, train

LAYERWISE = ["fa", "usf", "brsf", "frsf", "kp"]
ALL_RULES = [*LAYERWISE, "dkp"]


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture
def float32(_float64):
    """For the trainer's tests: the data pipeline is float32."""
    torch.set_default_dtype(torch.float32)


# -- models and the explicit backward passes --------------------------------------------------


def make_mlp(seed: int = 0) -> nn.Sequential:
    """Two hidden layers: 0 (12->16), 2 (16->14); output 4 (14->5)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 14), nn.Tanh(), nn.Linear(14, 5)
    )


class CNN(nn.Module):
    """conv1 -> relu -> pool -> conv2 (stride 2, groups 2) -> tanh -> flatten -> fc1 -> relu
    (in place) -> out. Hidden layers: conv1, conv2, fc1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.fc1 = nn.Linear(6 * 2 * 2, 10)
        self.out = nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = torch.tanh(self.conv2(h)).flatten(1)
        return self.out(F.relu(self.fc1(h), inplace=True))


def make_cnn(seed: int = 0) -> CNN:
    torch.manual_seed(seed)
    return CNN()


def images(n: int = 6, seed: int = 1):
    return batch(n=n, shape=(2, 8, 8), seed=seed)


def mlp_expected(model, x, t, rules, feedback):
    """Weight gradients of the MLP: error at h_l is e W / delta B (layer-wise) / e B_l (direct)."""
    w = {n: p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        a1 = x @ w["0.weight"].T + w["0.bias"]
        h1 = torch.tanh(a1)
        a2 = h1 @ w["2.weight"].T + w["2.bias"]
        h2 = torch.tanh(a2)
        y = h2 @ w["4.weight"].T + w["4.bias"]
        e = output_error(y, t)

        def error_at(layer, delta_above, weight_above):
            rule = rules[layer]
            if rule == "bp":
                return delta_above @ weight_above
            if rule in ("dfa", "bdfa", "dkp"):
                return e @ feedback[layer]  # (C, d_l): the direct projection
            return delta_above @ feedback[layer]  # B in the shape of the weight above

        d2 = error_at("2", e, w["4.weight"]) * (1 - h2**2)
        d1 = error_at("0", d2, w["2.weight"]) * (1 - h1**2)
    return {
        "0.weight": d1.T @ x, "0.bias": d1.sum(0), "2.weight": d2.T @ h1, "2.bias": d2.sum(0),
        "4.weight": e.T @ h2, "4.bias": e.sum(0),
    }, {"e": e, "h1": h1, "h2": h2, "d1": d1, "d2": d2}  # fmt: skip


def cnn_expected(model, x, t, rules, feedback):
    """Weight gradients of CNN, layer by layer: transposed convolutions written with
    F.conv_transpose2d, max-pool backward as max_unpool2d with the forward's indices."""
    w = {n: p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        a1 = F.conv2d(x, w["conv1.weight"], w["conv1.bias"], padding=1)
        p1, i1 = F.max_pool2d(F.relu(a1), 2, return_indices=True)
        a2 = F.conv2d(p1, w["conv2.weight"], w["conv2.bias"], stride=2, padding=1, groups=2)
        h2 = torch.tanh(a2)
        f = h2.flatten(1)
        a3 = f @ w["fc1.weight"].T + w["fc1.bias"]
        h3 = F.relu(a3)
        y = h3 @ w["out.weight"].T + w["out.bias"]
        e = output_error(y, t)

        def linear_error(layer, delta_above, weight_above):
            rule = rules[layer]
            if rule == "bp":
                return delta_above @ weight_above
            if rule in ("dfa", "bdfa", "dkp"):
                return e @ feedback[layer]
            return delta_above @ feedback[layer]

        d3 = linear_error("fc1", e, w["out.weight"]) * (a3 > 0)
        d2 = linear_error("conv2", d3, w["fc1.weight"]).view_as(h2) * (1 - h2**2)
        if rules["conv1"] in ("dfa", "bdfa", "dkp"):
            gp1 = (e @ feedback["conv1"]).view_as(p1)
        else:
            kernel = w["conv2.weight"] if rules["conv1"] == "bp" else feedback["conv1"]
            # (2 - 1) * 2 - 2 + 3 = 3 rows, one more to reach the 4 of p1
            gp1 = F.conv_transpose2d(d2, kernel, stride=2, padding=1, groups=2, output_padding=1)
        d1 = F.max_unpool2d(gp1, i1, 2, output_size=a1.shape[-2:]) * (a1 > 0)
    grad_w = torch.nn.grad.conv2d_weight
    return {
        "conv1.weight": grad_w(x, w["conv1.weight"].shape, d1, padding=1),
        "conv1.bias": d1.sum((0, 2, 3)),
        "conv2.weight": grad_w(p1, w["conv2.weight"].shape, d2, stride=2, padding=1, groups=2),
        "conv2.bias": d2.sum((0, 2, 3)),
        "fc1.weight": d3.T @ f, "fc1.bias": d3.sum(0),
        "out.weight": e.T @ h3, "out.bias": e.sum(0),
    }, {"e": e, "p1": p1, "f": f, "d2": d2, "d3": d3}  # fmt: skip


def uniform_draw(generator, rows, cols):
    """The `uniform` structure, written out: U(-1/sqrt(cols), 1/sqrt(cols)) in float32."""
    bound = 1 / math.sqrt(cols)
    drawn = torch.rand(rows, cols, generator=generator, dtype=torch.float32) * (2 * bound) - bound
    return drawn.double()


def layer_matrix(engine, name, weight, rng_state=None):
    """The B that replaces ``weight`` for hidden layer ``name``, from the engine's raw state and the
    rule's definition (gain 1, width-normalised, uniform structure)."""
    fb = engine.layer_feedback[name]
    weight = weight.detach()
    rows, fan_in = weight.shape[0], weight[0].numel()
    signs = torch.sign(weight)
    if fb.rule == "fa":
        assert fb.scales.item() == 1.0 and fb.pattern.abs().max() <= 1 / math.sqrt(fan_in)
        return fb.pattern.double().view_as(weight)
    if fb.rule == "kp":
        return fb.weight.detach().clone()
    if fb.rule == "usf":
        return signs / math.sqrt(3 * fan_in)  # the RMS of U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    if fb.rule == "frsf":
        assert (fb.pattern >= 0).all() and fb.pattern.max() <= 1 / math.sqrt(fan_in)
        return fb.pattern.double().view_as(weight) * signs
    assert fb.rule == "brsf"
    g = torch.Generator()
    g.set_state(rng_state)
    return uniform_draw(g, rows, fan_in).abs().view_as(weight) * signs


def weight_above(model, name):
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return dict(model.named_modules())[names[names.index(name) + 1]].weight


def expected_feedback(engine, model, rng_states=None):
    """Every hidden layer's feedback read from the engine: layer-wise B's and direct blocks."""
    out = {}
    for name in engine.layer_feedback:
        state = None if rng_states is None else rng_states.get(name)
        out[name] = layer_matrix(engine, name, weight_above(model, name), state)
    if engine.feedback is not None:
        blocks = engine.feedback.blocks(torch.float64)
        for i, name in enumerate(engine.feedback.names):
            out[name] = blocks[i]
        for i, p in zip(engine.feedback.learned_index, engine.feedback.learned_blocks):
            out[engine.feedback.names[i]] = p.detach().clone()
    return out


def rng_states(engine):
    return {
        name: fb.rng_state.clone()
        for name, fb in engine.layer_feedback.items()
        if fb.rule == "brsf"
    }


def attach(model, method, x, **kw):
    return dfatorch.attach(model, method, example_input=x[:2], seed=3, **kw)


# -- gradients against the explicit formulas ---------------------------------------------------


@pytest.mark.parametrize("method", ALL_RULES)
def test_mlp_gradients_match_formula(method):
    x, t = batch()
    model = make_mlp()
    engine = attach(model, method, x)
    rules = {k: v.value for k, v in engine.rules.items()}
    assert rules == {"0": method, "2": method, "4": "bp"}
    feedback = expected_feedback(engine, model, rng_states(engine))
    got = step(model, x, t)
    want, _ = mlp_expected(model, x, t, rules, feedback)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"{n}: {m}")
    # the feedback is not the transposed path: the hidden gradients differ from BP's
    plain = make_mlp()
    assert not torch.allclose(step(plain, x, t)["0.weight"], got["0.weight"])


@pytest.mark.parametrize("method", ALL_RULES)
def test_cnn_gradients_match_formula(method):
    x, t = images()
    model = make_cnn()
    engine = attach(model, method, x)
    rules = {k: v.value for k, v in engine.rules.items() if k != "out"}
    assert rules == {"conv1": method, "conv2": method, "fc1": method}
    feedback = expected_feedback(engine, model, rng_states(engine))
    if method != "dkp":
        assert feedback["conv1"].shape == model.conv2.weight.shape  # a kernel, not a matrix
    got = step(model, x, t)
    want, _ = cnn_expected(model, x, t, rules, feedback)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"{n}: {m}")


class ResidualMLP(nn.Module):
    """fc1 -> tanh -> h1; h2 = h1 + tanh(fc2(h1)) (a skip around fc2); out(h2)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 16)
        self.out = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = torch.tanh(self.fc1(x))
        return self.out(h1 + torch.tanh(self.fc2(h1)))


@pytest.mark.parametrize("method", LAYERWISE)
def test_layerwise_gradients_through_a_skip_connection(method):
    """A layer-wise rule replaces ``W^T delta`` at each layer's input only: the skip path still
    carries the error unchanged, so the error at ``h1`` is the error at ``h2`` (the skip) plus
    ``delta_2 B`` (around fc2), as ``resnet20`` needs."""
    x, t = batch()
    torch.manual_seed(0)
    model = ResidualMLP()
    engine = attach(model, method, x)
    feedback = expected_feedback(engine, model, rng_states(engine))
    got = step(model, x, t)
    w = {n: p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        h1 = torch.tanh(x @ w["fc1.weight"].T + w["fc1.bias"])
        z = torch.tanh(h1 @ w["fc2.weight"].T + w["fc2.bias"])
        h2 = h1 + z
        e = output_error(h2 @ w["out.weight"].T + w["out.bias"], t)
        g2 = e @ feedback["fc2"]  # at out's input: B in out's weight shape
        d2 = g2 * (1 - z**2)
        g1 = g2 + d2 @ feedback["fc1"]  # the skip, plus fc2's input through B
        d1 = g1 * (1 - h1**2)
    want = {"fc1.weight": d1.T @ x, "fc1.bias": d1.sum(0), "fc2.weight": d2.T @ h1,
            "fc2.bias": d2.sum(0), "out.weight": e.T @ h2, "out.bias": e.sum(0)}  # fmt: skip
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("conv_error", ["backprop", "project"])
def test_hybrid_scope_for_a_layerwise_rule(conv_error):
    """scope=fc: linear layers by the rule, the conv stack by BP; `backprop` hands the conv stack
    W_fc1^T delta, `project` B_fc1^T delta."""
    x, t = images()
    model = make_cnn()
    engine = attach(model, "fa", x, scope="fc", conv_error=conv_error)
    rules = {k: v.value for k, v in engine.rules.items() if k != "out"}
    assert rules == {"conv1": "bp", "conv2": "fa" if conv_error == "project" else "bp", "fc1": "fa"}
    feedback = expected_feedback(engine, model)
    got = step(model, x, t)
    want, _ = cnn_expected(model, x, t, rules, feedback)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"{n}: {m}")


def test_per_layer_overrides_mix_layerwise_direct_and_bp():
    """rules=: a usf layer above a dfa layer above an fa layer, each with its own formula (the fa
    layer's delta comes back through B of the dfa layer's weight)."""
    x, t = batch()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 14), nn.Tanh(), nn.Linear(14, 10), nn.Tanh(),
        nn.Linear(10, 5),
    )  # fmt: skip
    engine = attach(model, "bp", x, rules={"0": "fa", "2": "dfa", "4": "usf"})
    assert {k: v.value for k, v in engine.rules.items()} == {
        "0": "fa", "2": "dfa", "4": "usf", "6": "bp",
    }  # fmt: skip
    assert engine.feedback_layers == ["2"] and list(engine.layer_feedback) == ["0", "4"]
    got = step(model, x, t)
    lin = [m for m in model if isinstance(m, nn.Linear)]
    b0 = layer_matrix(engine, "0", lin[1].weight)
    b4 = layer_matrix(engine, "4", lin[3].weight)
    (b2,) = engine.feedback.blocks(torch.float64)
    with torch.no_grad():
        h1 = torch.tanh(lin[0](x))
        h2 = torch.tanh(lin[1](h1))
        h3 = torch.tanh(lin[2](h2))
        e = output_error(lin[3](h3), t)
        d3 = (e @ b4) * (1 - h3**2)  # usf: back through sign(W_out) * s
        d2 = (e @ b2) * (1 - h2**2)  # dfa: its projection, not d3 sent back
        d1 = (d2 @ b0) * (1 - h1**2)  # fa: d2 back through B in W_2's place
    torch.testing.assert_close(got["4.weight"], d3.T @ h2)
    torch.testing.assert_close(got["2.weight"], d2.T @ h1)
    torch.testing.assert_close(got["0.weight"], d1.T @ x)
    torch.testing.assert_close(got["6.weight"], e.T @ h3)


# -- what is (not) computed ------------------------------------------------------------------


@pytest.mark.parametrize(("method", "expected"), [("bp", 3 + 2), ("fa", 3 + 2), ("kp", 3 + 2 + 2)])
def test_layerwise_backward_never_computes_w_transpose_delta(method, expected):
    """BP: 3 weight gradients + 2 input gradients (W^T delta). FA: the same count, the 2 input
    gradients being delta B; were W^T delta also computed there would be 2 more. KP: 2 more, the
    gradients of the two B's."""
    x, t = batch()
    model = make_mlp()
    attach(model, method, x)
    loss = F.cross_entropy(model(x), t)
    with MatmulCounter() as counter:
        loss.backward()
    assert len(counter.shapes) == expected, counter.shapes


# -- sign-symmetry follows W; brsf's random magnitudes -----------------------------------------


@pytest.mark.parametrize("method", ["usf", "frsf", "brsf"])
def test_sign_feedback_follows_w_after_every_step(method):
    """B = M o sign(W) is rebuilt from the current W: after optimiser steps that flip signs of W,
    the gradients still match the formula with the new signs."""
    x, t = batch()
    model = make_mlp()
    engine = attach(model, method, x)
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    signs = torch.sign(model[2].weight.detach()).clone()
    drawn = {n: fb.pattern.clone() for n, fb in engine.layer_feedback.items() if method == "frsf"}
    for _ in range(3):
        feedback = expected_feedback(engine, model, rng_states(engine))
        got = step(model, x, t)
        want, _ = mlp_expected(model, x, t, engine_rules(engine), feedback)
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"{n}: {m}")
        opt.step()
    assert not torch.equal(torch.sign(model[2].weight.detach()), signs)  # W's signs did change
    if method == "frsf":  # M is drawn once: the formula above reads it, so check it stayed put
        for name, fb in engine.layer_feedback.items():
            assert torch.equal(fb.pattern, drawn[name]), name


def engine_rules(engine):
    return {k: v.value for k, v in engine.rules.items()}


def test_brsf_redraws_every_batch_and_resumes_from_the_saved_generator():
    x, t = batch()
    model = make_mlp()
    engine = attach(model, "brsf", x)
    fb = engine.layer_feedback["0"]
    first_state = fb.rng_state.clone()
    first = step(model, x, t)
    second_state = fb.rng_state.clone()
    assert not torch.equal(first_state, second_state)  # the generator moved on
    saved = copy.deepcopy(engine.state_dict())
    second = step(model, x, t)  # same weights, same batch: only M differs
    assert not torch.equal(first["0.weight"], second["0.weight"])
    # the second gradient is the formula with the second draw, not the first
    feedback = expected_feedback(
        engine, model, {"0": second_state, "2": saved["layerwise.1.rng_state"]}
    )
    want, _ = mlp_expected(model, x, t, engine_rules(engine), feedback)
    torch.testing.assert_close(second["0.weight"], want["0.weight"])
    # a fresh engine loaded from the saved state draws that same second M
    other = make_mlp()
    other.load_state_dict(model.state_dict())
    resumed = attach(other, "brsf", x)
    resumed.load_state_dict(saved)
    again = step(other, x, t)
    for name in second:
        assert torch.equal(again[name], second[name]), name


# -- learned feedback: the update rules ---------------------------------------------------------


def test_kp_feedback_gets_the_weight_gradient_and_the_kolen_pollack_update():
    """dB = dW (B is kept in W's shape), and with SGD with weight decay both follow Akrout et al.'s
    eqs. 16-17: W <- (1 - lr wd) W - lr dW, B <- (1 - lr wd) B - lr dW, so W - B shrinks by
    (1 - lr wd) per step."""
    x, t = batch()
    model = make_mlp()
    engine = attach(model, "kp", x)
    lr, wd = 0.1, 0.05
    opt = torch.optim.SGD([*model.parameters(), *engine.parameters()], lr=lr, weight_decay=wd)
    fbs = [engine.layer_feedback["0"], engine.layer_feedback["2"]]
    weights = [model[2].weight, model[4].weight]
    for _ in range(3):
        before_b = [fb.weight.detach().clone() for fb in fbs]
        before_w = [w.detach().clone() for w in weights]
        feedback = expected_feedback(engine, model)
        opt.zero_grad()
        F.cross_entropy(model(x), t).backward()
        _, acts = mlp_expected(model, x, t, engine_rules(engine), feedback)
        explicit = [acts["d2"].T @ acts["h1"], acts["e"].T @ acts["h2"]]  # delta^T h
        for fb, w, dw in zip(fbs, weights, explicit):
            torch.testing.assert_close(fb.weight.grad, dw)
            torch.testing.assert_close(w.grad, dw)
        opt.step()
        for fb, w, b0, w0, dw in zip(fbs, weights, before_b, before_w, explicit):
            torch.testing.assert_close(fb.weight.detach(), (1 - lr * wd) * b0 - lr * dw)
            torch.testing.assert_close(w.detach() - fb.weight.detach(), (1 - lr * wd) * (w0 - b0))


def test_kp_conv_feedback_gets_the_kernel_gradient():
    x, t = images()
    model = make_cnn()
    engine = attach(model, "kp", x)
    feedback = expected_feedback(engine, model)
    step(model, x, t)
    _, acts = cnn_expected(model, x, t, engine_rules(engine), feedback)
    want = torch.nn.grad.conv2d_weight(
        acts["p1"], model.conv2.weight.shape, acts["d2"], stride=2, padding=1, groups=2
    )
    torch.testing.assert_close(engine.layer_feedback["conv1"].weight.grad, want)
    torch.testing.assert_close(engine.layer_feedback["conv2"].weight.grad, acts["d3"].T @ acts["f"])


def test_dkp_feedback_update_is_e_transpose_h():
    """dB_l = e^T h_l (C x d_l), the gradient of a direct forward connection h_l -> y (Webster et
    al.'s code); with SGD: B_l <- B_l - lr (e^T h_l + wd B_l)."""
    x, t = batch()
    model = make_mlp()
    engine = attach(model, "dkp", x)
    assert [p.shape for p in engine.parameters()] == [(5, 16), (5, 14)]
    assert engine.feedback.learned == [True, True]
    lr, wd = 0.5, 0.01
    opt = torch.optim.SGD([*model.parameters(), *engine.parameters()], lr=lr, weight_decay=wd)
    for _ in range(3):
        feedback = expected_feedback(engine, model)
        before = [p.detach().clone() for p in engine.parameters()]
        opt.zero_grad()
        got = step_keep(model, x, t)
        want, acts = mlp_expected(model, x, t, engine_rules(engine), feedback)
        torch.testing.assert_close(got["0.weight"], want["0.weight"])
        torch.testing.assert_close(got["2.weight"], want["2.weight"])
        updates = [acts["e"].T @ acts["h1"], acts["e"].T @ acts["h2"]]
        for p, u in zip(engine.parameters(), updates):
            torch.testing.assert_close(p.grad, u)
        opt.step()
        for p, b0, u in zip(engine.parameters(), before, updates):
            torch.testing.assert_close(p.detach(), b0 - lr * (u + wd * b0))


def step_keep(model, x, t):
    F.cross_entropy(model(x), t).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_learned_feedback_matrix_round_trips_through_its_layout():
    """A matrix rebuilt from the saved layout has the learned blocks to load into."""
    x, _ = batch()
    engine = attach(make_mlp(), "dfa", x, rules={"2": "dkp"})
    fm = engine.feedback
    assert fm.learned == [False, True] and fm.layout()["learned"] == [False, True]
    with torch.no_grad():
        fm.learned_blocks[0].mul_(3)  # a trained block, no longer pattern * scale
    clone = dfatorch.FeedbackMatrix.from_layout(fm.layout())
    clone.load_state_dict(fm.state_dict())
    assert torch.equal(clone.matrix(torch.float64), fm.matrix(torch.float64))
    assert clone.learned_blocks[0].dtype == torch.float64  # took the saved precision


def test_dkp_update_uses_the_transformed_error_on_a_cnn():
    """With an error transform, the projection and the update both use the transformed e; the
    conv point's h is flattened in C x H x W order like its block's columns."""

    def halve(e):
        return e / 2

    x, t = images()
    model = make_cnn()
    engine = attach(model, "dkp", x, error_transforms=[halve])
    feedback = expected_feedback(engine, model)
    step(model, x, t)
    with torch.no_grad():
        h1 = F.max_pool2d(F.relu(model.conv1(x)), 2)
        logits = model(x)
    e = output_error(logits, t) / 2
    torch.testing.assert_close(engine.feedback.learned_blocks[0].grad, e.T @ h1.flatten(1))
    assert feedback["conv1"].shape == (5, 4 * 4 * 4)


# -- state, resume, copies ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL_RULES)
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_two_steps_equal_one_step_save_load_one_step(method, net):
    """Exact resume: model, engine (feedback, generator states) and optimiser saved after one step
    and loaded into fresh objects give the uninterrupted run's second step bit for bit."""
    factory, data = (make_mlp, batch) if net == "mlp" else (make_cnn, images)
    batches = [data(seed=1), data(seed=2)]

    def build(seed_model):
        model = factory(seed_model)
        engine = attach(model, method, batches[0][0])
        params = [*model.parameters(), *engine.parameters()]
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)
        return model, engine, opt

    def one_step(model, opt, xt):
        opt.zero_grad()
        F.cross_entropy(model(xt[0]), xt[1]).backward()
        opt.step()

    model, engine, opt = build(0)
    one_step(model, opt, batches[0])
    saved = copy.deepcopy(
        {"model": model.state_dict(), "engine": engine.state_dict(), "opt": opt.state_dict()}
    )
    one_step(model, opt, batches[1])

    other, other_engine, other_opt = build(7)  # other weights, restored from the checkpoint
    other.load_state_dict(saved["model"])
    other_engine.load_state_dict(saved["engine"])
    other_opt.load_state_dict(saved["opt"])
    one_step(other, other_opt, batches[1])
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(engine.state_dict().items(), other_engine.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    if method in ("kp", "dkp"):  # one learned B per hidden layer, saved and restored
        assert len(list(engine.parameters())) == (2 if net == "mlp" else 3)


@pytest.mark.parametrize("method", ["kp", "dkp", "brsf"])
def test_trainer_resume_is_exact(tmp_path, method, float32):
    """Through train(): the learned feedback joins the optimiser; a run stopped after one epoch and
    resumed equals the uninterrupted one."""
    config = TrainConfig(
        dataset="digits", model="mlp", activation="tanh", batch_size=64, epochs=2,
        fraction=0.5, method=method, scope="all", optimizer="sgd", weight_decay=1e-3,
    )  # fmt: skip
    ref = train(config, tmp_path / "ref", progress=False).history
    train(config, tmp_path / "run", epochs=1, progress=False)
    resumed = train(None, tmp_path / "run", resume=True, epochs=2, progress=False).history
    timing = {"epoch_seconds", "images_per_second"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == [
        {k: v for k, v in r.items() if k not in timing} for r in ref
    ]
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    groups = checkpoint["optimizer"]["param_groups"]
    learned = {k: v for k, v in checkpoint["engine"].items() if "weight" in k or "learned" in k}
    if method == "brsf":
        assert len(groups) == 1 and not learned
        return
    # the feedback has its own group with the weights' hyper-parameters, and it was trained
    assert len(groups) == 2 and len(groups[1]["params"]) == len(learned) == 2
    assert {k: groups[1][k] for k in ("lr", "weight_decay", "momentum")} == {
        k: groups[0][k] for k in ("lr", "weight_decay", "momentum")
    }
    assert groups[1]["weight_decay"] == 1e-3
    model = build_model("mlp", (1, 8, 8), 10, activation="tanh")  # the initial B's: same seed
    fresh = dfatorch.attach(model, method, seed=0, example_input=torch.zeros(2, 1, 8, 8))
    for key, value in learned.items():
        assert value.shape == fresh.state_dict()[key].shape
        assert not torch.equal(value, fresh.state_dict()[key]), key


@pytest.mark.parametrize("method", ["kp", "dkp", "fa"])
def test_learned_feedback_without_weight_decay_is_warned_about(tmp_path, capsys, method, float32):
    config = TrainConfig(
        dataset="digits", model="mlp", batch_size=64, epochs=1, fraction=0.1, method=method,
        optimizer="sgd", weight_decay=0.0,
    )  # fmt: skip
    train(config, tmp_path / "none", progress=False)
    warned = "trains without weight decay" in capsys.readouterr().err
    assert warned == (method != "fa")  # fa learns nothing: no warning
    probe_batch(tmp_path / "none")  # reading a saved run for alignment probes trains nothing
    assert "trains without weight decay" not in capsys.readouterr().err
    train(dataclasses.replace(config, weight_decay=1e-4), tmp_path / "some", progress=False)
    assert "trains without weight decay" not in capsys.readouterr().err


def test_state_dict_refuses_another_rule_or_shape():
    x, _ = batch()
    fa = attach(make_mlp(), "fa", x)
    with pytest.raises(ValueError, match="rules"):
        attach(make_mlp(), "usf", x).load_state_dict(fa.state_dict())
    wide = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 15), nn.Tanh(),
                         nn.Linear(15, 5))  # fmt: skip
    with pytest.raises(ValueError, match="shape"):
        attach(wide, "fa", x).load_state_dict(fa.state_dict(), strict=False)


@pytest.mark.parametrize("method", ["brsf", "kp"])
def test_deepcopy_trains_with_its_own_feedback(method):
    x, t = batch()
    model = make_mlp()
    engine = attach(model, method, x)
    step(model, x, t)
    twin = copy.deepcopy(model)
    twin_engine = dfatorch.engine.attached_engine(twin)
    assert twin_engine is not engine
    want, got = step(model, x, t), step(twin, x, t)  # brsf: both draw the same next M
    for name in want:
        assert torch.equal(got[name], want[name]), name
    if method == "kp":
        assert twin_engine.layer_feedback["0"].weight is not engine.layer_feedback["0"].weight


def test_seeded_fa_equals_dense_and_stores_nothing():
    x, t = images()
    results = {}
    for storage in ("dense", "seeded"):
        model = make_cnn()
        engine = attach(model, "fa", x, storage=storage)
        results[storage] = (step(model, x, t), engine.storage_bytes()["pattern"])
    for name, g in results["dense"][0].items():
        assert torch.equal(results["seeded"][0][name], g), name
    weights = (6 * 2 * 9) + (10 * 24) + (5 * 10)  # conv2, fc1 and out get a B each
    assert results["dense"][1] == 4 * weights and results["seeded"][1] == 0


def test_remove_restores_exact_bp():
    x, t = images()
    plain, model = make_cnn(), make_cnn()
    engine = attach(model, "kp", x)
    engine.remove()
    want, got = step(plain, x, t), step(model, x, t)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_layerwise_rules_learn():
    torch.manual_seed(0)
    x = torch.randn(256, 12)
    t = (x @ torch.randn(12, 5)).argmax(1)
    for method in ALL_RULES:
        model = make_mlp()
        engine = attach(model, method, x)
        opt = torch.optim.Adam([*model.parameters(), *engine.parameters()], 1e-2)
        losses = []
        for _ in range(100):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), t)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.5 * losses[0], method


# -- alignment diagnostics -----------------------------------------------------------------------


def test_fa_with_b_equal_to_w_aligns_exactly_and_probes_leave_brsf_untouched():
    x, t = batch(n=16)
    model = make_mlp()
    engine = attach(model, "fa", x)
    for name, fb in engine.layer_feedback.items():
        fb.pattern.copy_(weight_above(model, name).detach().reshape(fb.pattern.shape))
    report = gradient_alignment(engine, x, t, F.cross_entropy)
    assert [a.rule for a in report] == ["fa", "fa"]
    for a in report:
        assert a.mean == pytest.approx(1.0, abs=1e-9)
    assert weight_alignment(engine) == {"0": pytest.approx(0.0, abs=1e-5),
                                        "2": pytest.approx(0.0, abs=1e-5)}  # fmt: skip

    model = make_mlp()
    engine = attach(model, "brsf", x)
    states = rng_states(engine)
    report = gradient_alignment(engine, x, t, F.cross_entropy)
    angles = weight_alignment(engine)
    assert all(-1 <= a.mean <= 1 and a.samples == 16 for a in report)
    assert set(angles) == {"0", "2"} and all(0 < v < 90 for v in angles.values())
    for name, state in states.items():
        assert torch.equal(engine.layer_feedback[name].rng_state, state), name


@pytest.mark.parametrize("method", ["kp", "usf", "frsf", "brsf"])
def test_weight_alignment_is_the_angle_between_w_and_the_rules_own_b(method):
    """Each layer-wise rule's angle, from the explicit B of its definition; kp's is its learned B,
    set here to W plus noise, so that an angle read from W itself (0) or from kp's random start
    (near 90) shows."""
    x, _ = batch()
    model = make_mlp()
    engine = attach(model, method, x)
    if method == "kp":
        g = torch.Generator().manual_seed(5)
        for name, fb in engine.layer_feedback.items():
            w = weight_above(model, name).detach()
            fb.weight.data.copy_(w + 0.5 * w.std() * torch.randn(w.shape, generator=g))
    feedback = expected_feedback(engine, model, rng_states(engine))
    got = weight_alignment(engine)
    for name in engine.layer_feedback:
        w = weight_above(model, name).detach().double().flatten()
        b = feedback[name].flatten()
        want = math.degrees(math.acos(min(1.0, (w @ b / (w.norm() * b.norm())).item())))
        assert got[name] == pytest.approx(want, abs=1e-3), name
        assert 1 < want < 80  # B leans toward W without being parallel to it


# -- refused combinations ------------------------------------------------------------------


def test_bad_combinations_are_one_line_errors():
    x, _ = batch()
    for method in ("kp", "dkp"):
        for storage in ("packed", "seeded"):
            with pytest.raises(ValueError, match=rf"storage='{storage}' cannot hold a learned "
                               rf"feedback \({method}\): use storage='dense'"):  # fmt: skip
                attach(make_mlp(), method, x, storage=storage)
    for method in ("usf", "brsf", "frsf"):
        with pytest.raises(ValueError, match=rf"cannot hold a sign-derived feedback \({method}\)"):
            attach(make_mlp(), method, x, storage="seeded")
    with pytest.raises(ValueError, match=r"storage='packed' cannot hold a float feedback \(fa\)"):
        attach(make_mlp(), "fa", x, storage="packed")
    with pytest.raises(ValueError, match=r"init='norm_matched'.*fa"):
        attach(make_mlp(), "dfa", x, rules={"0": "fa"}, init="norm_matched")
    with pytest.raises(ValueError, match=r"dkp learns its feedback.*example_input"):
        dfatorch.attach(make_mlp(), "dkp")
    with pytest.raises(ValueError, match="output layer"):
        attach(make_mlp(), "bp", x, rules={"4": "kp"})
    reflect = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Tanh(),
                            nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(),
                            nn.Linear(2 * 16, 3))  # fmt: skip
    model_state = copy.deepcopy(reflect.state_dict())
    with pytest.raises(ValueError, match=r"'2' pads with 'reflect'.*zero padding"):
        dfatorch.attach(reflect, "fa")
    assert dfatorch.engine.attached_engine(reflect) is None  # nothing left behind
    assert all(torch.equal(v, model_state[k]) for k, v in reflect.state_dict().items())
    dfatorch.attach(reflect, "fa", rules={"0": "bp"})  # the reflect-padded layer above is BP's
    even = nn.Sequential(
        nn.Linear(4, 8), nn.Unflatten(1, (2, 4)), nn.Tanh(), nn.Conv1d(2, 2, 2, padding="same"),
        nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip
    with pytest.raises(ValueError, match="even kernel"):
        dfatorch.attach(even, "usf")
    with pytest.raises(ValueError, match="calibrate"):
        engine = attach(make_mlp(), "dkp", x)
        engine.calibrate(x, batch()[1], F.cross_entropy)


# -- command line --------------------------------------------------------------------------


def test_cli_trains_every_new_method(tmp_path, capsys, float32):
    from dfatorch.config import choices

    assert set(ALL_RULES) <= set(choices("method"))
    for method in ALL_RULES:
        out = tmp_path / method
        code = main(["train", "--method", method, "--scope", "all", "--dataset", "digits",
                     "--model", "mlp", "--epochs", "1", "--fraction", "0.2", "--lr", "3e-3",
                     "--out", str(out), "--no-progress"])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        assert read_metrics(out)[0]["train_loss"] > 0
    capsys.readouterr()  # kp and dkp warned of their missing weight decay
    assert main(["train", "--method", "kp", "--storage", "packed", "--dataset", "digits",
                 "--out", str(tmp_path / "bad"), "--no-progress"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err == ("error: storage='packed' cannot hold a learned feedback (kp): use "
                   "storage='dense'")  # fmt: skip
    assert not (tmp_path / "bad").exists()
