"""Seeded, class-stratified subsets and train/validation splits."""

from __future__ import annotations

import math

import torch

__all__ = ["stratified_subset", "subset_and_holdout", "train_val_split"]


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
    return subset_and_holdout(labels, fraction, 0, seed)[0]


def _allocate(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` over groups in proportion to ``sizes`` (largest remainder, ties to the
    earlier group), so that the parts sum to ``total`` exactly."""
    n = sum(sizes)
    quotas = [total * s / n for s in sizes]
    parts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - parts[i]), i))
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    return parts


def subset_and_holdout(
    labels: torch.Tensor, fraction: float, val_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded class-stratified training subset and ``val_size`` validation examples drawn from
    the examples *outside* it: ``(train_idx, val_idx)``, disjoint, both sorted int64.

    The training subset is :func:`stratified_subset`'s (the same indices for the same seed), so a
    search on the held-out examples trains on exactly as many examples as the measured runs. The
    validation examples are spread over the classes in proportion to their sizes.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if val_size < 0:
        raise ValueError(f"val_size must be >= 0, got {val_size}")
    perms = _class_permutations(labels, seed)
    keep = [max(1, _round_half_up(fraction * p.numel())) for p in perms]
    spare = sum(p.numel() - k for p, k in zip(perms, keep))
    if val_size > spare:
        raise ValueError(
            f"val_size={val_size} needs that many examples outside the training subset; "
            f"fraction={fraction} leaves {spare}"
        )
    held = _allocate(val_size, [p.numel() for p in perms]) if val_size else [0] * len(perms)
    # a small class may lack its share outside the subset: its shortfall goes to the others
    for _ in range(len(perms)):
        short = [max(0, h - (p.numel() - k)) for p, k, h in zip(perms, keep, held)]
        if not sum(short):
            break
        held = [h - s for h, s in zip(held, short)]
        room = [p.numel() - k - h for p, k, h in zip(perms, keep, held)]
        extra = _allocate(sum(short), room)
        held = [h + e for h, e in zip(held, extra)]
    empty = torch.empty(0, dtype=torch.int64)
    train = [p[:k] for p, k in zip(perms, keep)]
    val = [p[k : k + h] for p, k, h in zip(perms, keep, held)]
    return (
        torch.sort(torch.cat(train)).values if train else empty,
        torch.sort(torch.cat(val)).values if val else empty,
    )


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
