"""Seeded, class-stratified subsets and train/validation splits."""

from __future__ import annotations

import math

import torch

__all__ = ["stratified_subset", "train_val_split"]


def _round_half_up(x: float) -> int:
    # Python's round() rounds half to even; half-up is the less surprising rule for counts.
    return math.floor(x + 0.5)


def _class_permutations(labels: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """For each class in increasing label order, its example indices in a seeded random order.
    Per-step labels ``(N, T)`` (language modelling) have no class per example: one group."""
    if labels.dim() == 2:
        labels = torch.zeros(labels.shape[0], dtype=torch.int64)
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    labels = labels.cpu()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c, as_tuple=True)[0]
        out.append(idx[torch.randperm(idx.numel(), generator=gen)])
    return out


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices (sorted, int64) of a seeded class-stratified subset.

    Each class keeps ``round(fraction * n_class)`` examples (half rounded up), at least 1.
    ``fraction`` must lie in (0, 1]; ``fraction == 1`` returns every index.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    parts = [
        perm[: max(1, _round_half_up(fraction * perm.numel()))]
        for perm in _class_permutations(labels, seed)
    ]
    if not parts:
        return torch.empty(0, dtype=torch.int64)
    return torch.sort(torch.cat(parts)).values


def train_val_split(
    labels: torch.Tensor, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded class-stratified split into disjoint ``(train_idx, val_idx)``, both sorted int64.

    Each class sends ``round(val_fraction * n_class)`` examples to validation, clamped so that a
    class with at least two examples has at least one on each side (a singleton stays in train).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train_parts, val_parts = [], []
    for perm in _class_permutations(labels, seed):
        n = perm.numel()
        n_val = min(max(_round_half_up(val_fraction * n), 1), n - 1) if n >= 2 else 0
        val_parts.append(perm[:n_val])
        train_parts.append(perm[n_val:])
    empty = torch.empty(0, dtype=torch.int64)
    train = torch.sort(torch.cat(train_parts)).values if train_parts else empty
    val = torch.sort(torch.cat(val_parts)).values if val_parts else empty
    return train, val
