"""Feature extraction for the tracker: one conv pass per frame region, RoIAlign for many boxes.

As in RT-MDNet (Jung et al. 2018), the convolutional backbone runs once per frame, on a region of
the image resized so that the target has a fixed size, and the features of every candidate or
training box are pooled from that one feature map by RoIAlign. ``torchvision`` is not a
dependency, so :func:`roi_align` is built on :func:`torch.nn.functional.embedding_bag`.

The backbone is the convolutional part of the zoo's ``track_cnn`` (:func:`load_backbone`), either
pre-trained by ``dfatorch train --model track_cnn ...`` or randomly initialised, or any module that
maps ``(N, 3, H, W)`` normalised images to ``(N, C, H / s, W / s)`` feature maps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._io import CheckpointError, portable_path, read_torch_file
from ..models import build_model, conv_features

__all__ = [
    "CIFAR10_STATS",
    "Backbone",
    "FeatureExtractor",
    "FeatureMap",
    "backbone_stride",
    "load_backbone",
    "roi_align",
]

#: Per-channel mean and std (in [0, 1] units) of CIFAR-10's training images: the normalisation
#: ``dfatorch train`` applies, so the tracker feeds a CIFAR-trained backbone the same statistics.
CIFAR10_STATS: tuple[tuple[float, float, float], tuple[float, float, float]] = (
    (0.4914, 0.4822, 0.4465),
    (0.2470, 0.2435, 0.2616),
)
_DATASET_STATS = {
    "cifar10": CIFAR10_STATS,
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def roi_align(
    features: Tensor,
    boxes: Tensor,
    output_size: int,
    sampling_ratio: int = 2,
    max_pool: int = 1,
) -> Tensor:
    """RoIAlign (He et al. 2017) of ``boxes`` on one feature map, optionally followed by a
    ``max_pool x max_pool`` max-pooling of the bins.

    Every bilinear sample is a weighted sum of four feature-map cells: one
    :func:`torch.nn.functional.embedding_bag` call over the map's cells (rows of ``C`` channels)
    gathers and sums them for all samples at once, a fused kernel several times faster on CPU
    than ``grid_sample`` on a channel-major map.

    Args:
        features: ``(1, C, H, W)`` (or ``(C, H, W)``).
        boxes: ``(K, 4)`` corners ``(x0, y0, x1, y1)`` in continuous feature-map coordinates:
            cell ``j`` spans ``[j, j + 1)``, its value sits at its centre ``j + 0.5``.
        output_size: ``S``, the pooled grid is ``S x S`` bins.
        sampling_ratio: ``r``, bilinear samples per bin along each axis, averaged.
        max_pool: ``m`` (a divisor of ``S``): the maximum of each ``m x m`` block of bins, as
            ``F.max_pool2d(roi_align(...), m)`` gives, but with the samples of a block laid out
            next to each other, so that no ``(K, C, S, S)`` map is pooled (a slow kernel on CPU).

    Returns:
        ``(K, C, S / m, S / m)``. Samples outside the map take the nearest border value.
    """
    if features.dim() == 3:
        features = features.unsqueeze(0)
    if features.shape[0] != 1:
        raise ValueError(
            f"roi_align pools from one feature map, got a batch of {features.shape[0]}"
        )
    s, r, m = output_size, sampling_ratio, max_pool
    if s % m:
        raise ValueError(f"output_size {s} is not a multiple of max_pool {m}")
    k = boxes.shape[0]
    _, c, h, w = features.shape
    p = s // m
    if k == 0:
        return features.new_zeros(0, c, p, p)
    boxes = boxes.to(features)
    if not torch.isfinite(boxes).all():  # a NaN would become a wild cell index
        raise ValueError("roi_align: box coordinates must be finite")
    # sample j of a box's S*r along an axis sits at fraction (j + 0.5) / (S r) of the box, at
    # continuous coordinate u, i.e. at u - 0.5 in cell-centre units, clamped to the border
    t = (torch.arange(s * r, device=features.device, dtype=features.dtype) + 0.5) / (s * r)
    xs = (boxes[:, 0:1] + (boxes[:, 2:3] - boxes[:, 0:1]) * t - 0.5).clamp_(0, w - 1)
    ys = (boxes[:, 1:2] + (boxes[:, 3:4] - boxes[:, 1:2]) * t - 0.5).clamp_(0, h - 1)

    def taps(u: Tensor, size: int, stride: int) -> tuple[Tensor, Tensor]:
        """Cells (times ``stride``) and weights of the two taps along one axis, laid out
        ``(2, m, r, K, P)`` from ``j = (block * m + bin) * r + sample``."""
        u = u.view(k, p, m, r).permute(2, 3, 0, 1)
        lo = u.floor()
        frac = u - lo
        lo = lo.to(torch.int32)  # int32 cell numbers: half the memory traffic of int64
        cells = torch.stack([lo, (lo + 1).clamp_(max=size - 1)]) * stride
        return cells, torch.stack([1 - frac, frac])

    cy, wy = taps(ys, h, w)
    cx, wx = taps(xs, w, 1)
    # samples laid out (m_y, r_y, m_x, r_x, K, P_y, P_x): each sample of a pooling block is one
    # contiguous run of rows over every output cell, so the mean over samples and the max over
    # bins are elementwise ops on whole runs; the four taps (tap_y, tap_x) of a sample last
    y_shape, x_shape = (2, 1, m, r, 1, 1, k, p, 1), (1, 2, 1, 1, m, r, k, 1, p)
    order = (2, 3, 4, 5, 6, 7, 8, 0, 1)
    index = (cy.view(y_shape) + cx.view(x_shape)).permute(order).reshape(-1, 4)
    weight = (wy.view(y_shape) * wx.view(x_shape)).permute(order).reshape(-1, 4)
    # one row of C channels per cell: a view of a channels-last map (the backbone's layout;
    # any other layout is copied into it first)
    cells = features.contiguous(memory_format=torch.channels_last)[0].permute(1, 2, 0)
    out = F.embedding_bag(index, cells.reshape(h * w, c), per_sample_weights=weight, mode="sum")
    out = out.view(m, r, m, r, k * p * p, c)
    if r > 1:
        out = out.mean(dim=(1, 3), keepdim=True)
    bins = out.view(m * m, k * p * p, c)
    pooled = bins[0]
    for i in range(1, m * m):  # elementwise maxima: exact
        pooled = torch.maximum(pooled, bins[i])
    return pooled.view(k, p, p, c).permute(0, 3, 1, 2)


@torch.no_grad()
def backbone_stride(module: nn.Module, size: int = 64) -> int:
    """The backbone's total stride, measured on one ``size x size`` input (state untouched)."""
    param = next(module.parameters())
    was_training = module.training
    module.eval()
    try:
        out = module(torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype))
    finally:
        module.train(was_training)
    return max(1, round(size / out.shape[-1]))


@dataclass
class Backbone:
    """A convolutional feature extractor and what the tracker needs to know about it.

    Attributes:
        module: maps normalised ``(N, 3, H, W)`` images to ``(N, C, H/stride, W/stride)``.
        mean, std: per-channel input normalisation, in ``[0, 1]`` pixel units.
        info: where it came from (``{"kind": "random", "seed": ...}`` or
            ``{"kind": "checkpoint", "path": ..., "sha256": ...}``), recorded with every result.
    """

    module: nn.Module
    mean: tuple[float, ...] = CIFAR10_STATS[0]
    std: tuple[float, ...] = CIFAR10_STATS[1]
    info: dict[str, Any] = field(default_factory=lambda: {"kind": "module"})
    #: the pre-trained classifier's first FC layer (``weight``, ``bias``), if the checkpoint has
    #: one: on the max-pooled 4x4 map of a 32-pixel target it is a ready-made fc4 (see
    #: :class:`~dfatorch.tracking.tracker.TrackerConfig`'s ``fc4_from_backbone``)
    fc: dict[str, Tensor] | None = None

    @property
    def is_random(self) -> bool:
        """Whether the weights are a random initialisation (no pre-training)."""
        return self.info.get("kind") == "random"

    def describe(self) -> str:
        """One line for logs and tables."""
        if self.info.get("kind") == "random":
            return f"random track_cnn conv layers (seed {self.info.get('seed')}), NOT pre-trained"
        if self.info.get("kind") == "checkpoint":
            trained = self.info.get("trained_on")
            extra = f", trained on {trained}" if trained else ""
            digest = f" (sha256 {self.info['sha256']})" if self.info.get("sha256") else ""
            return f"track_cnn conv layers from {self.info.get('path')}{digest}{extra}"
        return f"user module {type(self.module).__name__}"


def _track_cnn_features(width: float = 1.0, batch_norm: bool = False) -> nn.Sequential:
    return conv_features(
        build_model("track_cnn", (3, 32, 32), 10, width=width, batch_norm=batch_norm)
    )


def _matching_features(state: Mapping[str, Tensor]) -> nn.Sequential:
    """A ``track_cnn`` conv part whose parameters have the shapes found in ``state``."""
    first = next((v for k, v in state.items() if k.endswith("weight") and v.dim() == 4), None)
    if first is None:
        raise ValueError("the state dict has no conv weight: not a track_cnn checkpoint")
    width = first.shape[0] / 32  # track_cnn's first conv has 32 * width channels
    tried = []
    for batch_norm in (False, True):
        candidate = _track_cnn_features(width, batch_norm)
        mine = candidate.state_dict()
        if all(k in state and state[k].shape == v.shape for k, v in mine.items()):
            return candidate
        tried.append(sorted(mine))
    raise ValueError(
        "the state dict does not hold the conv layers of a track_cnn (looked for keys "
        f"{tried[0]} or, with batch norm, {tried[1]}); got {sorted(state)[:12]}..."
    )


def load_backbone(
    checkpoint: str | Path | None = None,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Backbone:
    """The ``track_cnn`` conv layers, from a checkpoint or randomly initialised.

    Args:
        checkpoint: a file written by ``dfatorch train --model track_cnn`` (a dict whose
            ``"model"`` is the state dict) or a bare state dict, of the whole ``track_cnn`` or of
            its conv part; any width multiplier, with or without batch norm. ``None``: random
            weights drawn with ``seed`` (the global RNG is left untouched).
        seed: seeds the random initialisation (ignored with a checkpoint).
        device: where to put the backbone (default: CPU).

    Returns:
        A :class:`Backbone` in eval mode with frozen parameters; ``info`` records its origin.
        With a whole ``track_cnn`` checkpoint, :attr:`Backbone.fc` holds its first FC layer.

    Raises:
        CheckpointError: (a ``ValueError``) ``checkpoint`` is missing, truncated, not a torch
            file or not a state dict; the one-line message names the file.
        ValueError: the state dict holds no ``track_cnn`` conv layers.
    """
    fc = None
    if checkpoint is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = _track_cnn_features()
        info: dict[str, Any] = {"kind": "random", "seed": int(seed)}
        mean, std = CIFAR10_STATS
    else:
        path = Path(checkpoint)
        if not path.exists():
            raise CheckpointError(
                f"backbone checkpoint {path}: no such file (train one with `dfatorch train "
                "--model track_cnn --out RUN` and pass RUN/checkpoint.pt)"
            )
        blob = read_torch_file(path, "backbone checkpoint")
        state = blob.get("model", blob)
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{path}: expected a state dict or a dict with key 'model'")
        module = _matching_features(state)
        mine = module.state_dict()
        module.load_state_dict({k: state[k] for k in mine})
        fc = _first_fc(state, module)
        config = blob.get("config", {}) if isinstance(blob.get("config"), dict) else {}
        dataset = config.get("dataset")
        mean, std = _DATASET_STATS.get(str(dataset), CIFAR10_STATS)
        if "mean" in blob and "std" in blob:  # a checkpoint that carries its own normalisation
            mean, std = tuple(blob["mean"]), tuple(blob["std"])
        info = {
            "kind": "checkpoint",
            "path": portable_path(path),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16],
            "trained_on": dataset,
            "method": config.get("method"),
            "epoch": blob.get("epoch"),
        }
    module = module.to(device or "cpu").eval().requires_grad_(False)
    if fc is not None:
        fc = {k: v.to(device or "cpu") for k, v in fc.items()}
    return Backbone(module, tuple(mean), tuple(std), info, fc)


def _first_fc(state: Mapping[str, Tensor], features: nn.Sequential) -> dict[str, Tensor] | None:
    """``track_cnn``'s first linear layer (on the flattened, max-pooled conv map), if present."""
    channels = [m for m in features if isinstance(m, nn.Conv2d)][-1].out_channels
    for key, value in state.items():
        if key.endswith(".weight") and value.dim() == 2 and value.shape[1] % channels == 0:
            bias = state.get(key[: -len("weight")] + "bias")
            if bias is not None:
                return {"weight": value.detach().clone(), "bias": bias.detach().clone()}
    return None


@dataclass
class FeatureMap:
    """The backbone's features of one image region, and how to map image boxes onto them.

    Attributes:
        features: ``(1, C, Hf, Wf)``.
        region: ``(x0, y0, x1, y1)`` integer image pixels covered (boxes must lie inside).
        scale: ``(sx, sy)`` resized pixels per image pixel.
        stride: image pixels (resized) per feature cell.
    """

    features: Tensor
    region: tuple[int, int, int, int]
    scale: tuple[float, float]
    stride: int

    def to_cells(self, boxes: np.ndarray) -> Tensor:
        """Image boxes ``(K, 4)`` ``(x, y, w, h)`` -> feature-map corners ``(K, 4)``."""
        b = torch.as_tensor(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
        x0, y0 = self.region[:2]
        sx, sy = self.scale[0] / self.stride, self.scale[1] / self.stride
        corners = torch.stack(
            [
                (b[:, 0] - x0) * sx,
                (b[:, 1] - y0) * sy,
                (b[:, 0] + b[:, 2] - x0) * sx,
                (b[:, 1] + b[:, 3] - y0) * sy,
            ],
            dim=1,
        )
        return corners.to(device=self.features.device, dtype=self.features.dtype)


class FeatureExtractor:
    """Conv features of image regions and RoI features of boxes, for one backbone.

    Args:
        backbone: a :class:`Backbone` (or a bare module, normalised with CIFAR-10's statistics).
        roi_size: ``S``: RoIAlign pools each box to ``C x S x S``.
        sampling_ratio: RoIAlign's samples per bin along each axis.
        max_pool: then a ``max_pool x max_pool`` max-pooling (1: none), as the backbone's own
            classifier pools its conv map: features are ``C x (S / max_pool)^2``.
    """

    def __init__(
        self,
        backbone: Backbone | nn.Module,
        roi_size: int = 3,
        sampling_ratio: int = 2,
        max_pool: int = 1,
    ) -> None:
        self.backbone = backbone if isinstance(backbone, Backbone) else Backbone(backbone)
        self.module = self.backbone.module
        param = next(self.module.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.stride = backbone_stride(self.module)
        if roi_size % max_pool:
            raise ValueError(f"roi_size {roi_size} is not a multiple of max_pool {max_pool}")
        self.roi_size = roi_size
        self.sampling_ratio = sampling_ratio
        self.max_pool = max_pool
        self._mean = torch.tensor(self.backbone.mean, device=self.device, dtype=self.dtype)
        self._std = torch.tensor(self.backbone.std, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            out = self.module(torch.zeros(1, 3, 4 * self.stride, 4 * self.stride, **self._like))
        self.channels = int(out.shape[1])

    @property
    def _like(self) -> dict[str, Any]:
        return {"device": self.device, "dtype": self.dtype}

    @property
    def feature_dim(self) -> int:
        """Length of one box's feature vector, ``C * (S / max_pool)^2``."""
        return self.channels * (self.roi_size // self.max_pool) ** 2

    @torch.no_grad()
    def extract(self, image: np.ndarray, region: Sequence[float], scale: float) -> FeatureMap:
        """Run the backbone once on ``region`` of ``image``, resized by ``scale``.

        Args:
            image: uint8 ``(H, W, 3)`` RGB.
            region: ``(x0, y0, x1, y1)`` image pixels; rounded outwards to whole pixels and
                clipped to the image.
            scale: resize factor (the resized size is rounded to whole feature cells, so the
                exact per-axis factors are in the returned :attr:`FeatureMap.scale`).
        """
        h, w = image.shape[:2]
        x0 = int(np.clip(np.floor(region[0]), 0, w - 1))
        y0 = int(np.clip(np.floor(region[1]), 0, h - 1))
        x1 = int(np.clip(np.ceil(region[2]), x0 + 1, w))
        y1 = int(np.clip(np.ceil(region[3]), y0 + 1, h))
        s = self.stride
        out_w = max(s, round((x1 - x0) * scale / s) * s)
        out_h = max(s, round((y1 - y0) * scale / s) * s)
        crop = torch.from_numpy(np.ascontiguousarray(image[y0:y1, x0:x1]))
        x = crop.to(self.device).permute(2, 0, 1).unsqueeze(0).to(self.dtype)
        if (out_h, out_w) != (y1 - y0, x1 - x0):
            # antialias: a large target is shrunk a lot; plain bilinear would alias
            x = F.interpolate(x, (out_h, out_w), mode="bilinear", antialias=True)
        x = (x / 255.0 - self._mean.view(1, 3, 1, 1)) / self._std.view(1, 3, 1, 1)
        # channels-last: oneDNN's convolutions run 2-3x faster on CPU in that layout
        features = self.module(x.contiguous(memory_format=torch.channels_last))
        scale_xy = (out_w / (x1 - x0), out_h / (y1 - y0))
        return FeatureMap(features, (x0, y0, x1, y1), scale_xy, s)

    @torch.no_grad()
    def pool(self, fmap: FeatureMap, boxes: np.ndarray) -> Tensor:
        """Features of image boxes ``(K, 4)`` from ``fmap``: ``(K, feature_dim)``, flattened in
        the order of ``nn.Flatten`` on ``(K, C, H, W)`` (as the backbone's classifier)."""
        cells = fmap.to_cells(boxes)
        pooled = roi_align(fmap.features, cells, self.roi_size, self.sampling_ratio, self.max_pool)
        return pooled.flatten(1)
