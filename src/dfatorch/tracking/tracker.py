"""An MDNet-style online tracker whose fully connected layers learn online by BP, DFA or BDFA.

MDNet (Nam & Han 2016) scores candidate boxes with a CNN as target or background, and fine-tunes
its fully connected layers online while the video plays. Han & Yoo (2019) train those layers with
binary direct feedback alignment (BDFA) instead of back-propagation. Here:

- **Features**: the conv backbone (:class:`~dfatorch.tracking.features.Backbone`) runs once per
  frame on a search region around the previous box, resized so that the target is about
  ``target_size`` pixels; every box's features are pooled from that map by RoIAlign (as in
  RT-MDNet), and training samples are stored as features, never as images.
- **Head**: ``fc4 -> relu -> dropout -> fc5 -> relu -> dropout -> fc6`` (2-way: background,
  target). :func:`dfatorch.attach` puts the update rule on it: ``fc4``/``fc5`` get ``bp``, ``dfa``
  or ``bdfa``, ``fc6`` its true gradient. Nothing else depends on the rule.
- **First frame**: positives (IoU >= 0.7), negatives (IoU <= 0.3, half near the target, half
  anywhere in the image), ``maxiter_init`` iterations; a ridge bounding-box regressor.
- **Each frame**: Gaussian candidates around the previous box, the mean of the ``top_k`` best is
  the new box; its score (log-odds of "target") decides success. On success new samples are
  stored; on failure a short-term update (last ``n_frames_short`` frames); every
  ``long_interval`` frames a long-term one (positives of the last ``n_frames_long`` frames), both
  with hard negative mining.

Everything is seeded by the tracker's ``seed``: the same seed gives the same boxes.
:attr:`MDNetTracker.timings` splits the time of a sequence into its phases (features, sampling,
RoI pooling, scoring, box regression, training) for ``benchmarks/tracking_speed.py``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine import DFAEngine, Rule, attach
from .features import Backbone, FeatureExtractor, FeatureMap
from .metrics import iou
from .sampling import SampleKind, sample_boxes

__all__ = [
    "PHASES",
    "TRACKER_PRESETS",
    "BoxRegressor",
    "MDNetTracker",
    "PhaseTimer",
    "TrackerConfig",
    "UniformDropout",
    "build_head",
]

Box = tuple[float, float, float, float]

#: The phases :attr:`MDNetTracker.timings` times, first frame and later frames alike:
#: ``features`` the backbone on the image region, ``sampling`` drawing candidate and training
#: boxes, ``roi_pool`` pooling their features, ``scoring`` the head on the candidates and the
#: choice of the box, ``bbreg`` fitting and applying the box regressor, ``init_train`` the
#: first frame's training, ``update`` the online updates (training after the first frame),
#: ``store_fc4`` fc4's output of the samples kept for training (``online_fc4=False`` only).
PHASES = (
    "features",
    "sampling",
    "roi_pool",
    "scoring",
    "bbreg",
    "init_train",
    "update",
    "store_fc4",
)


#: Names of :meth:`TrackerConfig.preset`: the defaults, :meth:`TrackerConfig.realtime`,
#: :meth:`TrackerConfig.mdnet`.
TRACKER_PRESETS = ("default", "realtime", "mdnet")


class PhaseTimer:
    """Wall-clock seconds per named phase, summed over every :meth:`phase` block since
    :meth:`reset` (``time.perf_counter``; a nested block counts in both phases)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    def reset(self) -> None:
        """Every phase back to zero."""
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the time spent inside the block to phase ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass(frozen=True)
class TrackerConfig:
    """MDNet's hyper-parameters (names as in py-MDNet's ``options.yaml``) and the feature layout.

    The defaults follow MDNet except where a CPU's speed or the missing offline pre-training of
    fc4/fc5 asks otherwise (each such field says so); :meth:`mdnet` restores MDNet's network and
    update sizes. Distances (``trans*``) are in units of ``mean(w, h)`` of the
    reference box; ``scale*`` are factor ranges ``scale ** [-1, 1]``.
    """

    # -- features --------------------------------------------------------------------------
    #: the target's size ``sqrt(w h)`` after resizing the search region, in pixels
    target_size: float = 32.0
    #: search region: the previous box grown by ``search_pad * mean(w, h)`` on every side
    search_pad: float = 2.0
    roi_size: int = 8  #: RoIAlign output, ``roi_size x roi_size`` bins
    roi_sampling: int = 1  #: RoIAlign samples per bin and axis
    roi_max_pool: int = 2  #: max-pooling after RoIAlign (features: ``C (roi_size/this)^2``)
    #: start fc4 from the backbone checkpoint's pre-trained first FC layer where shapes allow (with
    #: the RoI layout above, a box's features are exactly that layer's input, as for a 32x32
    #: image). MDNet's fc4/fc5 are pre-trained offline; this is the closest this library has. A
    #: random backbone has no such layer and fc4 starts from scratch. The shared-sequence results
    #: with and without it are in docs/RESULTS.md.
    fc4_from_backbone: bool = True
    # -- network ---------------------------------------------------------------------------
    fc_sizes: tuple[int, ...] = (256, 256)  #: widths of fc4, fc5 (MDNet: 512, 512)
    dropout: float = 0.5
    # -- candidates ------------------------------------------------------------------------
    n_samples: int = 256
    trans: float = 0.6
    scale: float = 1.05
    trans_limit: float = 1.5  #: on failure ``trans`` grows by 10 % a frame up to this
    top_k: int = 5
    success_threshold: float = 0.0  #: on the mean top-k log-odds of "target"
    # -- training samples ------------------------------------------------------------------
    trans_pos: float = 0.1
    scale_pos: float = 1.3
    trans_neg_init: float = 1.0
    scale_neg_init: float = 1.6
    trans_neg: float = 2.0
    scale_neg: float = 1.3
    overlap_pos: tuple[float, float] = (0.7, 1.0)
    overlap_neg: tuple[float, float] = (0.0, 0.3)
    n_pos_init: int = 500
    n_neg_init: int = 5000
    n_pos_update: int = 50
    n_neg_update: int = 200
    min_size: float = 10.0  #: smallest sampled width/height in pixels
    # -- training --------------------------------------------------------------------------
    maxiter_init: int = 30
    #: MDNet: 5e-4 (fc4/fc5 pre-trained offline); 10x for layers that start from scratch
    lr_init: float = 5e-3
    maxiter_update: int = 10  #: MDNet: 15
    #: train fc4 in online updates too (MDNet). False: fc4 learns on the first frame only and is
    #: fixed after it, so the sample stores keep each box's fc4 output (``fc_sizes[0]`` numbers,
    #: not the RoI features) and an online step runs the layers after fc4 only: several times
    #: cheaper updates
    online_fc4: bool = True
    lr_update: float = 1e-2  #: MDNet: 1e-3
    lr_mult_last: float = 10.0  #: learning-rate factor of fc6
    batch_pos: int = 32
    batch_neg: int = 96
    #: hard negative mining: the best ``batch_neg`` of these (MDNet: 1024)
    batch_neg_cand: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    grad_clip: float = 10.0
    long_interval: int = 10
    n_frames_long: int = 100
    n_frames_short: int = 20
    # -- bounding-box regression -----------------------------------------------------------
    bbreg: bool = True
    n_bbreg: int = 1000
    overlap_bbreg: tuple[float, float] = (0.6, 1.0)
    trans_bbreg: float = 0.3
    scale_bbreg: float = 1.6
    aspect_bbreg: float = 1.1
    bbreg_alpha: float = 1000.0
    # -- feedback (dfa, bdfa) --------------------------------------------------------------
    feedback_init: str = "uniform"
    feedback_gain: float = 1.0

    def __post_init__(self) -> None:
        for name in ("online_fc4", "bbreg", "fc4_from_backbone"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.batch_neg > self.batch_neg_cand:
            raise ValueError("batch_neg must not exceed batch_neg_cand")
        if not self.fc_sizes:
            raise ValueError("fc_sizes needs at least one hidden layer (fc4)")
        for name in ("overlap_pos", "overlap_neg", "overlap_bbreg"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"{name} must be a range within [0, 1], got {(lo, hi)}")

    @classmethod
    def mdnet(cls, **overrides: Any) -> TrackerConfig:
        """MDNet's own network width, hard-negative pool and update iterations (Nam & Han 2016;
        py-MDNet), about 5x the online-update cost of the defaults. Learning rates stay ours:
        MDNet fine-tunes fc4/fc5 pre-trained offline on videos; at width 512 they start from
        scratch here (the backbone's classifier layer, which can seed fc4, has 256 units)."""
        mdnet = {"fc_sizes": (512, 512), "batch_neg_cand": 1024, "maxiter_update": 15}
        return replace(cls(), **{**mdnet, **overrides})

    @classmethod
    def realtime(cls, **overrides: Any) -> TrackerConfig:
        """fc4 fixed after the first frame (``online_fc4=False``): online updates train fc5 and
        fc6 on stored fc4 outputs, several times cheaper, and BDFA tracks OTB's 640x360
        sequences at 30 frames per second on 2 CPU cores (``benchmarks/tracking_speed.py``).
        What it costs or gains in success against the defaults, per rule, is measured in
        ``docs/RESULTS.md`` (the ``tracking-split`` study's ``fc4-fixed`` setting)."""
        return replace(cls(), **{"online_fc4": False, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TrackerConfig:
        """The named preset (:data:`TRACKER_PRESETS`) with ``overrides``."""
        if name not in TRACKER_PRESETS:
            raise ValueError(f"unknown tracker preset {name!r}; choose from {TRACKER_PRESETS}")
        return replace(cls(), **overrides) if name == "default" else getattr(cls, name)(**overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class UniformDropout(nn.Dropout):
    """:class:`torch.nn.Dropout` whose mask, on CPU, is drawn as ``uniform >= p`` (``torch.rand``)
    instead of by ``bernoulli_``: the same distribution (each unit kept with probability
    ``1 - p``, kept units scaled by ``1 / (1 - p)``) from a different random stream, about 3x
    faster for the head's small activations, where ``bernoulli_`` was a tenth of an online
    update. Elsewhere (CUDA: one fused kernel) it is :class:`torch.nn.Dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return super().forward(x)
        if self.p == 1:
            return x.mul_(0) if self.inplace else x * 0
        keep = torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))
        return x.mul_(keep) if self.inplace else x * keep


def build_head(
    in_features: int, hidden: tuple[int, ...] = (512, 512), dropout: float = 0.5
) -> nn.Sequential:
    """MDNet's fully connected head: ``fc4 -> relu -> dropout -> fc5 -> ... -> fc6`` (2 logits:
    background, target; dropout by :class:`UniformDropout`). Layer names follow MDNet
    (``fc4``, ``fc5``, ..., last ``fc6``)."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width = in_features
    for i, out in enumerate(hidden):
        layers[f"fc{4 + i}"] = nn.Linear(width, out)
        layers[f"relu{4 + i}"] = nn.ReLU()
        if dropout > 0:
            layers[f"drop{4 + i}"] = UniformDropout(dropout)
        width = out
    layers[f"fc{4 + len(hidden)}"] = nn.Linear(width, 2)
    return nn.Sequential(layers)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Torch's global RNG seeded with ``seed`` inside, restored outside (dropout, init)."""
    devices = [device] if device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(seed)
        yield


def _cycled(rng: np.random.Generator, n: int, total: int) -> np.ndarray:
    """``total`` indices into ``n`` items: concatenated random permutations (MDNet's batches)."""
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    reps = math.ceil(total / n)
    return np.concatenate([rng.permutation(n) for _ in range(reps)])[:total]


class _Rows(NamedTuple):
    """``count`` feature rows stored from row ``start`` of ``data`` on, wrapping around its end:
    row ``i`` is ``data[(start + i) % len(data)]``. A plain tensor is ``_Rows(t, 0, len(t))``."""

    data: Tensor
    start: int
    count: int

    def positions(self, index: np.ndarray) -> Tensor:
        """Where rows ``index`` sit in ``data``, on its device (for ``data.index_select``)."""
        if len(index) and not 0 <= index.min() <= index.max() < self.count:
            raise IndexError(f"row index out of range for {self.count} rows")
        return torch.from_numpy((self.start + index) % len(self.data)).to(self.data.device)

    def take(self, index: np.ndarray) -> Tensor:
        """Rows ``index`` (one ``index_select``)."""
        return self.data.index_select(0, self.positions(index))


class _SampleStore:
    """The feature rows of the last ``maxlen`` frames (one chunk per frame, oldest first), as a
    ``deque(maxlen=maxlen)`` of chunks read as if concatenated, kept in one ring buffer of rows.

    A chunk is copied in after the previous one (wrapping around the buffer's end); the oldest
    chunk's rows are freed when a chunk beyond ``maxlen`` comes. Chunks may have any number of rows
    (the samplers return fewer boxes when the IoU filter starves); the buffer grows when the live
    rows do not fit. :meth:`last` reads the newest chunks' rows with one ``index_select``.
    """

    def __init__(self, first: Tensor, maxlen: int, capacity: int) -> None:
        self.maxlen = maxlen
        self.data = first.new_empty((max(capacity, len(first)), *first.shape[1:]))
        self.chunks: deque[tuple[int, int]] = deque()  # (start, rows) per chunk, oldest first
        self.end = 0  # where the next chunk starts
        self.rows = 0  # live rows
        self.append(first)

    def __len__(self) -> int:
        return len(self.chunks)

    def append(self, chunk: Tensor) -> None:
        """Store ``chunk`` as the newest; drop the oldest chunk beyond ``maxlen``."""
        while self.chunks and len(self.chunks) >= self.maxlen:
            self.rows -= self.chunks.popleft()[1]
        if self.maxlen <= 0:
            return
        n, size = len(chunk), len(self.data)
        if self.rows + n > size:
            self._grow(self.rows + n)
            size = len(self.data)
        start = self.end
        head = min(n, size - start)
        self.data[start : start + head] = chunk[:head]
        self.data[: n - head] = chunk[head:]
        self.chunks.append((start, n))
        self.end = (start + n) % size
        self.rows += n

    def _grow(self, rows: int) -> None:
        """A larger buffer (at least ``rows``, twice the old size) with the live rows in order."""
        live = self.last()
        data = self.data.new_empty((max(rows, 2 * len(self.data)), *self.data.shape[1:]))
        data[: live.count] = live.take(np.arange(live.count))
        offset = self.chunks[0][0] if self.chunks else 0
        size = len(self.data)
        self.chunks = deque(((s - offset) % size, n) for s, n in self.chunks)
        self.data, self.end = data, live.count

    def last(self, chunks: int | None = None) -> _Rows:
        """The rows of the newest ``chunks`` chunks (default all), oldest first."""
        kept = list(self.chunks)[-chunks:] if chunks is not None else list(self.chunks)
        if not kept:
            return _Rows(self.data, 0, 0)
        return _Rows(self.data, kept[0][0], sum(n for _, n in kept))

    def chunk(self, i: int) -> Tensor:
        """Chunk ``i`` (0: the oldest), a copy."""
        start, n = self.chunks[i]
        return _Rows(self.data, start, n).take(np.arange(n))


class _KnownRows(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose last ``len(known)`` rows are given: computed from the
    same rows of ``x`` with the same ``weight`` and ``bias`` just before (hard negative mining
    scores the candidates with the head right before the step). Only the other rows are
    computed; backward is the linear layer's: ``grad^T x`` for ``weight`` (every row of ``x``),
    ``sum(grad)`` for ``bias``, ``grad weight`` for ``x`` (products as autograd's ``addmm``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, known: Tensor
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.cat([F.linear(x[: len(x) - len(known)], weight, bias), known])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        return (
            grad.mm(weight) if need_x else None,
            grad.t().mm(x) if need_w else None,
            grad.sum(0) if ctx.has_bias and need_b else None,
            None,
        )


@contextlib.contextmanager
def _forward_replaced(layer: nn.Module, forward: Any) -> Iterator[None]:
    """``layer.forward`` is ``forward`` inside: the layer is still called as a module, so its
    hooks (the engine's) run as always. Nests: the previous replacement comes back after."""
    previous = layer.__dict__.get("forward")
    layer.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del layer.forward
        else:
            layer.forward = previous


def _mined_logits(
    head: nn.Sequential, pos: Tensor, cand: Tensor, keep: int, *, after_first: bool = False
) -> Tensor:
    """The training forward (train mode) of ``pos`` and the ``keep`` candidates ``cand`` that the
    head (eval mode, no gradient) scores highest as "target": MDNet's hard negative mining.

    The first layer (fc4) is linear and comes before any dropout, so its output rows for the kept
    candidates are those of the scoring pass (same weights, same rows): the training forward
    reuses them (:class:`_KnownRows`) and computes fc4 for ``pos`` only. The rest of the head runs
    as usual; every module is called as one, so the engine's hooks see the same pass.

    ``after_first``: ``pos`` and ``cand`` are already the first layer's outputs (a fixed fc4):
    it passes them through, both passes run the rest of the head."""
    first = head[0]
    if after_first:
        with _forward_replaced(first, lambda x: x):
            if keep < len(cand):
                with torch.no_grad():
                    head.eval()
                    logits = head(cand)
                cand = cand.index_select(0, (logits[:, 1] - logits[:, 0]).topk(keep).indices)
            head.train()
            return head(torch.cat([pos, cand]))
    known: Tensor | None = None
    if keep < len(cand):
        rows: list[Tensor] = []

        def scoring(x: Tensor) -> Tensor:
            rows.append(type(first).forward(first, x))
            return rows[-1]

        with torch.no_grad(), _forward_replaced(first, scoring):
            head.eval()
            logits = head(cand)
        top = (logits[:, 1] - logits[:, 0]).topk(keep).indices
        cand, known = cand.index_select(0, top), rows[0].index_select(0, top)
    head.train()
    x = torch.cat([pos, cand])
    if known is None:
        return head(x)
    given = known

    def training(x: Tensor) -> Tensor:
        return _KnownRows.apply(x, first.weight, first.bias, given)

    with _forward_replaced(first, training):
        return head(x)


def _clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> None:
    """``nn.utils.clip_grad_norm_(params, max_norm)``, the same gradients, without its in-place
    multiplication by ``min(max_norm / (norm + 1e-6), 1)`` when that factor is 1 (a no-op)."""
    total_norm = getattr(nn.utils, "get_total_norm", None)
    if total_norm is None:  # torch < 2.6
        nn.utils.clip_grad_norm_(params, max_norm)
        return
    norm = total_norm([p.grad for p in params if p.grad is not None])
    if not bool(max_norm / (norm + 1e-6) >= 1.0):  # NaN norms are multiplied in, as there
        nn.utils.clip_grads_with_norm_(params, max_norm, norm)


def _box_deltas(boxes: np.ndarray, target: np.ndarray) -> np.ndarray:
    """R-CNN regression targets from ``boxes`` to ``target``: centre offsets / size, log sizes."""
    c = boxes[:, :2] + boxes[:, 2:] / 2
    ct = target[:2] + target[2:] / 2
    return np.concatenate([(ct - c) / boxes[:, 2:], np.log(target[2:] / boxes[:, 2:])], axis=1)


class BoxRegressor:
    """MDNet's bounding-box regression: ridge regression from box features to R-CNN deltas.

    Trained once on the first frame; :meth:`predict` keeps an input box where the regressed one
    overlaps it less than ``min_overlap`` (a wild prediction).
    """

    def __init__(self, alpha: float = 1000.0, min_overlap: float = 0.6) -> None:
        self.alpha = alpha
        self.min_overlap = min_overlap
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    def fit(self, features: Tensor, boxes: np.ndarray, target: np.ndarray) -> BoxRegressor:
        """Fit on the features ``(n, d)`` of ``boxes`` ``(n, 4)`` around the true ``target``."""
        x = features.double()
        y = torch.as_tensor(_box_deltas(boxes, np.asarray(target, dtype=np.float64))).to(x)
        x_mean, y_mean = x.mean(0), y.mean(0)
        xc, yc = x - x_mean, y - y_mean
        n, d = xc.shape
        # ridge: (X^T X + a I)^-1 X^T Y = X^T (X X^T + a I)^-1 Y; solve the smaller system
        if n < d:
            eye = torch.eye(n, dtype=x.dtype, device=x.device)
            self.weight = xc.T @ torch.linalg.solve(xc @ xc.T + self.alpha * eye, yc)
        else:
            eye = torch.eye(d, dtype=x.dtype, device=x.device)
            self.weight = torch.linalg.solve(xc.T @ xc + self.alpha * eye, xc.T @ yc)
        self.bias = y_mean - x_mean @ self.weight
        return self

    def predict(self, features: Tensor, boxes: np.ndarray) -> np.ndarray:
        """Regressed boxes ``(n, 4)`` for ``boxes`` with ``features``."""
        if self.weight is None or self.bias is None:
            raise RuntimeError("BoxRegressor.predict before fit")
        d = (features.double() @ self.weight + self.bias).cpu().numpy()
        size = boxes[:, 2:] * np.exp(np.clip(d[:, 2:], -1, 1))
        centre = boxes[:, :2] + boxes[:, 2:] / 2 + d[:, :2] * boxes[:, 2:]
        out = np.concatenate([centre - size / 2, size], axis=1)
        wild = iou(out, boxes) < self.min_overlap
        out[wild] = boxes[wild]
        return out


class MDNetTracker:
    """MDNet-style tracker with online updates by ``bp``, ``dfa`` or ``bdfa`` (GOT-10k interface).

    Args:
        backbone: the conv feature extractor (:func:`~dfatorch.tracking.features.load_backbone`);
            it stays frozen. Its device is the tracker's device.
        update: the rule of the hidden FC layers for every update, first frame included.
        config: hyper-parameters (default :class:`TrackerConfig`).
        seed: seeds sampling, minibatches, dropout, the head's weights and the feedback matrices.
        name: the tracker's name (default ``"mdnet-<update>"``).

    Attributes:
        name: for result tables.
        update_seconds: seconds spent in online updates (training after the first frame) since
            the last :meth:`init`.
        engine: the :class:`~dfatorch.engine.DFAEngine` on :attr:`head` (after :meth:`init`).
        last_score: the mean top-k log-odds of the last frame.
        updates: the number of online updates since the last :meth:`init`.
        timings: a :class:`PhaseTimer`: seconds per phase (:data:`PHASES`) since the last
            :meth:`init`, that first frame included.
        fc4_pretrained: whether fc4 started from the backbone's classifier layer.
    """

    def __init__(
        self,
        backbone: Backbone | nn.Module,
        *,
        update: Rule | str = Rule.BDFA,
        config: TrackerConfig | None = None,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        self.rule = Rule(update)
        self.config = config or TrackerConfig()
        self.seed = int(seed)
        self.extractor = FeatureExtractor(
            backbone,
            roi_size=self.config.roi_size,
            sampling_ratio=self.config.roi_sampling,
            max_pool=self.config.roi_max_pool,
        )
        self.device = self.extractor.device
        self.name = name or f"mdnet-{self.rule.value}"
        self.update_seconds = 0.0
        self.updates = 0
        self.timings = PhaseTimer()
        self.last_score = math.nan
        self.fc4_pretrained = False
        self.head: nn.Sequential | None = None
        self.engine: DFAEngine | None = None
        # torch.optim imports torch._dynamo on first use (seconds): pay it here, not in init()
        torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0)

    # -- GOT-10k interface -----------------------------------------------------------------

    def init(self, image: np.ndarray, box: Box) -> None:
        """Learn the target in ``box`` ``(x, y, w, h)`` of the first ``image`` (uint8 H x W x 3)."""
        cfg = self.config
        self.update_seconds, self.updates, self._frame = 0.0, 0, 0
        self.timings.reset()
        phase = self.timings.phase
        self._rng = np.random.default_rng(self.seed)
        self._box = np.asarray(box, dtype=np.float64).reshape(4)
        self._trans = cfg.trans
        h, w = image.shape[:2]
        self._new_head()

        # the whole image at the target's scale: whole-image negatives need all of it
        with phase("features"):
            fmap = self.extractor.extract(image, (0, 0, w, h), self._scale(self._box))
        bounds = (0.0, 0.0, float(w), float(h))
        pos_boxes = self._sample("pos", cfg.n_pos_init, bounds)
        half = cfg.n_neg_init // 2
        neg_boxes = np.concatenate(
            [
                self._sample("neg_init", half, bounds),
                self._sample("whole", cfg.n_neg_init - half, bounds),
            ]
        )
        with phase("roi_pool"):
            raw = self.extractor.pool(fmap, pos_boxes)
        # one scalar per sequence, so that learning rates do not depend on the backbone's scale;
        # a pre-trained fc4 expects the features as they are
        self._feature_scale: Tensor | None = (
            None if self.fc4_pretrained else 1.0 / raw.pow(2).mean().sqrt().clamp_min(1e-12)
        )
        pos = raw if self._feature_scale is None else raw * self._feature_scale
        neg = self._features(fmap, neg_boxes)
        with phase("init_train"):
            self._train(
                _Rows(pos, 0, len(pos)), _Rows(neg, 0, len(neg)), cfg.maxiter_init, self._opt_init
            )

        self._regressor: BoxRegressor | None = None
        if cfg.bbreg:
            reg_boxes = self._sample("bbreg", cfg.n_bbreg, bounds)
            reg_features = self._features(fmap, reg_boxes)
            with phase("bbreg"):
                self._regressor = BoxRegressor(cfg.bbreg_alpha, cfg.overlap_bbreg[0]).fit(
                    reg_features, reg_boxes, self._box
                )
        if not cfg.online_fc4:  # fc4 is fixed from here on: the stores keep its output
            for param in self.head[0].parameters():
                param.requires_grad_(False)
        # at most one chunk per frame of n_pos_update / n_neg_update rows after the first
        self._pos_store = _SampleStore(
            self._stored(pos),
            cfg.n_frames_long,
            len(pos) + (cfg.n_frames_long - 1) * cfg.n_pos_update,
        )
        neg_update = self._features(fmap, self._sample("neg", cfg.n_neg_update, bounds))
        self._neg_store = _SampleStore(
            self._stored(neg_update), cfg.n_frames_short, cfg.n_frames_short * cfg.n_neg_update
        )

    def update(self, image: np.ndarray) -> Box:
        """Locate the target in the next ``image``; returns ``(x, y, w, h)``."""
        cfg = self.config
        phase = self.timings.phase
        self._frame += 1
        box = self._box
        pad = cfg.search_pad * box[2:].mean()
        region = (box[0] - pad, box[1] - pad, box[0] + box[2] + pad, box[1] + box[3] + pad)
        with phase("features"):
            fmap = self.extractor.extract(image, region, self._scale(box))
        bounds = tuple(float(v) for v in fmap.region)

        with phase("sampling"):
            candidates = sample_boxes(
                self._rng,
                box,
                cfg.n_samples,
                kind=SampleKind.GAUSSIAN,
                trans=self._trans,
                scale=cfg.scale,
                bounds=bounds,  # type: ignore[arg-type]
                min_size=cfg.min_size,
            )
        features = self._features(fmap, candidates)
        with phase("scoring"):
            scores = self._score(features)
            top = scores.topk(min(cfg.top_k, len(scores))).indices
            self.last_score = float(scores[top].mean())
            top_np = top.cpu().numpy()
        success = self.last_score > cfg.success_threshold
        self._box = candidates[top_np].mean(0)
        self._trans = cfg.trans if success else min(self._trans * 1.1, cfg.trans_limit)
        result = self._box
        if success and self._regressor is not None:
            with phase("bbreg"):
                result = self._regressor.predict(features[top], candidates[top_np]).mean(0)

        if success:  # collect samples around the new box from this frame's feature map
            self._pos_store.append(
                self._stored(self._features(fmap, self._sample("pos", cfg.n_pos_update, bounds)))
            )
            self._neg_store.append(
                self._stored(self._features(fmap, self._sample("neg", cfg.n_neg_update, bounds)))
            )
        if not success:  # short-term update
            self._timed_update(self._pos_store.last(cfg.n_frames_short))
        elif self._frame % cfg.long_interval == 0:  # long-term update
            self._timed_update(self._pos_store.last())
        return tuple(float(v) for v in result)  # type: ignore[return-value]

    # -- internals ---------------------------------------------------------------------------

    def _new_head(self) -> None:
        cfg = self.config
        dim = self.extractor.feature_dim
        with _seeded(self.seed, self.device):  # same weights for every rule
            head = build_head(dim, tuple(cfg.fc_sizes), cfg.dropout)
        fc = self.extractor.backbone.fc
        fc4 = head[0]
        self.fc4_pretrained = bool(
            cfg.fc4_from_backbone and fc is not None and fc["weight"].shape == fc4.weight.shape
        )
        if self.fc4_pretrained:
            assert fc is not None
            with torch.no_grad():
                fc4.weight.copy_(fc["weight"])
                fc4.bias.copy_(fc["bias"])
        self.head = head.to(device=self.device, dtype=self.extractor.dtype)
        self.engine = attach(
            self.head,
            self.rule,
            init=cfg.feedback_init,
            gain=cfg.feedback_gain,
            seed=self.seed,
            example_input=torch.zeros(2, dim, device=self.device, dtype=self.extractor.dtype),
        )
        layers = [m for m in self.head if isinstance(m, nn.Linear)]
        hidden = [p for m in layers[:-1] for p in m.parameters()]
        last = list(layers[-1].parameters())

        def optimizer(lr: float) -> torch.optim.Optimizer:
            groups = [{"params": hidden, "lr": lr}, {"params": last, "lr": lr * cfg.lr_mult_last}]
            # foreach: the same per-tensor kernels on CPU, one call for all of them
            return torch.optim.SGD(
                groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True
            )

        self._opt_init, self._opt_update = optimizer(cfg.lr_init), optimizer(cfg.lr_update)

    def _scale(self, box: np.ndarray) -> float:
        return self.config.target_size / math.sqrt(max(box[2] * box[3], 1.0))

    def _sample(self, what: str, n: int, bounds: tuple[float, ...]) -> np.ndarray:
        """Training boxes around the current box: ``pos``, ``neg``, ``neg_init``, ``whole``,
        ``bbreg``: one sampler, MDNet's parameters for each kind of sample."""
        cfg = self.config
        spec: dict[str, dict[str, Any]] = {
            "pos": dict(kind="gaussian", trans=cfg.trans_pos, scale=cfg.scale_pos,
                        iou_range=cfg.overlap_pos),
            "neg": dict(kind="uniform", trans=cfg.trans_neg, scale=cfg.scale_neg,
                        iou_range=cfg.overlap_neg),
            "neg_init": dict(kind="uniform", trans=cfg.trans_neg_init, scale=cfg.scale_neg_init,
                             iou_range=cfg.overlap_neg),
            "whole": dict(kind="whole", scale=cfg.scale_neg_init, iou_range=cfg.overlap_neg),
            "bbreg": dict(kind="uniform", trans=cfg.trans_bbreg, scale=cfg.scale_bbreg,
                          aspect=cfg.aspect_bbreg, iou_range=cfg.overlap_bbreg),
        }  # fmt: skip
        with self.timings.phase("sampling"):
            return sample_boxes(
                self._rng, self._box, n, bounds=bounds, min_size=cfg.min_size, **spec[what]
            )

    def _features(self, fmap: FeatureMap, boxes: np.ndarray) -> Tensor:
        with self.timings.phase("roi_pool"):
            features = self.extractor.pool(fmap, boxes)
            return features if self._feature_scale is None else features * self._feature_scale

    @torch.no_grad()
    def _stored(self, features: Tensor) -> Tensor:
        """What the sample stores keep of RoI ``features``: the features, or with
        ``online_fc4=False`` fc4's output (fixed after the first frame)."""
        if self.config.online_fc4:
            return features
        assert self.head is not None
        with self.timings.phase("store_fc4"):
            return self.head[0](features)

    @torch.no_grad()
    def _score(self, features: Tensor) -> Tensor:
        """Log-odds of "target" for each feature row (eval mode: no dropout)."""
        assert self.head is not None
        self.head.eval()
        logits = self.head(features)
        return logits[:, 1] - logits[:, 0]

    def _timed_update(self, pos: _Rows) -> None:
        start = time.perf_counter()
        with self.timings.phase("update"):
            self._train(
                pos,
                self._neg_store.last(),
                self.config.maxiter_update,
                self._opt_update,
                after_fc4=not self.config.online_fc4,
            )
        self.update_seconds += time.perf_counter() - start
        self.updates += 1

    def _train(
        self,
        pos: _Rows,
        neg: _Rows,
        iters: int,
        opt: torch.optim.Optimizer,
        *,
        after_fc4: bool = False,
    ) -> None:
        """MDNet's ``train``: ``iters`` SGD steps on ``batch_pos`` positives and the
        ``batch_neg`` highest-scoring of ``batch_neg_cand`` negatives (hard negative mining).

        ``pos`` and ``neg`` are rows of the stores (one chunk per frame, as if concatenated);
        only the rows the minibatches use are copied, one minibatch at a time. ``after_fc4``:
        the rows are fc4's outputs (``online_fc4=False``), and the head runs from after fc4."""
        cfg = self.config
        assert self.head is not None
        pos_at = pos.positions(_cycled(self._rng, pos.count, iters * cfg.batch_pos))
        neg_at = neg.positions(_cycled(self._rng, neg.count, iters * cfg.batch_neg_cand))
        labels = torch.cat(
            [
                torch.ones(cfg.batch_pos, dtype=torch.long, device=self.device),
                torch.zeros(cfg.batch_neg, dtype=torch.long, device=self.device),
            ]
        )
        params = [p for p in self.head.parameters()]
        dropout_seed = int(self._rng.integers(2**62))
        with _seeded(dropout_seed, self.device):
            for it in range(iters):
                # one minibatch's rows at a time: a small block the allocator reuses, where
                # all iterations' rows at once (15 MB) cost page faults on every update
                p0, n0 = it * cfg.batch_pos, it * cfg.batch_neg_cand
                batch_pos = pos.data.index_select(0, pos_at[p0 : p0 + cfg.batch_pos])
                cand = neg.data.index_select(0, neg_at[n0 : n0 + cfg.batch_neg_cand])
                logits = _mined_logits(
                    self.head, batch_pos, cand, cfg.batch_neg, after_first=after_fc4
                )
                loss = F.cross_entropy(logits, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    _clip_grad_norm(params, cfg.grad_clip)
                opt.step()
        self.head.eval()
