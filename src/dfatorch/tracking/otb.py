"""Reader for sequences in the OTB (Object Tracking Benchmark, Wu, Lim & Yang 2015) layout.

A sequence folder looks like::

    Biker/
        img/0001.jpg 0002.jpg ...
        groundtruth_rect.txt          # one "x,y,w,h" per frame, 1-based pixels
    Jogging/
        img/...
        groundtruth_rect.1.txt        # several targets: one file per target,
        groundtruth_rect.2.txt        # exposed as sequences "Jogging.1", "Jogging.2"

Boxes are returned as ``(x, y, w, h)`` float64 in **0-based** pixel coordinates (top-left
corner, width, height), the GOT-10k toolkit convention; the files store 1-based ``x, y``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .._console import warn

__all__ = [
    "OTB_FRAME_RANGES",
    "Sequence",
    "list_sequences",
    "load_sequence",
    "load_sequences",
    "parse_groundtruth",
    "write_boxes",
]

# OTB-2015 sequences whose evaluated frames differ from "all frames in img/" (1-based inclusive
# frame numbers), as in the OTB toolkit's configSeqs and pytracking's OTB list. Keys are lower
# case: folder names are matched case-insensitively. BlurCar1/3/4's img/ folders start at
# 0247/0003/0018.jpg; Tiger1's ground truth covers frames 1-354 but OTB-2015 evaluates from 6.
OTB_FRAME_RANGES: dict[str, tuple[int, int]] = {
    "david": (300, 770),
    "football1": (1, 74),
    "freeman3": (1, 460),
    "freeman4": (1, 283),
    "diving": (1, 215),
    "blurcar1": (247, 988),
    "blurcar3": (3, 359),
    "blurcar4": (18, 397),
    "tiger1": (6, 354),
}

_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp"}
_SEPARATORS = re.compile(r"[,\s]+")
_TARGET_FILE = re.compile(r"^groundtruth_rect\.(\d+)\.txt$")


# eq=False: the generated __eq__ would compare arrays elementwise and fail on truth-testing.
@dataclass(eq=False)
class Sequence:
    """One tracking sequence: frame files and one ground-truth box per frame.

    Attributes:
        name: sequence name (``"Biker"``, ``"Jogging.1"`` for target 1 of Jogging).
        frames: image files, in temporal order.
        boxes: float64 array (T, 4) of ``x, y, w, h`` in 0-based pixels; a NaN row marks a
            frame without ground truth (never produced by :func:`parse_groundtruth`).
    """

    name: str
    frames: list[Path]
    boxes: np.ndarray

    def __post_init__(self) -> None:
        self.frames = [Path(f) for f in self.frames]
        self.boxes = np.asarray(self.boxes, dtype=np.float64)
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
            raise ValueError(f"{self.name}: boxes must be (T, 4), got {self.boxes.shape}")
        if len(self.frames) != len(self.boxes):
            raise ValueError(f"{self.name}: {len(self.frames)} frames but {len(self.boxes)} boxes")

    def __len__(self) -> int:
        return len(self.frames)

    def load_frame(self, i: int) -> np.ndarray:
        """Frame ``i`` (0-based) as a uint8 RGB array (H, W, 3); grayscale is converted."""
        with Image.open(self.frames[i]) as img:
            return np.array(img.convert("RGB"), dtype=np.uint8)


def parse_groundtruth(path: str | Path) -> np.ndarray:
    """Read an OTB ground-truth file into a float64 (T, 4) array of 0-based ``x, y, w, h``.

    Fields may be separated by commas, tabs, spaces or any mix of them (all occur in
    OTB-2015). Trailing blank lines are ignored. ``x`` and ``y`` are converted from 1-based
    to 0-based by subtracting 1.

    Raises:
        ValueError: naming the file and the 1-based line number, for a line that does not
            hold exactly four finite numbers, a box with ``w <= 0`` or ``h <= 0``, a blank
            line followed by more boxes (it would shift every later box by one frame) or a
            file with no box at all.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"{path}: no boxes in ground-truth file")
    boxes = np.empty((len(lines), 4), dtype=np.float64)
    for i, line in enumerate(lines):
        where = f"{path}, line {i + 1}"
        fields = [f for f in _SEPARATORS.split(line.strip()) if f]
        if len(fields) != 4:
            raise ValueError(f"{where}: expected 4 numbers x,y,w,h, got {line!r}")
        try:
            values = [float(f) for f in fields]
        except ValueError:
            raise ValueError(f"{where}: non-numeric value in {line!r}") from None
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{where}: NaN or infinite value in {line!r}")
        if values[2] <= 0 or values[3] <= 0:
            raise ValueError(f"{where}: width and height must be > 0, got {line!r}")
        boxes[i] = values
    boxes[:, :2] -= 1.0  # 1-based (MATLAB) pixel coordinates -> 0-based
    return boxes


def write_boxes(path: str | Path, boxes: np.ndarray) -> None:
    """Write boxes (T, 4), 0-based ``x, y, w, h``, in OTB format: 1-based, comma separated.

    Integral values are written without a decimal point, others with the shortest repr that
    reads back to the same float, so :func:`parse_groundtruth` recovers the boxes (up to the
    rounding of ``x + 1 - 1``). NaN rows (tracker failures) are written as ``nan``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    boxes[:, :2] += 1.0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(",".join(_fmt(v) for v in row) + "\n" for row in boxes))


def _fmt(v: float) -> str:
    if np.isfinite(v) and v == round(v):
        return str(int(v))
    return repr(float(v))


def _split_name(name: str) -> tuple[str, int | None]:
    """``"Jogging.2"`` -> ``("Jogging", 2)``; ``"Biker"`` -> ``("Biker", None)``."""
    base, dot, suffix = name.rpartition(".")
    if dot and suffix.isdigit() and base:
        return base, int(suffix)
    return name, None


def _frame_number(path: Path) -> int | None:
    return int(path.stem) if path.stem.isdigit() else None


def _list_frames(img_dir: Path) -> list[Path]:
    frames = [p for p in img_dir.iterdir() if p.suffix.lower() in _IMAGE_EXTS]
    if not frames:
        raise FileNotFoundError(f"{img_dir}: no image files ({', '.join(sorted(_IMAGE_EXTS))})")
    numbers = [_frame_number(p) for p in frames]
    if all(n is not None for n in numbers):
        # Numeric order, so that 5-digit names (Board: 00001.jpg) or unpadded ones sort right.
        return [p for _, p in sorted(zip(numbers, frames, strict=True))]
    return sorted(frames)


def _groundtruth_file(seq_dir: Path, target: int | None) -> Path:
    if target is not None:
        path = seq_dir / f"groundtruth_rect.{target}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ground-truth file for target {target} not found")
        return path
    path = seq_dir / "groundtruth_rect.txt"
    if path.is_file():
        return path
    targets = _targets(seq_dir)
    if targets:
        raise FileNotFoundError(
            f"{path} not found; {seq_dir.name} has several targets {targets}: "
            f"pass target=... (sequence names {', '.join(f'{seq_dir.name}.{t}' for t in targets)})"
        )
    raise FileNotFoundError(f"{path}: ground-truth file not found")


def _targets(seq_dir: Path) -> list[int]:
    """Target numbers of the non-empty ``groundtruth_rect.N.txt`` files in ``seq_dir``."""
    targets = []
    for p in seq_dir.iterdir():
        m = _TARGET_FILE.match(p.name)
        # OTB-2015's Human4 ships an empty groundtruth_rect.1.txt: skip empty files.
        if m and p.is_file() and p.read_text(encoding="utf-8-sig").strip():
            targets.append(int(m.group(1)))
    return sorted(targets)


def _apply_frame_range(
    name: str, frames: list[Path], boxes: np.ndarray, gt_path: Path
) -> tuple[list[Path], np.ndarray]:
    """Align frames and ground truth, with OTB's standard frame ranges where they apply."""
    frame_range = OTB_FRAME_RANGES.get(name.lower())
    if frame_range is None:
        if len(boxes) > len(frames):
            raise ValueError(
                f"{gt_path}: {len(boxes)} ground-truth boxes but only {len(frames)} frames "
                f"in {frames[0].parent}"
            )
        # Ground truth shorter than the video: OTB evaluates the first len(gt) frames.
        return frames[: len(boxes)], boxes

    start, end = frame_range
    n = end - start + 1
    if len(boxes) == n:
        pass  # the file starts at frame `start` (David, BlurCar*, Football1...)
    elif len(boxes) >= end:
        boxes = boxes[start - 1 : end]  # the file starts at frame 1 (Tiger1)
    else:
        raise ValueError(
            f"{gt_path}: {len(boxes)} boxes, expected {n} (frames {start}-{end}) or at least {end}"
        )
    numbers = [_frame_number(p) for p in frames]
    if all(k is not None for k in numbers):
        selected = [p for p, k in zip(frames, numbers, strict=True) if start <= k <= end]
    else:
        selected = frames[start - 1 : end]
    if len(selected) != n:
        # A copy renumbered from 0001 (e.g. BlurCar1 with exactly 742 files): take them all.
        selected = frames if len(frames) == n else selected
    if len(selected) != n:
        raise ValueError(
            f"{frames[0].parent}: expected frames {start}-{end} ({n} frames) for OTB sequence "
            f"{name}, found {len(selected)} of them among {len(frames)} files"
        )
    return selected, boxes


def load_sequence(seq_dir: str | Path, target: int | None = None) -> Sequence:
    """Load one OTB sequence folder (for a multi-target folder, pass the 1-based ``target``).

    The ground truth decides the frames: OTB-2015's standard frame ranges
    (:data:`OTB_FRAME_RANGES`) are applied by folder name; for other sequences a ground truth
    shorter than the video selects the first ``len(gt)`` frames, a longer one is an error.

    Raises:
        FileNotFoundError: the folder, its ``img`` folder or the ground-truth file is missing.
        ValueError: malformed ground truth, or frames and ground truth cannot be aligned.
    """
    seq_dir = Path(seq_dir)
    if not seq_dir.is_dir():
        raise FileNotFoundError(f"{seq_dir}: sequence folder not found")
    img_dir = seq_dir / "img"
    if not img_dir.is_dir():
        raise FileNotFoundError(f"{img_dir}: image folder not found")
    gt_path = _groundtruth_file(seq_dir, target)
    boxes = parse_groundtruth(gt_path)
    frames, boxes = _apply_frame_range(seq_dir.name, _list_frames(img_dir), boxes, gt_path)
    name = seq_dir.name if target is None else f"{seq_dir.name}.{target}"
    return Sequence(name=name, frames=frames, boxes=boxes)


def list_sequences(root: str | Path) -> list[str]:
    """Sorted sequence names under ``root``; multi-target folders give ``"Name.1"``, ...

    A sub-folder counts as a sequence if it has an ``img`` folder or a ground-truth file, so
    that an incomplete one fails loudly in :func:`load_sequence` instead of being skipped. A
    folder with numbered ground-truth files lists one sequence per target; a plain
    ``groundtruth_rect.txt`` beside them is not one more (a copy of a target, or a warning).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: OTB root folder not found")
    names = []
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        targets = _targets(d)
        if targets:
            _check_plain_copy(d, targets)
            names.extend(f"{d.name}.{t}" for t in targets)
        elif (d / "groundtruth_rect.txt").is_file() or (d / "img").is_dir():
            names.append(d.name)
    return names


def _check_plain_copy(seq_dir: Path, targets: list[int]) -> None:
    """A plain ``groundtruth_rect.txt`` beside numbered ones is never a sequence of its own:
    some OTB copies (Jogging, Skating2) ship one that repeats a target. Checked against them:
    a copy passes silently, anything else is named in a warning (it is ignored either way)."""
    plain = seq_dir / "groundtruth_rect.txt"
    if not plain.is_file():
        return
    try:
        boxes = parse_groundtruth(plain)
    except ValueError as exc:
        warn(f"{plain} is ignored beside the numbered ground-truth files ({exc})")
        return
    for t in targets:
        other = parse_groundtruth(seq_dir / f"groundtruth_rect.{t}.txt")
        if other.shape == boxes.shape and np.array_equal(other, boxes):
            return
    numbered = ", ".join(f"groundtruth_rect.{t}.txt" for t in targets)
    warn(
        f"{plain} differs from every numbered ground-truth file beside it ({numbered}); it is "
        f"ignored: the folder's sequences are {', '.join(f'{seq_dir.name}.{t}' for t in targets)}"
    )


def load_sequences(root: str | Path, names: Iterable[str] | None = None) -> list[Sequence]:
    """Load the sequences ``names`` (default: :func:`list_sequences`) from ``root``."""
    root = Path(root)
    names = list_sequences(root) if names is None else list(names)
    return [_load_named(root, n) for n in names]


def _load_named(root: Path, name: str) -> Sequence:
    if (root / name).is_dir():
        return load_sequence(root / name)
    base, target = _split_name(name)
    if target is None:
        raise FileNotFoundError(f"{root / name}: sequence folder not found")
    return load_sequence(root / base, target)
