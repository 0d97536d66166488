"""Tests of the MDNet-style tracker: samplers, RoI features, rules, determinism, real data."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dfatorch import attach
from dfatorch._io import CheckpointError
from dfatorch.models import build_model, conv_features
from dfatorch.tracking import iou, load_sequence, run_sequence
from dfatorch.tracking.features import FeatureExtractor, FeatureMap, load_backbone, roi_align
from dfatorch.tracking.run import _check_provenance, evaluate_updates, track_sequence
from dfatorch.tracking.sampling import clip_boxes, sample_boxes
from dfatorch.tracking.tracker import (
    PHASES,
    BoxRegressor,
    MDNetTracker,
    TrackerConfig,
    UniformDropout,
    _clip_grad_norm,
    _forward_replaced,
    _mined_logits,
    _Rows,
    _SampleStore,
    build_head,
)

OTB_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "otb"

#: a small, fast configuration for synthetic sequences
SMALL = TrackerConfig(
    fc_sizes=(64, 64),
    n_pos_init=100,
    n_neg_init=400,
    maxiter_init=10,
    n_pos_update=20,
    n_neg_update=60,
    maxiter_update=3,
    batch_neg_cand=192,
    n_samples=64,
    n_bbreg=200,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: these tests run many tiny ops, which a busy machine's thread
    contention slows down tenfold at two threads. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(None, seed=0)


def _scene(t: int, size: tuple[int, int] = (120, 160)) -> tuple[np.ndarray, tuple]:
    """Frame ``t`` of a synthetic video: a checkered square moving right over smooth noise."""
    h, w = size
    g = np.random.default_rng(123)
    background = g.integers(60, 120, (h // 8 + 1, w // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)
    image = background[:h, :w].astype(np.uint8).copy()
    x, y, s = 30 + 3 * t, 40, 28
    yy, xx = np.mgrid[0:s, 0:s]
    checker = ((yy // 7 + xx // 7) % 2).astype(bool)
    patch = np.where(checker[..., None], [250, 40, 40], [20, 20, 230]).astype(np.uint8)
    image[y : y + s, x : x + s] = patch
    return image, (float(x), float(y), float(s), float(s))


# -- samplers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "trans", "scale", "iou_range"),
    [
        ("gaussian", 0.1, 1.3, (0.7, 1.0)),
        ("uniform", 2.0, 1.3, (0.0, 0.3)),
        ("uniform", 1.0, 1.6, (0.0, 0.3)),
        ("whole", 0.0, 1.6, (0.0, 0.3)),
        ("uniform", 0.3, 1.6, (0.6, 1.0)),
    ],
)
def test_sampler_respects_iou_range_and_bounds(kind, trans, scale, iou_range):
    box = np.array([100.0, 60.0, 40.0, 50.0])
    bounds = (0.0, 0.0, 320.0, 240.0)
    boxes = sample_boxes(
        np.random.default_rng(0),
        box,
        500,
        kind=kind,
        trans=trans,
        scale=scale,
        bounds=bounds,
        iou_range=iou_range,
    )
    assert boxes.shape == (500, 4)
    overlap = iou(boxes, box)
    assert overlap.min() >= iou_range[0] and overlap.max() <= iou_range[1]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 0] + boxes[:, 2] <= 320 + 1e-9).all()
    assert (boxes[:, 1] + boxes[:, 3] <= 240 + 1e-9).all()
    assert (boxes[:, 2:] >= 10).all()
    assert len(np.unique(boxes, axis=0)) > 400  # a spread, not one box repeated


def test_sampler_spread_follows_trans_and_scale():
    box = np.array([200.0, 200.0, 40.0, 40.0])
    bounds = (0.0, 0.0, 1000.0, 1000.0)
    boxes = sample_boxes(
        np.random.default_rng(1), box, 4000, kind="uniform", trans=1.0, scale=1.5, bounds=bounds
    )
    centre = boxes[:, :2] + boxes[:, 2:] / 2
    offset = (centre - 220.0) / 40.0  # in units of mean(w, h)
    assert np.abs(offset).max() <= 1.0 + 1e-9 and np.abs(offset).max() > 0.95
    ratio = np.log(boxes[:, 2] / 40.0) / np.log(1.5)
    assert np.abs(ratio).max() <= 1 + 1e-9 and np.abs(ratio).max() > 0.95
    np.testing.assert_allclose(boxes[:, 2], boxes[:, 3])  # aspect 1: shape kept


def test_clip_boxes_keeps_size_and_shifts_inside():
    boxes = np.array([[-5.0, -5.0, 20.0, 10.0], [90.0, 45.0, 20.0, 10.0], [0, 0, 500, 30]])
    out = clip_boxes(boxes, (0.0, 0.0, 100.0, 50.0))
    np.testing.assert_allclose(out, [[0, 0, 20, 10], [80, 40, 20, 10], [0, 0, 100, 30]])


def test_sampler_is_deterministic_in_its_generator():
    box = (50.0, 50.0, 30.0, 30.0)
    kw = dict(kind="gaussian", trans=0.6, scale=1.05, bounds=(0.0, 0.0, 200.0, 200.0))
    a = sample_boxes(np.random.default_rng(7), box, 64, **kw)
    b = sample_boxes(np.random.default_rng(7), box, 64, **kw)
    c = sample_boxes(np.random.default_rng(8), box, 64, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# -- RoI features ----------------------------------------------------------------------------


def test_roi_align_matches_crop_and_resize_for_an_axis_aligned_box():
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(1, 5, 20, 24, generator=g)
    # box covering cells x 4..10, y 3..9 (6 x 6 cells)
    box = torch.tensor([[4.0, 3.0, 10.0, 9.0]])
    crop = fmap[:, :, 3:9, 4:10]
    # one sample per bin at the bin centre = bilinear resize of the crop
    torch.testing.assert_close(
        roi_align(fmap, box, 3, sampling_ratio=1),
        F.interpolate(crop, size=(3, 3), mode="bilinear", align_corners=False),
    )
    # 2 x 2 samples per bin land on cell centres: average pooling of the crop
    torch.testing.assert_close(roi_align(fmap, box, 3, sampling_ratio=2), F.avg_pool2d(crop, 2))
    # output as fine as the cells: the crop itself
    torch.testing.assert_close(roi_align(fmap, box, 6, sampling_ratio=1), crop)
    # many boxes at once give the same as one at a time
    boxes = torch.tensor([[4.0, 3.0, 10.0, 9.0], [0.5, 1.25, 7.5, 13.0], [10, 2, 23, 19]])
    together = roi_align(fmap, boxes, 3, 2)
    for i in range(3):
        torch.testing.assert_close(together[i : i + 1], roi_align(fmap, boxes[i : i + 1], 3, 2))


def _bilinear_reference(
    fmap: torch.Tensor, box: list[float], size: int, ratio: int
) -> torch.Tensor:
    """RoIAlign by its definition, one sample at a time: bin ``(i, j)`` averages the ``ratio^2``
    samples at fractions ``(i r + a + 0.5) / (S r)`` of the box, each interpolated bilinearly
    between the four cell centres around it, positions clamped to the outer centres."""
    _, c, h, w = fmap.shape
    out = torch.zeros(c, size, size, dtype=fmap.dtype)
    x0, y0, x1, y1 = box
    for i in range(size):
        for j in range(size):
            for a in range(ratio):
                for b in range(ratio):
                    y = y0 + (y1 - y0) * (i * ratio + a + 0.5) / (size * ratio) - 0.5
                    x = x0 + (x1 - x0) * (j * ratio + b + 0.5) / (size * ratio) - 0.5
                    y, x = min(max(y, 0.0), h - 1.0), min(max(x, 0.0), w - 1.0)
                    ly, lx = math.floor(y), math.floor(x)
                    hy, hx = min(ly + 1, h - 1), min(lx + 1, w - 1)
                    fy, fx = y - ly, x - lx
                    out[:, i, j] += (
                        (1 - fy) * (1 - fx) * fmap[0, :, ly, lx]
                        + (1 - fy) * fx * fmap[0, :, ly, hx]
                        + fy * (1 - fx) * fmap[0, :, hy, lx]
                        + fy * fx * fmap[0, :, hy, hx]
                    ) / ratio**2
    return out


@pytest.mark.parametrize("channels_last", [False, True])
def test_roi_align_matches_bilinear_sampling_by_definition(channels_last):
    """Float64, boxes inside, across and outside the map's border, 1 and 2 samples per bin."""
    g = torch.Generator().manual_seed(3)
    fmap = torch.randn(1, 4, 9, 11, generator=g, dtype=torch.float64)
    if channels_last:
        fmap = fmap.contiguous(memory_format=torch.channels_last)
    boxes = [[1.3, 2.2, 7.9, 6.1], [-2.0, -1.5, 3.0, 4.0], [8.0, 5.5, 13.0, 11.0], [4, 4, 4.5, 4.2]]
    for ratio in (1, 2):
        got = roi_align(fmap, torch.tensor(boxes, dtype=torch.float64), 4, ratio)
        for k, box in enumerate(boxes):
            torch.testing.assert_close(
                got[k], _bilinear_reference(fmap, box, 4, ratio), rtol=0, atol=1e-12
            )


@pytest.mark.parametrize(("size", "ratio", "pool"), [(8, 1, 2), (8, 2, 2), (6, 1, 3), (4, 1, 1)])
def test_roi_align_pools_blocks_as_max_pool2d_does(size, ratio, pool):
    """RoIAlign and max-pooling in one pass give F.max_pool2d of the RoIAlign output."""
    g = torch.Generator().manual_seed(1)
    fmap = torch.randn(1, 7, 19, 23, generator=g)
    corner = torch.rand(40, 2, generator=g) * 18 - 1
    boxes = torch.cat([corner, corner + torch.rand(40, 2, generator=g) * 9 + 0.5], dim=1)
    unpooled = roi_align(fmap, boxes, size, ratio)
    pooled = roi_align(fmap, boxes, size, ratio, max_pool=pool)
    assert pooled.shape == (40, 7, size // pool, size // pool)
    torch.testing.assert_close(pooled, F.max_pool2d(unpooled, pool), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not a multiple of max_pool"):
        roi_align(fmap, boxes, 5, 1, max_pool=2)
    with pytest.raises(ValueError, match="must be finite"):
        roi_align(fmap, torch.tensor([[0.0, 0.0, float("nan"), 3.0]]), size, ratio)


def test_sample_store_reads_its_chunks_as_if_concatenated():
    """The ring buffer gives the rows of ``list(deque(chunks, maxlen))[-k:]`` concatenated, in
    order, whatever the chunk sizes, through wrap-arounds, evictions and growth."""
    g = torch.Generator().manual_seed(2)
    rng = np.random.default_rng(0)
    sizes = [9, 5, 1, 7, 2, 5, 5, 0, 6, 3, 8, 4, 5, 1]
    chunks = [torch.randn(n, 3, generator=g) for n in sizes]
    for maxlen, capacity in ((4, 20), (4, 3), (3, 25), (1, 9)):
        store = _SampleStore(chunks[0], maxlen, capacity)
        reference = deque([chunks[0]], maxlen=maxlen)
        for chunk in chunks[1:]:
            store.append(chunk)
            reference.append(chunk)
            assert len(store) == len(reference)
            for k in (None, 1, 2, maxlen + 1):
                kept = list(reference) if k is None else list(reference)[-k:]
                rows = store.last(k)
                assert rows.count == sum(len(c) for c in kept)
                index = rng.integers(0, max(rows.count, 1), 3 * rows.count)
                expected = torch.cat(kept)[torch.from_numpy(index)]
                assert torch.equal(rows.take(index), expected)
            assert all(torch.equal(store.chunk(i), c) for i, c in enumerate(reference))
        assert len(store.data) >= store.rows
    assert len(_SampleStore(chunks[0], 4, 20).data) == 20  # no growth while the rows fit
    rows = _Rows(chunks[3], 0, 7)
    assert torch.equal(rows.take(np.array([6, 0, 6])), chunks[3][[6, 0, 6]])
    with pytest.raises(IndexError, match="out of range for 7 rows"):
        rows.take(np.array([7]))


def test_box_features_do_not_depend_on_the_extracted_region(backbone):
    """One conv pass per region: a box far from the region's borders gets the same features
    from a small search region as from the whole image (same scale, cell-aligned offsets)."""
    image, _ = _scene(0, size=(200, 240))
    ex = FeatureExtractor(backbone, roi_size=3, sampling_ratio=2)
    whole = ex.extract(image, (0, 0, 240, 200), 1.0)
    part = ex.extract(image, (40, 32, 200, 180), 1.0)
    box = np.array([[100.0, 90.0, 30.0, 26.0]])
    torch.testing.assert_close(ex.pool(whole, box), ex.pool(part, box), atol=1e-4, rtol=1e-4)
    assert whole.features.shape[-2:] == (50, 60)  # stride 4


# -- update rules ----------------------------------------------------------------------------


def test_the_rules_differ_only_in_the_rule(backbone):
    image, box = _scene(0)
    cfg = dataclasses.replace(SMALL, maxiter_init=0)
    trackers = {
        r: MDNetTracker(backbone, update=r, config=cfg, seed=3) for r in ("bp", "dfa", "bdfa")
    }
    for tracker in trackers.values():
        tracker.init(image, box)
    assert trackers["bp"].engine.feedback_layers == []
    assert trackers["bp"].engine.feedback is None
    for rule in ("dfa", "bdfa"):
        engine = trackers[rule].engine
        assert engine.feedback_layers == ["fc4", "fc5"]
        assert engine.rules == {"fc4": rule, "fc5": rule, "fc6": "bp"}
        assert engine.feedback.binary == [rule == "bdfa"] * 2
    # same initial head and same first-frame samples for every rule (no training: maxiter 0)
    states = [t.head.state_dict() for t in trackers.values()]
    for other in states[1:]:
        for k, v in states[0].items():
            torch.testing.assert_close(other[k], v)
    stores = [t._pos_store.chunk(0) for t in trackers.values()]
    torch.testing.assert_close(stores[0], stores[1])
    # one loss, three rules: fc6 gets its true gradient under every rule, fc4 and fc5 differ
    x = stores[0][:16]
    y = torch.arange(16) % 2
    grads = {}
    for rule, t in trackers.items():
        t.head.eval()  # no dropout: the same forward pass
        t.head.zero_grad()
        F.cross_entropy(t.head(x), y).backward()
        grads[rule] = {n: p.grad.clone() for n, p in t.head.named_parameters()}
    for rule in ("dfa", "bdfa"):
        torch.testing.assert_close(grads[rule]["fc6.weight"], grads["bp"]["fc6.weight"])
        assert not torch.allclose(grads[rule]["fc4.weight"], grads["bp"]["fc4.weight"])
    assert not torch.allclose(grads["dfa"]["fc5.weight"], grads["bdfa"]["fc5.weight"])


@pytest.mark.parametrize("n", [30, 80])
def test_box_regressor_is_ridge_regression_on_centred_features(n):
    """Fewer samples than features (the dual system is solved) and more: the weights minimise
    ``|Xc W - Yc|^2 + alpha |W|^2`` (normal equations in float64), the bias fits the means, and
    predict applies R-CNN's deltas."""
    g = torch.Generator().manual_seed(5)
    rng = np.random.default_rng(5)
    features = torch.randn(n, 50, generator=g, dtype=torch.float64)
    target = np.array([40.0, 30.0, 20.0, 25.0])
    boxes = target + rng.normal(0, 2, size=(n, 4))
    reg = BoxRegressor(alpha=3.0, min_overlap=0.0).fit(features, boxes, target)
    x = features - features.mean(0)
    c = boxes[:, :2] + boxes[:, 2:] / 2
    ct = target[:2] + target[2:] / 2
    deltas = np.concatenate([(ct - c) / boxes[:, 2:], np.log(target[2:] / boxes[:, 2:])], 1)
    y = torch.as_tensor(deltas)
    yc = y - y.mean(0)
    normal = x.T @ x @ reg.weight + 3.0 * reg.weight - x.T @ yc
    assert normal.abs().max() < 1e-9
    torch.testing.assert_close(reg.bias, y.mean(0) - features.mean(0) @ reg.weight)
    d = (features[:2] @ reg.weight + reg.bias).numpy()
    size = boxes[:2, 2:] * np.exp(np.clip(d[:, 2:], -1, 1))
    centre = boxes[:2, :2] + boxes[:2, 2:] / 2 + d[:, :2] * boxes[:2, 2:]
    np.testing.assert_allclose(
        reg.predict(features[:2], boxes[:2]), np.concatenate([centre - size / 2, size], 1)
    )


@pytest.mark.parametrize("rule", ["bp", "dfa", "bdfa"])
def test_mining_on_stored_fc4_outputs_gives_the_gradients_of_a_fixed_fc4(rule):
    """online_fc4=False: the training rows are fc4's outputs and the head runs from after fc4
    (_mined_logits(after_first=True)); every trained parameter's gradient equals that of the
    full head on the raw rows with fc4 fixed (float64, same dropout masks), fc4 gets none."""
    g = torch.Generator().manual_seed(6)
    head = build_head(40, (24, 16), dropout=0.5).double()
    attach(head, rule, seed=1, example_input=torch.zeros(2, 40, dtype=torch.float64))
    for param in head.fc4.parameters():
        param.requires_grad_(False)
    pos = torch.randn(6, 40, generator=g, dtype=torch.float64)
    cand = torch.randn(20, 40, generator=g, dtype=torch.float64)
    labels = torch.cat([torch.ones(6, dtype=torch.long), torch.zeros(8, dtype=torch.long)])
    with torch.no_grad():
        stored_pos, stored_cand = head.fc4(pos), head.fc4(cand)
    grads = {}
    for path, forward in (
        ("raw", lambda: _mined_logits(head, pos, cand, 8)),
        ("stored", lambda: _mined_logits(head, stored_pos, stored_cand, 8, after_first=True)),
    ):
        head.zero_grad(set_to_none=True)
        with torch.random.fork_rng():
            torch.manual_seed(7)
            logits = forward()
        F.cross_entropy(logits, labels).backward()
        grads[path] = {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}
    assert set(grads["stored"]) == {f"fc{i}.{k}" for i in (5, 6) for k in ("weight", "bias")}
    assert set(grads["raw"]) == set(grads["stored"])
    for name, grad in grads["raw"].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads["stored"][name], grad, rtol=1e-12, atol=1e-15)


def test_a_fixed_fc4_stays_fixed_and_the_stores_keep_its_outputs(backbone):
    """online_fc4=False: fc4 learns on the first frame only and is frozen; every chunk the
    stores gain, at the first frame and after, is fc4's output (fc_sizes[0] wide, equal to fc4
    of the raw store of a twin tracker that trains fc4 online but starts alike); long-term
    updates happen and change fc5."""
    cfg = dataclasses.replace(SMALL, online_fc4=False, long_interval=2)
    tracker = MDNetTracker(backbone, update="bdfa", config=cfg, seed=0)
    twin = MDNetTracker(backbone, update="bdfa", config=SMALL, seed=0)  # fc4 trained online
    image, box = _scene(0)
    tracker.init(image, box)
    twin.init(image, box)
    assert not any(p.requires_grad for p in tracker.head.fc4.parameters())
    with torch.no_grad():  # the first frame: same training, so fc4 of the twin's raw rows
        torch.testing.assert_close(
            tracker._pos_store.chunk(0), twin.head.fc4(twin._pos_store.chunk(0))
        )
    before = {k: v.clone() for k, v in tracker.head.state_dict().items()}
    for t in range(1, 7):
        tracker.update(_scene(t)[0])
    assert tracker.updates >= 2 and len(tracker._pos_store) >= 3  # frames succeeded
    for store in (tracker._pos_store, tracker._neg_store):
        assert store.chunk(len(store) - 1).shape[1] == cfg.fc_sizes[0]
    after = tracker.head.state_dict()
    for k in ("fc4.weight", "fc4.bias"):
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    assert not torch.equal(after["fc5.weight"], before["fc5.weight"])
    assert tracker.timings.seconds["store_fc4"] > 0


def test_forward_replacements_nest():
    layer = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    with _forward_replaced(layer, lambda v: v + 1):
        with _forward_replaced(layer, lambda v: v + 2):
            torch.testing.assert_close(layer(x), x + 2)
        torch.testing.assert_close(layer(x), x + 1)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert "forward" not in layer.__dict__


def test_uniform_dropout_keeps_units_with_probability_one_minus_p_and_scales_them():
    """Mask statistics (2e6 units: the kept fraction within 5 standard errors of 1 - p), kept
    units scaled by 1 / (1 - p), the gradient is the same mask times the scale, eval is identity."""
    torch.manual_seed(0)
    for p in (0.25, 0.5):
        drop = UniformDropout(p)
        x = torch.full((2000, 1000), 3.0, dtype=torch.float64, requires_grad=True)
        y = drop(x)
        kept = y != 0
        frac = kept.double().mean().item()
        assert abs(frac - (1 - p)) < 5 * math.sqrt(p * (1 - p) / kept.numel()), (p, frac)
        torch.testing.assert_close(y[kept], torch.full_like(y[kept], 3.0 / (1 - p)))
        y.sum().backward()
        torch.testing.assert_close(x.grad, kept.double() / (1 - p))
        drop.eval()
        assert drop(x) is x
    assert type(build_head(8, (4,), 0.5).drop4) is UniformDropout
    x = torch.randn(5, 3)
    assert UniformDropout(0.0)(x) is x
    assert (UniformDropout(1.0)(x) == 0).all()
    inplace = x.clone()
    UniformDropout(1.0, inplace=True)(inplace)
    assert (inplace == 0).all()


@pytest.mark.parametrize("rule", ["bp", "dfa", "bdfa"])
def test_hard_negative_mining_reuses_fc4_rows_with_the_same_gradients(rule):
    """The training forward reuses the mining pass's fc4 rows of the kept candidates
    (_mined_logits): one step's gradients of every parameter, under each rule, equal those of
    the plain path (score, keep the best, forward them all again), in float64."""
    g = torch.Generator().manual_seed(4)
    head = build_head(40, (24, 16), dropout=0.5).double()
    engine = attach(head, rule, seed=1, example_input=torch.zeros(2, 40, dtype=torch.float64))
    pos = torch.randn(6, 40, generator=g, dtype=torch.float64)
    cand = torch.randn(20, 40, generator=g, dtype=torch.float64)
    labels = torch.cat([torch.ones(6, dtype=torch.long), torch.zeros(8, dtype=torch.long)])

    def plain():
        head.eval()
        with torch.no_grad():
            logits = head(cand)
        top = (logits[:, 1] - logits[:, 0]).topk(8).indices
        head.train()
        return head(torch.cat([pos, cand[top]]))

    grads = {}
    for path, forward in (("plain", plain), ("mined", lambda: _mined_logits(head, pos, cand, 8))):
        head.zero_grad(set_to_none=True)
        with torch.random.fork_rng():
            torch.manual_seed(7)  # the same dropout masks
            logits = forward()
        F.cross_entropy(logits, labels).backward()
        grads[path] = {n: p.grad.clone() for n, p in head.named_parameters()}
    assert set(grads["mined"]) == {f"fc{i}.{k}" for i in (4, 5, 6) for k in ("weight", "bias")}
    for name, grad in grads["plain"].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads["mined"][name], grad, rtol=1e-12, atol=1e-15)
    assert engine.feedback_layers == ([] if rule == "bp" else ["fc4", "fc5"])
    # fc4 is called as a module in both passes (its hooks run), but the training pass computes
    # only the positives' rows: the candidates' come from the scoring pass
    seen = []
    handle = head.fc4.register_forward_hook(lambda m, a, y: seen.append((len(y), y.grad_fn)))
    try:
        _mined_logits(head, pos, cand, 8)
    finally:
        handle.remove()
    assert [n for n, _ in seen] == [20, 14]
    assert seen[0][1] is None and type(seen[1][1]).__name__ == "_KnownRowsBackward"


@pytest.mark.parametrize("scale", [0.1, 100.0, float("nan")])
def test_gradient_clipping_is_clip_grad_norm(scale):
    """_clip_grad_norm skips clip_grad_norm_'s multiplication by 1 only: the same gradients,
    bit for bit, whether it clips (scale 100), not (0.1) or the norm is NaN."""
    g = torch.Generator().manual_seed(0)
    grads = [scale * torch.randn(shape, generator=g) for shape in ((8, 5), (8,), (2, 8))]
    ours = [torch.nn.Parameter(torch.zeros_like(x)) for x in grads]
    theirs = [torch.nn.Parameter(torch.zeros_like(x)) for x in grads]
    for a, b, x in zip(ours, theirs, grads):
        a.grad, b.grad = x.clone(), x.clone()
    _clip_grad_norm(ours, 10.0)
    torch.nn.utils.clip_grad_norm_(theirs, 10.0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, equal_nan=True)


def _synthetic_run(backbone, seed: int, rule: str = "bdfa", frames: int = 10) -> np.ndarray:
    tracker = MDNetTracker(backbone, update=rule, config=SMALL, seed=seed)
    image, box = _scene(0)
    tracker.init(image, box)
    return np.array([box] + [tracker.update(_scene(t)[0]) for t in range(1, frames)])


def test_same_seed_same_boxes_and_the_target_is_followed(backbone):
    a = _synthetic_run(backbone, seed=0)
    b = _synthetic_run(backbone, seed=0)
    c = _synthetic_run(backbone, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    truth = np.array([_scene(t)[1] for t in range(10)])
    assert iou(a, truth).mean() > 0.6


def test_phase_timings_cover_the_tracking_time(backbone):
    tracker = MDNetTracker(backbone, update="bdfa", config=SMALL, seed=0)
    image, box = _scene(0)
    start = time.perf_counter()
    tracker.init(image, box)
    for t in range(1, 6):
        tracker.update(_scene(t)[0])
    total = time.perf_counter() - start
    seconds = tracker.timings.seconds
    assert set(seconds) == set(PHASES)
    for phase in ("features", "sampling", "roi_pool", "scoring", "init_train"):
        assert seconds[phase] > 0, phase
    assert 0 <= tracker.update_seconds - seconds["update"] < 0.05  # the same block, timed twice
    assert 0.3 * total < sum(seconds.values()) <= total  # disjoint phases, most of the time
    tracker.init(image, box)  # a new sequence starts from zero
    assert tracker.timings.seconds["update"] == 0.0


def test_tracker_leaves_the_global_rng_alone(backbone):
    torch.manual_seed(5)
    before = torch.get_rng_state()
    _synthetic_run(backbone, seed=0, frames=3)
    assert torch.equal(before, torch.get_rng_state())


# -- backbones -------------------------------------------------------------------------------


def test_load_backbone_accepts_trainer_checkpoints_and_bare_state_dicts(tmp_path):
    torch.manual_seed(0)
    model = build_model("track_cnn", (3, 32, 32), 10)
    torch.save({"model": model.state_dict(), "config": {"dataset": "cifar10"}}, tmp_path / "a.pt")
    torch.save(conv_features(model).state_dict(), tmp_path / "b.pt")
    narrow = build_model("track_cnn", (3, 32, 32), 10, width=0.5)
    torch.save(narrow.state_dict(), tmp_path / "c.pt")
    expected = conv_features(model).state_dict()
    for name in ("a.pt", "b.pt"):
        bb = load_backbone(tmp_path / name)
        assert bb.info["kind"] == "checkpoint" and not bb.is_random
        for k, v in bb.module.state_dict().items():
            torch.testing.assert_close(v, expected[k])
    # the whole classifier's first FC layer comes along (a ready-made fc4); a conv part has none
    torch.testing.assert_close(load_backbone(tmp_path / "a.pt").fc["weight"], model[10].weight)
    assert load_backbone(tmp_path / "b.pt").fc is None
    assert load_backbone(tmp_path / "c.pt").module[0].out_channels == 16
    torch.save({"model": {"weight": torch.zeros(3, 3)}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="conv"):
        load_backbone(tmp_path / "bad.pt")
    random = load_backbone(None, seed=4)
    assert random.is_random and "NOT pre-trained" in random.describe()
    same = load_backbone(None, seed=4)
    torch.testing.assert_close(random.module[0].weight, same.module[0].weight)


def test_backbone_is_recorded_by_relative_path_and_hash(tmp_path, monkeypatch):
    path = tmp_path / "runs" / "bb" / "checkpoint.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": build_model("track_cnn", (3, 32, 32), 10).state_dict()}, path)
    monkeypatch.chdir(tmp_path)
    bb = load_backbone(path)  # an absolute path: no folder of this machine in the record
    assert bb.info["path"] == str(Path("runs", "bb", "checkpoint.pt"))
    assert len(bb.info["sha256"]) == 16 and bb.info["sha256"] in bb.describe()
    assert str(tmp_path) not in json.dumps(bb.info) + bb.describe()
    # a results folder knows its backbone by hash: the same checkpoint elsewhere is welcome,
    # another checkpoint at the same path is refused
    out = tmp_path / "cmp"
    out.mkdir()
    _check_provenance(out, {"backbone": bb.info, "config": {}})
    _check_provenance(out, {"backbone": {**bb.info, "path": "elsewhere.pt"}, "config": {}})
    with pytest.raises(ValueError, match="another backbone"):
        _check_provenance(out, {"backbone": {**bb.info, "sha256": "0" * 16}, "config": {}})
    # a record written before a config field existed matches that field's default only
    older = tmp_path / "older"
    older.mkdir()
    config = TrackerConfig().to_dict()
    before_field = {k: v for k, v in config.items() if k != "online_fc4"}
    (older / "provenance.json").write_text(
        json.dumps({"backbone": bb.info, "config": before_field})
    )
    _check_provenance(older, {"backbone": bb.info, "config": config})
    with pytest.raises(ValueError, match="tracker configuration"):
        _check_provenance(older, {"backbone": bb.info, "config": {**config, "online_fc4": False}})
    # the value the field's absence meant, not today's default (which may change)
    monkeypatch.setattr("dfatorch.tracking.run._ADDED_FIELDS", {"online_fc4": False})
    with pytest.raises(ValueError, match="tracker configuration"):
        _check_provenance(older, {"backbone": bb.info, "config": config})


def test_missing_or_truncated_backbone_is_a_one_line_error(tmp_path):
    missing = tmp_path / "runs" / "nothing.pt"
    with pytest.raises(CheckpointError) as info:
        load_backbone(missing)
    message = str(info.value)
    assert "\n" not in message and "Errno" not in message
    assert message.startswith(f"backbone checkpoint {missing}: no such file")
    assert "dfatorch train --model track_cnn" in message
    model = build_model("track_cnn", (3, 32, 32), 10)
    torch.save({"model": model.state_dict()}, tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_backbone(tmp_path / "cut.pt")
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "cut.pt") in message
    assert "not a readable backbone checkpoint (truncated" in message
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes\.pt is not a readable backbone checkpoint"):
        load_backbone(tmp_path / "notes.pt")


# -- library entry points ----------------------------------------------------------------------


def _write_otb(root: Path, frames: int = 6) -> Path:
    seq = root / "Synth"
    (seq / "img").mkdir(parents=True)
    lines = []
    for t in range(frames):
        image, (x, y, w, h) = _scene(t)
        Image.fromarray(image).save(seq / "img" / f"{t + 1:04d}.png")
        lines.append(f"{x + 1:g},{y + 1:g},{w:g},{h:g}")
    (seq / "groundtruth_rect.txt").write_text("\n".join(lines) + "\n")
    return seq


def test_track_sequence_and_evaluate_updates_write_results(tmp_path, backbone, capsys):
    seq_dir = _write_otb(tmp_path / "otb")
    out = tmp_path / "one"
    result = track_sequence(
        seq_dir, update="dfa", out_dir=out, config=SMALL, frames_to_draw=(0, 5), progress=False
    )
    # the random-backbone warning: one plain line on stderr, no UserWarning and source line
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: no backbone checkpoint given")
    assert "randomly initialised" in err[0]
    assert result.frames == 6 and result.tracker == "mdnet-dfa"
    assert len((out / "Synth.txt").read_text().splitlines()) == 6
    record = json.loads((out / "Synth.json").read_text())
    assert record["backbone"]["kind"] == "random" and record["update"] == "dfa"
    assert sorted(p.name for p in (out / "frames").iterdir()) == [
        "Synth_0001.png",
        "Synth_0006.png",
    ]

    report = evaluate_updates(
        tmp_path / "otb",
        updates=("bp", "bdfa"),
        seeds=(0,),
        out_dir=tmp_path / "cmp",
        backbone=backbone,
        config=SMALL,
        progress=True,
    )
    # stderr is not a terminal here: progress comes as whole lines, no carriage returns
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    assert [line.split(":")[0] for line in err.splitlines()] == ["mdnet-bp", "mdnet-bdfa"]
    assert err.splitlines()[0].startswith("mdnet-bp: 100% (1/1 it) ")
    assert set(report) == {"mdnet-bp", "mdnet-bdfa"}
    assert report["mdnet-bdfa"]["backbone"] == {"kind": "random", "seed": 0}
    assert 0 <= report["mdnet-bdfa"]["overall"]["success_score"] <= 1
    for name in ("report.md", "report.json", "success_precision.png"):
        assert (tmp_path / "cmp" / name).is_file()
    assert "random track_cnn" in (tmp_path / "cmp" / "report.md").read_text()
    # the same folder with another backbone would mix results: refused
    with pytest.raises(ValueError, match="another backbone"):
        evaluate_updates(
            tmp_path / "otb",
            updates=("bp",),
            seeds=(0,),
            out_dir=tmp_path / "cmp",
            backbone=load_backbone(None, seed=9),
            config=SMALL,
            progress=False,
        )


# -- real data -------------------------------------------------------------------------------


@pytest.mark.data
@pytest.mark.slow
def test_bdfa_tracker_keeps_the_target_on_a_real_sequence(backbone):
    if not OTB_ROOT.is_dir():
        pytest.skip(f"{OTB_ROOT} not found")
    seq = load_sequence(OTB_ROOT / "Couple")
    seq.frames, seq.boxes = seq.frames[:30], seq.boxes[:30]
    result = run_sequence(MDNetTracker(backbone, update="bdfa", seed=0), seq)
    assert np.nanmean(result.ious) > 0.3


def test_fc4_starts_from_the_pretrained_classifier_layer(tmp_path):
    """With the target at 32 pixels, RoIAlign to 8 x 8 cells and a 2 x 2 max-pool give the same
    4 x 4 x 96 input as track_cnn's classifier sees on a 32 x 32 image: its FC layer is fc4."""
    torch.manual_seed(0)
    model = build_model("track_cnn", (3, 32, 32), 10)
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pt")
    bb = load_backbone(tmp_path / "ckpt.pt")
    cfg = dataclasses.replace(
        SMALL,
        maxiter_init=0,
        fc_sizes=(256, 64),
        roi_size=8,
        roi_sampling=1,
        roi_max_pool=2,
        fc4_from_backbone=True,
    )
    tracker = MDNetTracker(bb, update="bdfa", config=cfg)
    assert tracker.extractor.feature_dim == 96 * 4 * 4
    image, box = _scene(0)
    tracker.init(image, box)
    assert tracker.fc4_pretrained
    torch.testing.assert_close(tracker.head.fc4.weight, model[10].weight)
    # a 32 x 32 image seen as a box: the tracker's fc4 input is the classifier's
    x = torch.rand(1, 3, 32, 32)
    ex = tracker.extractor
    fmap = ex.module(x)
    pooled = ex.pool(FeatureMap(fmap, (0, 0, 32, 32), (1.0, 1.0), 4), np.array([[0, 0, 32, 32]]))
    with torch.no_grad():
        torch.testing.assert_close(pooled, model[:10](x))
    # without a pre-trained layer of that shape, fc4 keeps its own (seeded) initialisation
    other = MDNetTracker(load_backbone(None), update="bdfa", config=cfg)
    other.init(image, box)
    assert not other.fc4_pretrained


def test_track_commands(tmp_path, capsys):
    from dfatorch.cli import main

    _write_otb(tmp_path / "otb", frames=4)
    code = main(["track", str(tmp_path / "otb" / "Synth"), "--update", "bdfa",
                 "--out", str(tmp_path / "t"), "--no-progress"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0 and "success" in captured.out
    assert captured.err.startswith("warning: ") and "randomly initialised" in captured.err
    assert len(captured.err.splitlines()) == 1
    assert len((tmp_path / "t" / "Synth.txt").read_text().splitlines()) == 4
    assert (tmp_path / "t" / "frames" / "Synth_0001.png").is_file()
    code = main(["track-eval", str(tmp_path / "otb"), "--update", "bp,bdfa", "--seeds", "0",
                 "--out", str(tmp_path / "e"), "--no-progress"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0 and "| sequence | bp | bdfa |" in captured.out
    assert captured.err.startswith("warning: ") and "randomly initialised" in captured.err
    assert (tmp_path / "e" / "success_precision.png").is_file()


def test_tracker_options_from_the_command_line():
    from dfatorch.cli import tracker_config

    cfg = tracker_config(["fc4_from_backbone=true", "fc_sizes=[128, 64]", "lr_update=0.02"])
    assert cfg.fc4_from_backbone is True and cfg.fc_sizes == (128, 64) and cfg.lr_update == 0.02
    with pytest.raises(ValueError, match="KEY=VALUE"):
        tracker_config(["no_such_field=1"])


def test_tracker_presets_and_cli_options_over_them():
    from dfatorch.cli import tracker_config

    assert TrackerConfig.preset("default") == TrackerConfig()
    realtime = TrackerConfig.preset("realtime")
    assert realtime == dataclasses.replace(TrackerConfig(), online_fc4=False)
    assert TrackerConfig.preset("mdnet", maxiter_update=3) == TrackerConfig.mdnet(maxiter_update=3)
    both = tracker_config(["lr_update=0.003"], "realtime")
    assert (both.online_fc4, both.lr_update) == (False, 0.003)
    assert tracker_config(["online_fc4=true"], "realtime").online_fc4 is True
    assert tracker_config(["online_fc4=False"]).online_fc4 is False  # any case; not a string
    with pytest.raises(ValueError, match="online_fc4 is true or false"):
        tracker_config(["online_fc4=no"])
    with pytest.raises(ValueError, match="must be True or False"):
        TrackerConfig(online_fc4="False")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown tracker preset 'fast'"):
        TrackerConfig.preset("fast")


@pytest.mark.data
@pytest.mark.slow
def test_tracking_speed_benchmark_names_cells_by_rule_and_preset(tmp_path):
    """benchmarks/tracking_speed.py on 4 frames: one cell per rule and preset, the preset's
    changes recorded, fps and phases that add up to the tracker's time."""
    if not OTB_ROOT.is_dir():
        pytest.skip(f"{OTB_ROOT} not found")
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tracking_speed.py"
    spec = importlib.util.spec_from_file_location("tracking_speed", path)
    assert spec is not None and spec.loader is not None
    sys.path.insert(0, str(path.parent))  # its `_common` import
    try:
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        out = tmp_path / "speed.json"
        argv = ["--root", str(OTB_ROOT), "--sequences", "Biker", "--frames", "4", "--rules"]
        bench.main([*argv, "bdfa", "--presets", "default", "realtime", "--out", str(out)])
    finally:
        sys.path.remove(str(path.parent))
    data = json.loads(out.read_text())
    assert set(data["summary"]) == {"bdfa", "bdfa (realtime)"}
    assert data["presets"] == {"default": {}, "realtime": {"online_fc4": False}}
    cell = data["sequences"]["Biker"]["bdfa (realtime)"]
    assert cell["fps"] == pytest.approx(4 / cell["track_seconds"])
    summary = data["summary"]["bdfa (realtime)"]
    assert summary["fps_640x360"] == pytest.approx(cell["fps"])
    assert summary["success_auc_mean"] == pytest.approx(cell["success_auc"])
    ms = summary["phases_640x360"]["ms_per_frame"]
    assert sum(ms.values()) == pytest.approx(1000 * cell["track_seconds"] / 4)
