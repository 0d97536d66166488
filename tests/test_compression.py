"""Saved activations at 8/4 bits: the code's round trip, the hooks' byte accounting and gradients,
composition with the DFA engine, the trainer option and exact resume."""

from __future__ import annotations

import contextlib
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfatorch
from dfatorch import compression
from dfatorch.compression import (
    ActivationCompression,
    compressed_activations,
    dequantize,
    pack_nibbles,
    per_channel,
    quantize,
    unpack_nibbles,
)
from dfatorch.train import TrainConfig, load_checkpoint, train

TIMING = {"epoch_seconds", "images_per_second"}


def _bin_width(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-channel (dim 1) bin width, or one for the tensor when its channels are small; the
    range widened to contain 0 (as the code's documentation says)."""
    dims = [d for d in range(x.ndim) if d != 1] if per_channel(x) else list(range(x.ndim))
    lo = x.amin(dim=dims, keepdim=True).clamp(max=0)
    hi = x.amax(dim=dims, keepdim=True).clamp(min=0)
    return (hi - lo) / (2**bits - 1)


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_within_half_a_bin_sign_and_relu_zeros_exact(bits):
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([1e-3, 0.1, 1.0, 30.0], dtype=torch.float64).repeat(2)
    x = torch.randn(16, 8, 5, 7, generator=g, dtype=torch.float64) * scales.view(1, 8, 1, 1)
    x[:, 1] = torch.relu(x[:, 1])  # a ReLU output: many exact zeros, no negatives
    x[:, 2] = x[:, 2].abs() + 5.0  # all positive, far from 0
    x[:, 3] = -x[:, 3].abs()  # all negative
    x[:, 4] = 0.0  # an all-zero channel
    x[:, 7] *= 1e4  # a wide channel: the bin is wider than 1, and
    x[0, 7, 0, 0], x[1, 7, 0, 0] = 5e-324, -5e-324  # x / bin underflows to 0: the sign must hold
    for layout in (x, x.contiguous(memory_format=torch.channels_last)):
        y = dequantize(quantize(layout, bits))
        assert y.shape == x.shape and y.dtype == x.dtype and y.stride() == layout.stride()
        err = (y - x).abs() / _bin_width(x, bits).clamp(min=1e-300)
        assert err.max() <= 0.5 + 1e-9
        assert torch.equal(y > 0, x > 0)  # ReLU's mask (result > 0) survives exactly
        assert torch.equal(y[:, 1][x[:, 1] == 0], torch.zeros_like(y[:, 1][x[:, 1] == 0]))
        assert torch.equal(y[:, 4], x[:, 4])
    assert per_channel(x)
    # fewer than two dims, or small channels (a linear layer's (N, features)): one range
    for other in (torch.randn(5000, generator=g, dtype=torch.float64),
                  torch.relu(torch.randn(64, 100, generator=g, dtype=torch.float64))):  # fmt: skip
        assert not per_channel(other)
        y = dequantize(quantize(other, bits))
        width = (other.max() - other.min().clamp(max=0)) / (2**bits - 1)
        assert ((y - other).abs() / width).max() <= 0.5 + 1e-9 and torch.equal(y > 0, other > 0)


@pytest.mark.parametrize("bits", [8, 4])
def test_chunked_code_equals_one_piece(bits, monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4, 9, 9, generator=g).contiguous(memory_format=torch.channels_last)
    whole = quantize(x, bits)
    monkeypatch.setattr(compression, "CHUNK_NUMEL", 1)  # one row a chunk
    pieces = quantize(x, bits)
    assert torch.equal(whole.codes, pieces.codes)
    back = dequantize(pieces)
    monkeypatch.setattr(compression, "CHUNK_NUMEL", 1 << 30)
    assert torch.equal(back, dequantize(whole))


@pytest.mark.parametrize("numel", [1, 2, 999, 1000])
def test_four_bit_packing_is_exact(numel):
    g = torch.Generator().manual_seed(numel)
    codes = torch.randint(0, 16, (numel,), generator=g).to(torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 1) // 2
    assert torch.equal(unpack_nibbles(packed, numel), codes)
    assert packed[0] & 15 == codes[0]  # low nibble first
    if numel > 1:
        assert packed[0] >> 4 == codes[1]


@pytest.mark.parametrize("bits", [8, 4])
def test_bytes_match_a_hand_count_on_a_two_layer_model(bits):
    # Linear(64, 32) -> ReLU -> Linear(32, 10) on a batch of 64, loss = sum of the outputs.
    # Autograd saves: addmm 1: x (64x64) for weight1's gradient (weight1.t() is not saved: x needs
    # no gradient); ReLU: its output h (64x32); addmm 2: h again, and weight2.t() for h's
    # gradient; sum: nothing. So x and h are quantised (h once), one parameter view is saved by
    # reference and nothing else is saved.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    x = torch.randn(64, 64)
    with compressed_activations(bits) as stats:
        model(x).sum().backward()
    codes = (64 * 64 + 64 * 32) * bits // 8
    ranges = 2 * 2 * 4  # lo and hi (float32) per tensor: 64 examples < 512 a channel
    assert stats.compressed_tensors == 2 and stats.shared == 1 and stats.parameters == 1
    assert stats.kept_tensors == 0 and stats.kept_bytes == 0
    assert stats.float_bytes == 4 * (64 * 64 + 64 * 32)
    assert stats.stored_bytes == codes + ranges
    assert stats.ratio == pytest.approx(4 * (64 * 64 + 64 * 32) / (codes + ranges))


def _tiny_convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
        nn.Flatten(), nn.Linear(64, 10),
    ).double()  # fmt: skip


def _grads(model, x, y, **compression):
    model.zero_grad(set_to_none=True)
    context = compressed_activations(**compression) if compression else contextlib.nullcontext()
    with context as stats:
        F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, stats


def test_convnet_gradients_close_under_8_bits_and_identical_where_left_alone():
    model = _tiny_convnet()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (8,), generator=g)
    exact, _ = _grads(model, x, y)
    approx, stats = _grads(model, x, y, bits=8)
    # x, both ReLU outputs and the first pool's output are quantised (the fused max-pools save
    # no input); the second pool's flattened output (8 x 64 = 512 < 1024) is kept exact
    assert stats.compressed_tensors == 4 and stats.skipped_bytes == 0
    # each max-pool's int64 indices as positions in their windows: 2 bits for the first's 2x2
    # (8x8x8x8), 4 bits for the second's 4x4 (8x16x2x2)
    assert stats.integer_tensors == 2 and stats.integer_bytes == 8 * (4096 + 512)
    assert stats.integer_stored_bytes == 4096 // 4 + 512 // 2
    assert stats.float_bytes == 8 * 8 * (3 * 256 + 8 * 256 + 8 * 64 + 16 * 64)  # float64
    for name in ("0.weight", "3.weight"):
        cos = F.cosine_similarity(exact[name].flatten(), approx[name].flatten(), dim=0)
        assert cos >= 0.99, (name, cos)
        assert not torch.equal(exact[name], approx[name])  # it did quantise
    # the errors delta flow back through weights, pooling indices and ReLU masks only, all
    # exact (the masks because the code keeps signs): the bias gradients are bit-identical
    assert torch.equal(exact["0.bias"], approx["0.bias"])
    assert torch.equal(exact["3.bias"], approx["3.bias"])
    # the linear layer's gradients use only the kept tensor and the exact output error
    assert torch.equal(exact["7.weight"], approx["7.weight"])
    assert torch.equal(exact["7.bias"], approx["7.bias"])
    # nothing above min_numel: every gradient bit-identical
    same, stats = _grads(model, x, y, bits=4, min_numel=10**9)
    assert stats.compressed_tensors == stats.integer_tensors == 0 and stats.kept_tensors > 0
    assert all(torch.equal(exact[n], same[n]) for n in exact)


def test_composes_with_the_bdfa_hybrid():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(8 * 8 * 8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10),
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    engine = dfatorch.attach(model, "bdfa", scope="fc", seed=0)
    assert engine.feedback_layers  # the graph is cut at the DFA layers
    exact, _ = _grads(model, x, y)
    approx, stats = _grads(model, x, y, bits=8)
    assert stats.compressed_tensors >= 3
    for name, grad in exact.items():
        cos = F.cosine_similarity(grad.flatten(), approx[name].flatten(), dim=0)
        assert cos >= 0.99, (name, cos)
        assert (approx[name] - grad).norm() <= 0.1 * grad.norm(), name


@pytest.mark.parametrize("bits", [16, 32, 0, 1, True, "8"])
def test_bad_bits_are_one_line_errors(bits):
    with (
        pytest.raises(ValueError, match=r"^bits must be 8 or 4, got") as info,
        compressed_activations(bits),
    ):
        pass
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        ActivationCompression(bits)
    with pytest.raises(ValueError, match="activation_bits"):
        TrainConfig(activation_bits=16)


def test_resume_under_4_bit_storage_is_exact(tmp_path, monkeypatch):
    fast = dict(dataset="digits", model="mlp", activation="relu", batch_size=32, epochs=2)
    config = TrainConfig(**fast, method="bdfa", scope="all", activation_bits=4, dropout=0.2)
    exact = train(TrainConfig(**{**config.to_dict(), "activation_bits": 32}), tmp_path / "f32",
                  progress=False).history  # fmt: skip
    reference = train(config, tmp_path / "ref", progress=False).history
    saved = reference[-1]["saved_activations"]
    assert saved["bits"] == 4 and 7 < saved["float_bytes"] / saved["stored_bytes"] < 8
    assert reference[-1]["train_loss"] != exact[-1]["train_loss"]  # the option is in effect

    calls = {"n": 0}
    real = torch.nn.functional.cross_entropy

    def interrupting(logits, target, *args, **kwargs):
        if not kwargs and not args:  # training steps; evaluation passes reduction="sum"
            calls["n"] += 1
            if calls["n"] == 60:  # epoch 2 of 45 batches, mid-way: a real Ctrl-C
                os.kill(os.getpid(), signal.SIGINT)
        return real(logits, target, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", interrupting)
    stopped = train(config, tmp_path / "run", progress=False)
    assert stopped.interrupted and len(stopped.history) == 1
    assert (load_checkpoint(tmp_path / "run" / "checkpoint.pt")["batch"]) == 15
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", real)
    resumed = train(None, tmp_path / "run", resume=True, progress=False)

    def strip(history):
        return [{k: v for k, v in h.items() if k not in TIMING} for h in history]

    assert strip(resumed.history) == strip(reference)


def test_cli_flag_reaches_the_run(tmp_path):
    from dfatorch.cli import main

    out = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--model", "mlp", "--width", "0.5", "--epochs", "1",
            "--activation-bits", "8", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    record = dfatorch.train.read_metrics(out)[-1]
    assert record["saved_activations"]["bits"] == 8


def test_report_renders_the_benchmark_json(tmp_path):
    import json

    from dfatorch.report import _activation_memory_section

    row32 = {"peak_rss_mib": 700.0, "step_rss_increase_mib": 300.0, "saved_bytes": 4 * 2**20}
    row8 = {**row32, "step_rss_increase_mib": 150.0, "saved_bytes": 2**20, "saved_ratio": 4.0,
            "quantised_ratio": 3.99, "step_rss_increase_vs_float32": 0.5}  # fmt: skip
    timing = {"32": {"ms_median": 100.0, "ratio_to_float32": 1.0},
              "8": {"ms_median": 120.0, "ratio_to_float32": 1.2},
              "4": {"ms_median": 130.0, "ratio_to_float32": 1.3}}  # fmt: skip
    data = {
        "command": "python benchmarks/activation_memory.py",
        "config": {"device": "cpu", "rounds": 5, "warmup": 1},
        "machine": {"processor": "cpu", "threads": 1, "torch": "2"},
        "rules": {"bp": {"method": "bp"}},
        "memory": {"small_cnn": {"512": {"bp": {"32": row32, "8": row8}}}},
        "step_time": {"small_cnn": {"batch": 128, "bp": timing}},
    }
    path = tmp_path / "activation_memory.json"
    path.write_text(json.dumps(data))
    text = "\n".join(_activation_memory_section(path))
    assert "| small_cnn | 512 | bp | 8 | 1.0 | 4.00 | 3.99 | 150 | 0.50 |" in text
    assert "| small_cnn | 128 | bp | 100 | 120 (1.20) | 130 (1.30) |" in text
    assert _activation_memory_section(tmp_path / "missing.json") == []


def test_a_tensor_saved_twice_is_decoded_once(monkeypatch):
    calls = []
    real = compression.dequantize
    monkeypatch.setattr(compression, "dequantize", lambda p: calls.append(p) or real(p))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    x = torch.randn(64, 64)
    with compressed_activations(8):
        model(x).sum().backward()
    # x once (the first addmm), h once for ReLU's backward and the second addmm's
    assert len(calls) == 2 and len({id(p) for p in calls}) == 2
    assert all(p.cache is None and p.uses == 0 for p in calls)  # the copies are let go


POOLS = [  # (kernel, stride, padding, dilation, ceil_mode, bits a window position)
    (2, 2, 0, 1, False, 2),  # small_cnn's
    (3, 2, 0, 1, False, 4),  # Nøkland's: overlapping windows
    (3, 2, 1, 1, True, 4),
    ((2, 3), (1, 2), (1, 0), (2, 1), False, 4),
    (4, 4, 0, 1, False, 4),
    (1, 1, 0, 1, False, 1),
]


@pytest.mark.parametrize("chunk", [1, 1 << 18])
@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "ceil_mode", "bits"), POOLS)
def test_fused_max_pool_is_exact_and_stores_window_positions(
    kernel, stride, padding, dilation, ceil_mode, bits, chunk, monkeypatch
):
    monkeypatch.setattr(compression, "CHUNK_NUMEL", chunk)  # chunk: one row at a time, or all
    g = torch.Generator().manual_seed(3)
    # integer values: many ties, so the first maximum of a window must be the one kept
    x = torch.randint(-3, 4, (5, 3, 11, 13), generator=g).double().requires_grad_()
    pool = nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil_mode)
    grad = torch.randn(pool(x).shape, generator=g, dtype=torch.float64)
    exact = torch.autograd.grad(pool(x), x, grad)[0]
    with compressed_activations(4, min_numel=0) as stats:
        out = pool(x)
    assert type(out.grad_fn).__name__ == "_MaxPool2dBackward"  # the fused op
    assert torch.equal(out, pool(x).detach())
    assert torch.equal(torch.autograd.grad(out, x, grad)[0], exact)  # bit for bit
    assert stats.integer_tensors == 1 and stats.integer_bytes == 8 * out.numel()
    assert stats.integer_stored_bytes == -(-out.numel() * bits // 8)
    assert stats.skipped_bytes == x.numel() * 8  # x itself is saved by nothing else
    assert stats.compressed_tensors == 0
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(out, x, grad)


def _act_net(activation: type[nn.Module]) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), activation(), nn.MaxPool2d(3, 2),
        nn.Conv2d(8, 16, 3, padding=1), activation(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(144, 64), activation(), nn.Linear(64, 10),
    ).double()  # fmt: skip


@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU])
@pytest.mark.parametrize("bits", [8, 4])
def test_fused_ops_give_the_hooks_gradients_bit_for_bit(activation, bits, monkeypatch):
    model = _act_net(activation)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 3, 14, 14, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (24,), generator=g)
    hooks_only, plain = _grads(model, x, y, bits=bits, min_numel=256, fused=False)
    decoded = []
    real = compression.dequantize
    monkeypatch.setattr(compression, "dequantize", lambda p: decoded.append(p.shape) or real(p))
    monkeypatch.setattr(compression, "CHUNK_NUMEL", 1000)  # several chunks a tensor
    fused, stats = _grads(model, x, y, bits=bits, min_numel=256)
    assert all(torch.equal(hooks_only[n], fused[n]) for n in fused)
    # the same tensors are quantised (the pools' inputs were shared with the activations)
    assert stats.float_bytes == plain.float_bytes and stats.stored_bytes == plain.stored_bytes
    assert stats.exact_bytes == plain.exact_bytes and stats.skipped_bytes == 0
    assert stats.integer_stored_bytes < plain.integer_stored_bytes
    # decoded whole: x and the first pool's output (the convs' inputs), the flattened second
    # pool's output (the first linear layer's) and the hidden activation (the second linear layer
    # decodes it, the fused activation reuses that copy); the conv activations' outputs only
    # chunk by chunk, never whole
    assert sorted(decoded) == [(24, 3, 14, 14), (24, 8, 6, 6), (24, 64), (24, 144)]


def test_fused_activation_sees_an_inplace_change():
    x = torch.randn(4, 300, dtype=torch.float64, requires_grad=True)
    with compressed_activations(8, min_numel=0):
        h = torch.tanh(x)
        h.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            h.sum().backward()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(16, 4, 6, 6), (64, 24)])
def test_fused_batch_norm_backward_is_the_exact_formula_on_a_lossless_x_hat(shape, bits):
    # each channel holds 1 and 5 in equal numbers: mean 3, std 2, so x_hat = +-c (c = 2 /
    # sqrt(4 + eps)), which both codes store without loss (the ends of the channel's range): the
    # fused backward must equal the native one
    g = torch.Generator().manual_seed(4)
    channels = shape[1]
    signs = torch.stack([torch.randperm(math.prod(shape) // channels, generator=g) % 2
                         for _ in range(channels)], dim=1)  # fmt: skip
    x0 = (1.0 + 4.0 * signs.double()).reshape(shape[0], *shape[2:], channels).movedim(-1, 1)
    x0 = x0.contiguous()
    weight = torch.randn(shape[1:2] + (1,) * (len(shape) - 2), generator=g, dtype=torch.float64)
    bias = torch.randn(channels, generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    results = []
    for context in (contextlib.nullcontext(), compressed_activations(bits, min_numel=0)):
        bn = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(channels).double()
        with torch.no_grad():
            bn.weight.copy_(weight.flatten())
            bn.bias.copy_(bias)
        x = x0.clone().requires_grad_()
        with context as stats:
            out = bn(x)
        (out * dy).sum().backward()  # dy itself exact: the loss is outside the context
        results.append((out.detach(), bn.running_mean, bn.running_var, x.grad, bn.weight.grad,
                        bn.bias.grad, out.grad_fn))  # fmt: skip
    (out0, rm0, rv0, *grads0, fn0), (out1, rm1, rv1, *grads1, fn1) = results
    assert type(fn1).__name__ == "_BatchNormBackward" and type(fn0).__name__ != type(fn1).__name__
    assert torch.equal(out0, out1) and torch.equal(rm0, rm1) and torch.equal(rv0, rv1)
    for exact, fused in zip(grads0, grads1):
        torch.testing.assert_close(fused, exact, rtol=1e-10, atol=1e-12)
    assert stats.compressed_tensors == 1 and stats.float_bytes == x0.numel() * 8


def test_fused_batch_norm_codes_x_hat_finer_than_its_input():
    # channels far from 0 (mean 20, std 1): the input's code must reach 0 (bins of about 24/15
    # standard deviations), x_hat's is centred (bins of about 8/15)
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
    model = model.double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 8, 8, 8, generator=g, dtype=torch.float64) + 20.0
    y = torch.randint(0, 10, (64,), generator=g)
    exact, _ = _grads(model, x, y)
    cos = {}
    for fused in (False, True):
        approx, _ = _grads(model, x, y, bits=4, fused=fused)
        cos[fused] = F.cosine_similarity(exact["0.weight"], approx["0.weight"], dim=0).item()
    assert cos[True] >= 0.99 > cos[False], cos


@pytest.mark.parametrize("bits", [8, 4])
def test_fused_batch_norm_clips_x_hat_to_three_at_4_bits_only(bits):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(32, 4, 8, 8, generator=g, dtype=torch.float64)
    x[0, :, 0, 0] = 50.0  # x_hat about 5.6: beyond the clip
    bn = nn.BatchNorm2d(4).double()
    with compressed_activations(bits, min_numel=0):
        out = bn(x)
    saved = out.grad_fn.saved  # the fused op's stored x_hat
    assert (saved.lo > -3).all()  # the low ends are inside the clip either way
    if bits == 4:
        assert torch.equal(saved.hi.flatten(), torch.full((4,), 3.0, dtype=torch.float64))
    else:
        assert (saved.hi > 5).all()
