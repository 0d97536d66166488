"""Recurrent DFA: gradients of hand-unrolled RNN and GRU cells against the explicit formulas
(float64), the cut of the recurrent connection, BPTT equal to plain autograd, the one projection,
the refusals, the sequence datasets and the command line."""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfatorch
from dfatorch.config import TrainConfig
from dfatorch.data import DataError, load_dataset
from dfatorch.data.sequence import PERMUTATION_SEED, load_text
from dfatorch.feedback import FeedbackMatrix, SparsePattern
from dfatorch.models import RecurrentNet, build_model
from dfatorch.train import cross_entropy

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
MNIST_DIR = SHARED / "mnist"
SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"

N, T, F_IN, H, C = 5, 2, 3, 4, 3


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def make(cell: str, *, layers: int = 1, every_step: bool = False, steps: int = T) -> RecurrentNet:
    torch.manual_seed(1)
    return RecurrentNet((1, steps, F_IN), C, cell=cell, hidden_size=H, layers=layers,
                        every_step=every_step)  # fmt: skip


def batch(every_step: bool, steps: int = T) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, 1, steps, F_IN, generator=g)
    t = torch.randint(0, C, (N, steps) if every_step else (N,), generator=g)
    return x, t


def grads(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    cross_entropy(model(x), t).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def output_error(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``dL/dy`` of the mean cross-entropy, explicitly: ``(softmax(y) - onehot(t)) / count``."""
    return (y.softmax(-1) - F.one_hot(t, y.shape[-1])) / t.numel()


# -- explicit formulas ---------------------------------------------------------------------------


def head(model: RecurrentNet, h: torch.Tensor) -> torch.Tensor:
    """The head's logits, computed outside the module (its hooks belong to the engine)."""
    return F.linear(h, model.head.weight, model.head.bias)


def rnn_step(cell: nn.RNNCell, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh)


def gru_step(cell: nn.GRUCell, x: torch.Tensor, h: torch.Tensor) -> dict[str, torch.Tensor]:
    """One GRU step as PyTorch defines it, with every intermediate the formulas need."""
    gi = x @ cell.weight_ih.T + cell.bias_ih
    gh = h @ cell.weight_hh.T + cell.bias_hh
    (ir, iz, in_), (hr, hz, hn) = gi.chunk(3, 1), gh.chunk(3, 1)
    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
    n = torch.tanh(in_ + r * hn)
    return {"r": r, "z": z, "n": n, "hn": hn, "h": (1 - z) * n + z * h}


def explicit_rnn(model: RecurrentNet, x: torch.Tensor, t: torch.Tensor, B: torch.Tensor):
    """DFA by hand for a stack of tanh RNN cells: ``g_t = e_t B_l`` (``e`` for a last-step
    loss) at every state, ``delta_t = g_t * (1 - h_t^2)``, ``dW_ih = sum_t delta_t^T x_t``,
    ``dW_hh = sum_t delta_t^T h_{t-1}`` (``h_0 = 0``), both biases ``sum_t delta_t``."""
    seq = model.sequence(x)
    inputs, states = [], []
    for cell in model.cells:
        h = torch.zeros(N, H)
        hs = [h]
        for s in range(seq.shape[1]):
            hs.append(rnn_step(cell, seq[:, s], hs[-1]))
        inputs.append(seq)
        states.append(hs)
        seq = torch.stack(hs[1:], 1)
    top = states[-1]
    y = head(model, seq) if model.every_step else head(model, top[-1])
    e = output_error(y, t)
    want = {}
    for layer, blocks in enumerate(B.split(H, 1)):
        hs, xs = states[layer], inputs[layer]
        dw_ih, dw_hh, db = 0, 0, 0
        for s in range(xs.shape[1]):
            g = (e[:, s] if model.every_step else e) @ blocks
            delta = g * (1 - hs[s + 1] ** 2)
            dw_ih = dw_ih + delta.T @ xs[:, s]
            dw_hh = dw_hh + delta.T @ hs[s]
            db = db + delta.sum(0)
        want.update({f"cells.{layer}.weight_ih": dw_ih, f"cells.{layer}.weight_hh": dw_hh,
                     f"cells.{layer}.bias_ih": db, f"cells.{layer}.bias_hh": db})  # fmt: skip
    if model.every_step:
        want["head.weight"] = torch.einsum("ntc,nth->ch", e, seq)
        want["head.bias"] = e.sum((0, 1))
    else:
        want["head.weight"], want["head.bias"] = e.T @ top[-1], e.sum(0)
    return want


def explicit_gru(model: RecurrentNet, x: torch.Tensor, t: torch.Tensor, B: torch.Tensor):
    """DFA by hand for one GRU cell, ``h_{t-1}`` a constant: with ``g_t = e_t B``,
    ``dn = g (1 - z)``, ``dz = g (h_{t-1} - n)``, ``da_n = dn (1 - n^2)``, ``da_z = dz z (1 - z)``,
    ``da_r = da_n hn r (1 - r)``, ``d(hn) = da_n r``: ``dW_ih = sum_t [da_r, da_z, da_n]^T x_t``,
    ``dW_hh = sum_t [da_r, da_z, d(hn)]^T h_{t-1}``, the biases the same rows summed."""
    (cell,) = model.cells
    seq = model.sequence(x)
    h, steps = torch.zeros(N, H), []
    for s in range(seq.shape[1]):
        out = gru_step(cell, seq[:, s], h)
        steps.append((h, out))
        h = out["h"]
    hs = torch.stack([o["h"] for _, o in steps], 1)
    y = head(model, hs) if model.every_step else head(model, h)
    e = output_error(y, t)
    dw_ih, dw_hh, db_ih, db_hh = 0, 0, 0, 0
    for s, (prev, o) in enumerate(steps):
        g = (e[:, s] if model.every_step else e) @ B
        da_n = g * (1 - o["z"]) * (1 - o["n"] ** 2)
        da_z = g * (prev - o["n"]) * o["z"] * (1 - o["z"])
        da_r = da_n * o["hn"] * o["r"] * (1 - o["r"])
        d_hn = da_n * o["r"]
        gi, gh = torch.cat([da_r, da_z, da_n], 1), torch.cat([da_r, da_z, d_hn], 1)
        dw_ih, dw_hh = dw_ih + gi.T @ seq[:, s], dw_hh + gh.T @ prev
        db_ih, db_hh = db_ih + gi.sum(0), db_hh + gh.sum(0)
    return {"cells.0.weight_ih": dw_ih, "cells.0.weight_hh": dw_hh, "cells.0.bias_ih": db_ih,
            "cells.0.bias_hh": db_hh}  # fmt: skip


CASES = [
    ("rnn", 1, "dfa", "uniform"),
    ("rnn", 2, "dfa", "uniform"),
    ("rnn", 1, "bdfa", "uniform"),
    ("rnn", 2, "bdfa", "uniform"),
    ("rnn", 1, "dfa", "sparse"),
    ("gru", 1, "dfa", "uniform"),
    ("gru", 1, "bdfa", "uniform"),
]


@pytest.mark.parametrize("every_step", [False, True], ids=["last-step", "every-step"])
@pytest.mark.parametrize(("cell", "layers", "method", "init"), CASES)
def test_dfa_gradients_match_the_explicit_formulas(cell, layers, method, init, every_step):
    model = make(cell, layers=layers, every_step=every_step)
    x, t = batch(every_step)
    structure = SparsePattern(density=0.34) if init == "sparse" else init
    engine = dfatorch.attach(model, method, scope="all", init=structure, example_input=x)
    assert engine.feedback_layers == [f"cells.{i}" for i in range(layers)]
    got = grads(model, x, t)
    B = engine.feedback.matrix(torch.float64)
    assert B.shape == (C, layers * H)
    if method == "bdfa":  # binary: one magnitude per block
        for block in B.split(H, 1):
            assert torch.allclose(block.abs(), block.abs().max().expand_as(block))
    if init == "sparse":
        assert (B == 0).any()
    with torch.no_grad():
        want = (explicit_rnn if cell == "rnn" else explicit_gru)(model, x, t, B)
    assert want.keys() <= got.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-12, msg=name)


def test_lstm_state_and_cell_are_cut():
    """An LSTM cell's ``(h, c)`` both leave detached; ``h`` is the feedback point."""
    model = make("lstm")
    x, t = batch(False)
    dfatorch.attach(model, "dfa", scope="all")
    outputs = []
    model.cells[0].register_forward_hook(lambda m, a, out: outputs.append(out))
    grads(model, x, t)
    assert len(outputs) == T
    assert all(not o.requires_grad for out in outputs for o in out)


# -- the recurrent connection is cut ------------------------------------------------------------


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("every_step", [False, True], ids=["last-step", "every-step"])
def test_no_gradient_through_the_recurrent_weights(cell, every_step):
    """Every state receives exactly ``e_t B`` (last step: ``e B``): nothing from the next step
    (``W_hh^T delta_{t+1}``, an LSTM's ``c_t``) nor from the layer above (``W_ih^T``)."""
    model = make(cell, layers=2, every_step=every_step, steps=3)
    x, t = batch(every_step, steps=3)
    arrived: dict[tuple[int, int], torch.Tensor] = {}
    for layer, module in enumerate(model.cells):
        counter = itertools.count()

        def record(m, a, out, layer=layer, counter=counter):
            h = out[0] if isinstance(out, tuple) else out
            key = (layer, next(counter) % 3)  # step of this pass
            h.register_hook(lambda g, key=key: arrived.__setitem__(key, g))

        module.register_forward_hook(record)  # before attach: sees the un-detached state
    engine = dfatorch.attach(model, "dfa", scope="all")
    y = model(x)
    cross_entropy(y, t).backward()
    e = output_error(y.detach(), t)
    B = engine.feedback.matrix(torch.float64).split(H, 1)
    assert sorted(arrived) == [(i, s) for i in range(2) for s in range(3)]
    for (layer, s), g in arrived.items():
        want = (e[:, s] if every_step else e) @ B[layer]
        torch.testing.assert_close(g, want, rtol=0, atol=1e-15, msg=f"layer {layer} step {s}")
    # the same model by BPTT: the states receive more than that (so the check above can fail)
    arrived.clear()
    with engine.disabled():
        cross_entropy(model(x), t).backward()
    assert not torch.allclose(arrived[(0, 0)], e[:, 0] @ B[0] if every_step else e @ B[0])


def test_the_steps_are_projected_by_one_matmul(monkeypatch):
    calls = []
    signal = FeedbackMatrix.signal

    def counted(self, error, like=None):
        calls.append(tuple(error.shape))
        return signal(self, error, like)

    monkeypatch.setattr(FeedbackMatrix, "signal", counted)
    for every_step in (False, True):
        calls.clear()
        model = make("gru", layers=2, every_step=every_step, steps=4)
        x, t = batch(every_step, steps=4)
        dfatorch.attach(model, "dfa", scope="all")
        grads(model, x, t)
        assert calls == [(N * 4, C) if every_step else (N, C)]  # 8 points, one (C, 2H) product


# -- BPTT ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("every_step", [False, True], ids=["last-step", "every-step"])
def test_bptt_equals_plain_autograd_exactly(cell, every_step):
    plain = make(cell, layers=2, every_step=every_step, steps=3)
    hooked = copy.deepcopy(plain)
    engine = dfatorch.attach(hooked, "bp", scope="all")
    assert engine.feedback_layers == []
    x, t = batch(every_step, steps=3)
    want, got = grads(plain, x, t), grads(hooked, x, t)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # and a DFA engine inside disabled(): plain BPTT too
    other = copy.deepcopy(plain)
    dfa = dfatorch.attach(other, "dfa", scope="all")
    with dfa.disabled():
        again = grads(other, x, t)
    for name in want:
        assert torch.equal(again[name], want[name]), name


def test_mixed_rules_bptt_below_dfa_above():
    """A recurrent layer under 'bp' below a DFA one: the lower layer gets the upper layer's
    ``e_t B`` back-propagated through time (its states are not cut), the upper one is cut."""
    model = make("rnn", layers=2, steps=3)
    x, t = batch(False, steps=3)
    engine = dfatorch.attach(model, "dfa", scope="all", rules={"cells.0": "bp"})
    assert engine.feedback_layers == ["cells.1"]
    got = grads(model, x, t)
    with torch.no_grad():
        B = engine.feedback.matrix(torch.float64)
    seq = model.sequence(x)
    h0, hs = torch.zeros(N, H), []
    for s in range(3):  # layer 0 by autograd (BPTT), layer 1 by hand
        h0 = rnn_step(model.cells[0], seq[:, s], h0)
        hs.append(h0)
    with torch.no_grad():
        h1, ups = torch.zeros(N, H), []
        for s in range(3):
            ups.append((h1, rnn_step(model.cells[1], hs[s], h1)))
            h1 = ups[-1][1]
        e = output_error(head(model, h1), t)
    surrogate = sum(((e @ B) * (1 - new**2) * (hs[s] @ model.cells[1].weight_ih.T)).sum()
                    for s, (_, new) in enumerate(ups))  # fmt: skip
    want = torch.autograd.grad(surrogate, model.cells[0].weight_hh)[0]
    torch.testing.assert_close(got["cells.0.weight_hh"], want, rtol=1e-10, atol=1e-12)


# -- refusals ------------------------------------------------------------------------------------


def test_variable_lengths_are_refused():
    class Shrinking(nn.Module):  # packed-sequence style: fewer sequences at every step
        def __init__(self):
            super().__init__()
            self.cell, self.head = nn.RNNCell(F_IN, H), nn.Linear(H, C)

        def forward(self, x):
            h = None
            for s in range(x.shape[1]):
                h = self.cell(x[: N - s, s], None if h is None else h[: N - s])
            return self.head(h)

    model = Shrinking()
    dfatorch.attach(model, "dfa", scope="all")
    with pytest.raises(ValueError, match=r"variable-length sequences .* not supported"):
        model(torch.randn(N, 3, F_IN))
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(N, 3, F_IN), [3, 3, 2, 2, 1],
                                               batch_first=True)  # fmt: skip
    with pytest.raises(TypeError, match=r"variable-length sequences .* not supported"):
        make("gru")(packed)


def test_feedforward_layers_still_run_once():
    class PerStepLinear(nn.Module):  # a linear layer called per step is not a recurrent cell
        def __init__(self):
            super().__init__()
            self.enc, self.a, self.b = nn.Linear(F_IN, F_IN), nn.Linear(F_IN, H), nn.Linear(H, C)

        def forward(self, x):
            x = torch.tanh(self.enc(x))
            return self.b(torch.stack([self.a(x[:, s]) for s in range(x.shape[1])]).mean(0))

    model = PerStepLinear()
    dfatorch.attach(model, "dfa", scope="all")
    with pytest.raises(RuntimeError, match=r"only a recurrent cell.* may run again"):
        model(torch.randn(N, 3, F_IN))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "fa"}, "recurrent layer 'cells.0' takes dfa, bdfa or bp, not 'fa'"),
        ({"method": "dkp"}, "takes dfa, bdfa or bp"),
        ({"method": "dfa", "scope": "module", "modules": ["cells.0"]}, "scope='module'"),
    ],
)
def test_unsupported_rules_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dfatorch.attach(make("rnn", layers=2), scope=kwargs.pop("scope", "all"), **kwargs)


def test_recurrent_layer_above_a_dfa_layer_is_refused():
    model = nn.Sequential(nn.Linear(F_IN, F_IN), nn.RNNCell(F_IN, H), nn.Linear(H, C))
    with pytest.raises(ValueError, match="must be recurrent or 'bp'"):
        dfatorch.attach(model, "dfa", scope="all")


def test_sequence_output_needs_every_step():
    class Skipping(RecurrentNet):  # a head on every other step: steps and outputs disagree
        def forward(self, x):
            seq, (cell,), h, out = self.sequence(x), self.cells, None, []
            for s in range(seq.shape[1]):
                h = cell(seq[:, s], h)
                out.append(h)
            return self.head(torch.stack(out[::2], 1))

    model = Skipping((1, 4, F_IN), C, cell="rnn", hidden_size=H)
    dfatorch.attach(model, "dfa", scope="all")
    with pytest.raises(ValueError, match="ran 4 steps but the output has 2"):
        model(torch.randn(N, 1, 4, F_IN))


def test_alignment_probes_are_refused():
    engine = dfatorch.attach(make("rnn"), "dfa", scope="all")
    with pytest.raises(ValueError, match="one per time step"), engine.recording():
        pass


# -- data ----------------------------------------------------------------------------------------


def test_text_windows_and_vocabulary(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcabcabcd" * 10 + "xyz", encoding="utf-8")
    splits = load_text(path, 4)
    assert splits.train.classes == tuple("abcdxyz") and splits.per_step
    assert splits.input_shape == (1, 4, 1)
    split = int(103 * 0.9)
    assert len(splits.train) == (split - 1) // 4 and len(splits.test) == (103 - split - 1) // 4
    ids = splits.train.images[:, 0, :, 0].long()
    assert torch.equal(ids[:, 1:], splits.train.labels[:, :-1])  # the label is the next one
    assert torch.equal(ids[1:, 0], splits.train.labels[:-1, -1])
    text = "".join(splits.train.classes[i] for i in ids[0].tolist())
    assert text == "abca"
    # the loader's normalisation gives back the ids, which the model reads as one-hot
    loader = dfatorch.data.BatchLoader(splits.train, 8, shuffle=False, augment=False,
                                       mean=splits.mean, std=splits.std, seed=0)  # fmt: skip
    x, y = next(iter(loader))
    x = x.double()
    model = build_model("gru", splits.input_shape, 7, tokens=7, every_step=True)
    assert torch.equal(model.sequence(x).argmax(-1), ids[:8])
    assert model(x).shape == (8, 4, 7) and y.shape == (8, 4)


def test_text_errors(tmp_path):
    with pytest.raises(DataError, match="text file not found"):
        load_dataset("text", text_file=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="needs a text file"):
        load_dataset("text")
    with pytest.raises(DataError, match="tinyshakespeare not found"):
        load_dataset("tinyshakespeare", tmp_path)
    wide = tmp_path / "wide.txt"
    wide.write_text("".join(chr(0x400 + i) for i in range(300)), encoding="utf-8")
    with pytest.raises(DataError, match="300 distinct characters"):
        load_text(wide, 4)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model": "mlp", "hidden_size": 8}, "hidden_size applies to the recurrent models"),
        ({"model": "lstm", "num_layers": 0}, "num_layers must be >= 1"),
        ({"dataset": "mnist", "permute": True}, "permute applies to seq-mnist"),
        ({"dataset": "seq-mnist", "seq_len": 5}, "seq_len applies to the text datasets"),
        ({"dataset": "text"}, "text_file and dataset=text go together"),
        ({"dataset": "tinyshakespeare", "model": "mlp"}, "needs a recurrent model"),
        ({"model": "gru", "method": "kp"}, "trains by bp, dfa or bdfa"),
        ({"model": "gru", "align_every": 5}, "align_every is not supported"),
    ],
)
def test_config_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields)


@pytest.mark.data
def test_seq_mnist_shapes_and_permutation():
    if not MNIST_DIR.is_dir():
        pytest.skip(f"{MNIST_DIR} not found")
    rows = load_dataset("seq-mnist", SHARED)
    pixels = load_dataset("seq-mnist", SHARED, permute=True)
    assert rows.name == "seq-mnist" and rows.input_shape == (1, 28, 28)
    assert pixels.input_shape == (1, 784, 1) and len(pixels.test) == 10_000
    assert torch.equal(rows.train.labels, pixels.train.labels)
    order = torch.randperm(784, generator=torch.Generator().manual_seed(PERMUTATION_SEED))
    for split in ("train", "test"):  # one fixed permutation for both splits
        flat = getattr(rows, split).images[:50].reshape(50, 784)
        assert torch.equal(getattr(pixels, split).images[:50].reshape(50, 784), flat[:, order])
    model = build_model("lstm", pixels.input_shape, 10, hidden_size=8)
    assert model.sequence(pixels.train.images[:2].double()).shape == (2, 784, 1)


@pytest.mark.data
def test_tinyshakespeare():
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not found")
    splits = load_dataset("tinyshakespeare", SHARED, seq_len=100)
    assert splits.num_classes == 65 and splits.input_shape == (1, 100, 1)
    assert len(splits.train) == (int(1_115_394 * 0.9) - 1) // 100


# -- training ------------------------------------------------------------------------------------


def test_cli_trains_a_character_model(tmp_path, capsys):
    from dfatorch.cli import main

    torch.set_default_dtype(torch.float32)  # as a user runs it
    path = tmp_path / "text.txt"
    path.write_text("to be or not to be, that is the question. " * 40, encoding="utf-8")
    out = tmp_path / "run"
    main(["train", "--dataset", "text", "--text-file", str(path), "--model", "gru",
          "--method", "dfa", "--hidden-size", "16", "--seq-len", "20", "--epochs", "2",
          "--batch-size", "8", "--lr", "0.01", "--out", str(out), "--no-progress",
          "--device", "cpu"])  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    last = records[-1]
    assert last["test_bpc"] == pytest.approx(last["test_loss"] / math.log(2))
    assert last["test_bpc"] < math.log2(len(set(path.read_text())))  # below uniform guessing
    assert last["train_loss"] < records[0]["train_loss"]


@pytest.mark.data
@pytest.mark.slow
def test_cli_trains_lstm_on_seq_mnist(tmp_path):
    if not MNIST_DIR.is_dir():
        pytest.skip(f"{MNIST_DIR} not found")
    from dfatorch.cli import main

    torch.set_default_dtype(torch.float32)  # as a user runs it
    out = tmp_path / "run"
    main(["train", "--dataset", "seq-mnist", "--data-dir", str(SHARED), "--model", "lstm",
          "--method", "dfa", "--hidden-size", "32", "--fraction", "0.01", "--epochs", "1",
          "--out", str(out), "--no-progress", "--device", "cpu"])  # fmt: skip
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["test_acc"] is not None and math.isfinite(record["train_loss"])


def test_interleaved_stacks_are_refused():
    """Step by step through the stack (cell 0, cell 1, cell 0, ...) would restart the pass at
    every step and lose the earlier steps' points: refused."""

    class Interleaved(RecurrentNet):
        def forward(self, x):
            seq, states = self.sequence(x), [None] * len(self.cells)
            for s in range(seq.shape[1]):
                inp = seq[:, s]
                for i, cell in enumerate(self.cells):
                    states[i] = inp = cell(inp, states[i])
            return self.head(inp)

    model = Interleaved((1, 3, F_IN), C, cell="rnn", hidden_size=H, layers=2)
    dfatorch.attach(model, "dfa", scope="all")
    with pytest.raises(RuntimeError, match="must run layer by layer"):
        model(torch.randn(N, 1, 3, F_IN))
