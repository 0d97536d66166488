"""Tests of the OTB reader, metrics and experiment runner in ``dfatorch.tracking``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dfatorch.tracking import (
    Experiment,
    Sequence,
    center_error,
    frame_metrics,
    iou,
    list_sequences,
    load_sequence,
    load_sequences,
    parse_groundtruth,
    precision_at,
    precision_curve,
    run_sequence,
    success_auc,
    success_curve,
    write_boxes,
)

OTB_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "otb"


# ----------------------------------------------------------------------------- metrics


def test_iou_identical_and_disjoint() -> None:
    assert iou(np.array([3.0, 4, 10, 20]), np.array([3.0, 4, 10, 20])) == 1.0
    assert iou(np.array([0.0, 0, 10, 10]), np.array([20.0, 20, 5, 5])) == 0.0
    # Touching edges share no area: [0, 10) and [10, 20).
    assert iou(np.array([0.0, 0, 10, 10]), np.array([10.0, 0, 10, 10])) == 0.0


def test_iou_partial_overlap_and_containment() -> None:
    a = np.array([[0.0, 0, 10, 10], [0, 0, 10, 10]])
    b = np.array([[5.0, 5, 10, 10], [2, 2, 5, 5]])
    # 5x5 = 25 shared; union 100 + 100 - 25 = 175. Contained 5x5 box: 25 / 100.
    np.testing.assert_allclose(iou(a, b), [25 / 175, 25 / 100])
    np.testing.assert_allclose(iou(b, a), [25 / 175, 25 / 100])  # symmetric


def test_iou_zero_area_and_nan() -> None:
    a = np.array([[0.0, 0, 0, 10], [0, 0, 0, 0], [0, 0, 10, 10], [0, 0, -5, 10]])
    b = np.array([[0.0, 0, 0, 10], [0, 0, 0, 0], [np.nan, 0, 10, 10], [0, 0, 10, 10]])
    out = iou(a, b)
    assert out[0] == 0.0 and out[1] == 0.0 and out[3] == 0.0
    assert np.isnan(out[2])


def test_center_error_345_triangle() -> None:
    a = np.array([[0.0, 0, 10, 10], [0, 0, 10, 10]])
    b = np.array([[3.0, 4, 10, 10], [2, 1, 4, 8]])  # centres (8, 9) and (4, 5)
    np.testing.assert_allclose(center_error(a, b), [5.0, 1.0])


def test_success_curve_is_strictly_greater() -> None:
    thresholds = np.array([0.25, 0.5, 0.75])
    np.testing.assert_array_equal(success_curve([0.5], thresholds), [1.0, 0.0, 0.0])
    curve = success_curve([0.5])  # default 0, 0.05, ..., 1: ten thresholds below 0.5
    assert curve.shape == (21,)
    np.testing.assert_array_equal(curve, [1.0] * 10 + [0.0] * 11)


def test_success_auc_hand_computed() -> None:
    # IoU 1.0 beats 20 of the 21 thresholds (not 1.0 itself), 0.5 beats 0..0.45 (10),
    # 0.26 beats 0..0.25 (6), 0.0 beats none: (20 + 10 + 6 + 0) / (4 * 21).
    assert success_auc([1.0, 0.5, 0.26, 0.0]) == pytest.approx(36 / 84)
    assert success_auc(np.ones(7)) == pytest.approx(20 / 21)  # the best possible score


def test_precision_boundary_at_20() -> None:
    errors = np.array([20.0, 20.000001, 5.0, 0.0])
    assert precision_at(errors) == pytest.approx(3 / 4)  # 20.0 itself counts
    assert precision_at(errors, 4.0) == pytest.approx(1 / 4)
    curve = precision_curve(np.array([0.0, 1.5, 50.0, 51.0]))
    assert curve.shape == (51,)
    assert (curve[0], curve[1], curve[2], curve[50]) == (0.25, 0.25, 0.5, 0.75)


def test_nan_frames_are_excluded() -> None:
    assert success_auc([1.0, np.nan, 0.5]) == success_auc([1.0, 0.5])
    assert precision_at([np.nan, 10.0, 30.0]) == 0.5
    assert np.all(np.isnan(success_curve([np.nan, np.nan])))
    assert np.isnan(precision_at([]))


def test_frame_metrics_failures_and_missing_ground_truth() -> None:
    pred = np.array([[0.0, 0, 10, 10], [np.nan] * 4, [0, 0, 10, 10]])
    gt = np.array([[0.0, 0, 10, 10], [0, 0, 10, 10], [np.nan] * 4])
    ious, errors = frame_metrics(pred, gt)
    assert ious[0] == 1.0 and errors[0] == 0.0
    assert ious[1] == 0.0 and errors[1] == np.inf  # tracker failure counts as a miss
    assert np.isnan(ious[2]) and np.isnan(errors[2])  # no ground truth: left out
    assert success_auc(ious) == pytest.approx((20 / 21 + 0) / 2)


# ----------------------------------------------------------------------------- parser


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text",
    [
        "11,21,30,40\n2,3,4,5\n",
        "11\t21\t30\t40\n2\t3\t4\t5\n",
        "11 21 30 40\n2 3 4 5\n",
        "11,21 30\t40\n2, 3,\t4  5\n",  # mixed, as in OTB-2015's BlurCar1
        "11,21,30,40\r\n2,3,4,5\n\n  \n",  # CRLF and trailing blank lines
    ],
)
def test_parse_separators_and_one_based(tmp_path: Path, text: str) -> None:
    boxes = parse_groundtruth(_write(tmp_path / "gt.txt", text))
    assert boxes.dtype == np.float64
    np.testing.assert_array_equal(boxes, [[10, 20, 30, 40], [1, 2, 4, 5]])


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("1,2,3,4\n1,2,3\n", 2),
        ("1,2,3,4\n1,2,3,4\n1,2,3,4,5\n", 3),
        ("1,2,3,4\n1,2,x,4\n", 2),
        ("nan,2,3,4\n", 1),
        ("1,2,3,4\n1,2,0,4\n", 2),
        ("1,2,3,-4\n", 1),
        ("1,2,3,4\n\n1,2,3,4\n", 2),  # an inner blank line would shift later frames
    ],
)
def test_parse_malformed_names_file_and_line(tmp_path: Path, text: str, line: int) -> None:
    path = _write(tmp_path / "groundtruth_rect.txt", text)
    with pytest.raises(ValueError, match=rf"groundtruth_rect\.txt, line {line}\b"):
        parse_groundtruth(path)


def test_parse_empty_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no boxes"):
        parse_groundtruth(_write(tmp_path / "gt.txt", "\n"))


def test_write_parse_round_trip(tmp_path: Path) -> None:
    boxes = np.array([[0.0, 0, 10, 20], [12.25, 3.5, 7.125, 9], [-3, 100, 1, 1]])
    write_boxes(tmp_path / "out" / "boxes.txt", boxes)
    text = (tmp_path / "out" / "boxes.txt").read_text()
    assert text.splitlines()[0] == "1,1,10,20"  # OTB format: 1-based, commas
    np.testing.assert_allclose(parse_groundtruth(tmp_path / "out" / "boxes.txt"), boxes)


# ----------------------------------------------------------------------------- sequences


def _make_sequence(
    seq_dir: Path,
    n_frames: int,
    gt: np.ndarray | None,
    *,
    images: bool = False,
    gt_name: str = "groundtruth_rect.txt",
    size: tuple[int, int] = (40, 48),
) -> None:
    """A sequence folder; with ``images``, frames are black with a white box at ``gt``."""
    img_dir = seq_dir / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n_frames):
        path = img_dir / f"{i + 1:04d}.png"
        if not images:
            path.touch()  # listing frames never opens them
            continue
        frame = np.zeros((*size, 3), dtype=np.uint8)
        x, y, w, h = (int(v) for v in gt[i])
        frame[y : y + h, x : x + w] = 255
        Image.fromarray(frame).save(path)
    if gt is not None:
        write_boxes(seq_dir / gt_name, gt)


def _moving_boxes(n: int) -> np.ndarray:
    return np.array([[2 + 2 * i, 3 + i, 8, 6] for i in range(n)], dtype=np.float64)


def test_shorter_ground_truth_selects_first_frames(tmp_path: Path) -> None:
    _make_sequence(tmp_path / "Toy", 10, _moving_boxes(7))
    seq = load_sequence(tmp_path / "Toy")
    assert seq.name == "Toy" and len(seq) == 7 and seq.boxes.shape == (7, 4)
    assert [f.name for f in seq.frames] == [f"{i:04d}.png" for i in range(1, 8)]
    np.testing.assert_array_equal(seq.boxes, _moving_boxes(7))


def test_longer_ground_truth_is_an_error(tmp_path: Path) -> None:
    _make_sequence(tmp_path / "Toy", 5, _moving_boxes(7))
    with pytest.raises(ValueError, match="7 ground-truth boxes but only 5 frames"):
        load_sequence(tmp_path / "Toy")


def test_multi_target_folder_expands(tmp_path: Path) -> None:
    _make_sequence(tmp_path / "Jogging", 6, _moving_boxes(6), gt_name="groundtruth_rect.1.txt")
    write_boxes(tmp_path / "Jogging" / "groundtruth_rect.2.txt", _moving_boxes(6) + 1)
    (tmp_path / "Jogging" / "groundtruth_rect.3.txt").write_text("")  # empty, like Human4's
    _make_sequence(tmp_path / "Biker", 4, _moving_boxes(4))
    assert list_sequences(tmp_path) == ["Biker", "Jogging.1", "Jogging.2"]
    seqs = load_sequences(tmp_path)
    assert [s.name for s in seqs] == ["Biker", "Jogging.1", "Jogging.2"]
    np.testing.assert_array_equal(seqs[2].boxes - seqs[1].boxes, np.ones((6, 4)))
    with pytest.raises(FileNotFoundError, match=r"pass target=.*Jogging\.1"):
        load_sequence(tmp_path / "Jogging")


def test_plain_ground_truth_beside_numbered_ones_is_not_a_sequence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # some OTB copies ship Jogging with groundtruth_rect.1.txt, .2.txt and a plain
    # groundtruth_rect.txt repeating target 1: listed as three sequences, target 1 was counted
    # twice in the average (issue 19)
    _make_sequence(tmp_path / "Jogging", 6, _moving_boxes(6), gt_name="groundtruth_rect.1.txt")
    write_boxes(tmp_path / "Jogging" / "groundtruth_rect.2.txt", _moving_boxes(6) + 1)
    write_boxes(tmp_path / "Jogging" / "groundtruth_rect.txt", _moving_boxes(6))
    _make_sequence(tmp_path / "Biker", 4, _moving_boxes(4))
    assert list_sequences(tmp_path) == ["Biker", "Jogging.1", "Jogging.2"]
    seqs = load_sequences(tmp_path)
    assert capsys.readouterr().err == ""  # a verified copy of target 1: skipped without a word
    assert [s.name for s in seqs] == ["Biker", "Jogging.1", "Jogging.2"]
    np.testing.assert_array_equal(seqs[2].boxes - seqs[1].boxes, np.ones((6, 4)))
    # a plain file that matches no target is still not a sequence, and is named in a warning
    write_boxes(tmp_path / "Jogging" / "groundtruth_rect.txt", _moving_boxes(6) + 5)
    assert list_sequences(tmp_path) == ["Biker", "Jogging.1", "Jogging.2"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ")
    assert re.search(r"Jogging[/\\]groundtruth_rect\.txt differs .* ignored", err[0])


@pytest.mark.parametrize(
    ("name", "files", "gt_lines", "first", "last", "gt_offset"),
    [
        ("David", range(1, 771), 471, "0300", "0770", 0),
        ("Football1", range(1, 82), 74, "0001", "0074", 0),
        ("BlurCar1", range(247, 989), 742, "0247", "0988", 0),  # img/ starts at 0247.jpg
        ("Tiger1", range(1, 355), 354, "0006", "0354", 5),  # gt from frame 1, OTB uses 6-354
    ],
)
def test_otb_frame_ranges(
    tmp_path: Path, name: str, files: range, gt_lines: int, first: str, last: str, gt_offset: int
) -> None:
    (tmp_path / name / "img").mkdir(parents=True)
    for k in files:
        (tmp_path / name / "img" / f"{k:04d}.jpg").touch()
    gt = np.column_stack([np.arange(gt_lines), np.zeros(gt_lines), np.ones((gt_lines, 2))])
    write_boxes(tmp_path / name / "groundtruth_rect.txt", gt)
    seq = load_sequence(tmp_path / name)
    assert (seq.frames[0].stem, seq.frames[-1].stem) == (first, last)
    assert len(seq) == len(seq.boxes) == gt_lines - gt_offset
    assert seq.boxes[0, 0] == gt_offset  # the box of the first kept frame


def test_missing_folders_and_files_name_the_path(tmp_path: Path) -> None:
    (tmp_path / "NoImg").mkdir()
    write_boxes(tmp_path / "NoImg" / "groundtruth_rect.txt", _moving_boxes(3))
    with pytest.raises(FileNotFoundError, match=r"NoImg[/\\]img"):
        load_sequence(tmp_path / "NoImg")
    _make_sequence(tmp_path / "NoGt", 3, None)
    with pytest.raises(FileNotFoundError, match=r"NoGt[/\\]groundtruth_rect\.txt"):
        load_sequence(tmp_path / "NoGt")
    with pytest.raises(FileNotFoundError, match="Nothing"):
        load_sequence(tmp_path / "Nothing")


def test_load_frame_converts_grayscale(tmp_path: Path) -> None:
    Image.fromarray(np.full((5, 7), 100, dtype=np.uint8)).save(tmp_path / "g.png")
    frame = Sequence("g", [tmp_path / "g.png"], np.array([[0.0, 0, 1, 1]])).load_frame(0)
    assert frame.shape == (5, 7, 3) and frame.dtype == np.uint8 and np.all(frame == 100)


# ----------------------------------------------------------------------------- real data


@pytest.mark.data
@pytest.mark.skipif(not OTB_ROOT.is_dir(), reason=f"{OTB_ROOT} not found")
def test_real_otb_sequences() -> None:
    expected = {"Biker": 142, "Couple": 140, "Football1": 74, "MotorRolling": 164}
    assert list_sequences(OTB_ROOT) == sorted(expected)
    for seq in load_sequences(OTB_ROOT):
        assert len(seq) == len(seq.boxes) == expected[seq.name]
        for i in (0, len(seq) - 1):
            frame = seq.load_frame(i)
            assert frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8
        h, w = frame.shape[:2]
        x, y, bw, bh = seq.boxes.T
        assert np.all((bw > 0) & (bh > 0))
        # Boxes may stick out of the frame (Biker's y = -11), but their centres lie inside.
        assert np.all((x + bw / 2 >= 0) & (x + bw / 2 <= w) & (y + bh / 2 >= 0) & (y + bh / 2 <= h))
    # First line of Biker's file is "262,94,16,26" (1-based).
    np.testing.assert_array_equal(load_sequence(OTB_ROOT / "Biker").boxes[0], [261, 93, 16, 26])


# ----------------------------------------------------------------------------- experiment


class OracleTracker:
    """Finds the white box in the synthetic frames: exact ground truth every frame."""

    name = "oracle"

    def __init__(self, calls: list[int] | None = None) -> None:
        self.calls = calls if calls is not None else []
        self.update_seconds = 0.0

    def init(self, image: np.ndarray, box: tuple[float, float, float, float]) -> None:
        assert image.dtype == np.uint8 and image.ndim == 3 and len(box) == 4
        self.update_seconds = 0.0

    def update(self, image: np.ndarray) -> tuple[float, float, float, float]:
        self.calls.append(1)
        self.update_seconds += 0.25  # pretend each online update took 0.25 s
        ys, xs = np.nonzero(image[..., 0] > 128)
        return (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)


class ConstantTracker:
    """Returns its initial box forever."""

    def init(self, image: np.ndarray, box: tuple[float, float, float, float]) -> None:
        self.box = box

    def update(self, image: np.ndarray) -> tuple[float, float, float, float]:
        return self.box


@pytest.fixture
def synthetic_root(tmp_path: Path) -> Path:
    root = tmp_path / "otb"
    _make_sequence(root / "A", 6, _moving_boxes(6), images=True)
    _make_sequence(root / "B", 4, _moving_boxes(4)[::-1].copy(), images=True)
    return root


def test_run_sequence_oracle_and_visualization(synthetic_root: Path, tmp_path: Path) -> None:
    (seq,) = load_sequences(synthetic_root, ["A"])
    result = run_sequence(
        OracleTracker(), seq, visualize_dir=tmp_path / "vis", visualize_frames=(0, 5, 99)
    )
    assert result.name == "A" and result.tracker == "oracle" and result.frames == 6
    np.testing.assert_array_equal(result.boxes, seq.boxes)
    np.testing.assert_array_equal(result.ious, np.ones(6))
    assert result.success_auc == pytest.approx(20 / 21)  # IoU 1 is not > 1: OTB's maximum
    assert result.precision20 == 1.0
    assert result.update_seconds == pytest.approx(5 * 0.25)
    assert result.fps > 0 and result.load_seconds > 0
    assert sorted(p.name for p in (tmp_path / "vis").iterdir()) == ["A_0001.png", "A_0006.png"]


def test_experiment_resume_report_and_plot(synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    exp = Experiment(synthetic_root, out_dir=out)
    assert exp.sequences == ["A", "B"]
    calls: list[int] = []
    seeds_seen: list[int] = []

    def factory(seed: int) -> OracleTracker:
        seeds_seen.append(seed)
        return OracleTracker(calls)

    exp.run("oracle", factory, seeds=(0, 1), progress=False)
    assert len(calls) == 2 * (5 + 3) and seeds_seen == [0, 0, 1, 1]
    assert (out / "oracle" / "seed1" / "A.txt").read_text().splitlines()[0] == "3,4,8,6"
    assert json.loads((out / "oracle" / "seed0" / "B.json").read_text())["frames"] == 4

    exp.run("oracle", factory, seeds=(0, 1), progress=False)  # everything done: no tracking
    assert len(calls) == 16
    (out / "oracle" / "seed1" / "B.json").unlink()  # as if interrupted before B, seed 1
    exp.run("oracle", factory, seeds=(0, 1), progress=False)
    assert len(calls) == 16 + 3

    exp.run("constant", ConstantTracker, progress=False)  # a factory without a seed argument
    report = exp.report(["oracle", "constant"])
    oracle = report["oracle"]
    assert oracle["seeds"] == [0, 1]
    assert oracle["overall"]["success_score"] == pytest.approx(20 / 21)
    assert oracle["overall"]["success_score_pooled"] == pytest.approx(20 / 21)
    assert oracle["overall"]["precision20"] == 1.0
    assert oracle["overall"]["success_score_std"] == 0.0
    assert oracle["sequences"]["B"]["frames"] == 4
    assert oracle["sequences"]["A"]["update_seconds"] == pytest.approx(1.25)
    constant = report["constant"]["overall"]
    assert constant["success_score"] < 20 / 21
    # Mean over sequences vs pooled frames differ when sequences differ in length and score.
    seq_scores = [report["constant"]["sequences"][s]["success_score"] for s in "AB"]
    assert constant["success_score"] == pytest.approx(np.mean(seq_scores))

    png = tmp_path / "plots" / "ope.png"
    exp.plot(["oracle", "constant"], png)
    assert png.stat().st_size > 1000
    with Image.open(png) as img:
        assert img.format == "PNG"

    with pytest.raises(FileNotFoundError, match="no results"):
        exp.report(["nobody"])


def test_report_spread_is_the_sample_std_over_seeds(synthetic_root: Path, tmp_path: Path) -> None:
    exp = Experiment(synthetic_root, out_dir=tmp_path / "results")
    # Seed 0 tracks exactly, seeds 1 and 2 stand still: the per-seed scores differ.
    exp.run(
        "mixed",
        lambda seed: ConstantTracker() if seed else OracleTracker(),
        seeds=(0, 1, 2),
        progress=False,
    )
    exp.run("single", ConstantTracker, seeds=(0,), progress=False)
    report = exp.report(["mixed", "single"])
    for seq in ("A", "B"):
        aucs = [exp.load_result("mixed", seq, s).success_auc for s in (0, 1, 2)]
        mean = sum(aucs) / 3
        sample_std = (sum((a - mean) ** 2 for a in aucs) / 2) ** 0.5  # n - 1, as in experiments
        got = report["mixed"]["sequences"][seq]
        assert got["success_score"] == pytest.approx(mean)
        assert got["success_score_std"] == pytest.approx(sample_std)
        assert sample_std > 0
    # One seed: the spread is unknown, not zero.
    assert report["single"]["overall"]["success_score_std"] is None
    assert report["single"]["sequences"]["A"]["precision20_std"] is None


def test_tracker_factory_gets_the_seed_only_when_it_asks() -> None:
    from dfatorch.tracking.evaluate import _make_tracker

    assert _make_tracker(lambda s: ("seed", s), 7) == ("seed", 7)
    assert _make_tracker(lambda *, seed: ("kw", seed), 7) == ("kw", 7)
    assert _make_tracker(lambda calls=None: ("default", calls), 7) == ("default", None)
    assert isinstance(_make_tracker(ConstantTracker, 7), ConstantTracker)


def test_report_recomputes_tracking_tables_from_the_per_frame_records(tmp_path):
    """The tracking section of docs/RESULTS.md comes from every frame's box and ground truth, not
    from a stored score: a tampered stored score does not reach the table."""
    import numpy as np

    from dfatorch._io import write_json
    from dfatorch.report import _tracking_section
    from dfatorch.tracking.evaluate import SequenceResult, success_auc

    gt = np.tile([[10.0, 10.0, 20.0, 20.0]], (5, 1))
    expected = {}
    for rule, shift in (("bp", 2.0), ("dfa", 6.0)):
        for seed in (0, 1):
            boxes = gt + np.array([shift + seed, 0.0, 0.0, 0.0])
            r = SequenceResult.from_boxes("Seq", f"mdnet-{rule}", boxes, gt, track_seconds=1.0)
            record = r.to_dict() | {"success_auc": 0.999, "seed": seed}  # tampered score
            write_json(tmp_path / "tracking" / f"mdnet-{rule}" / f"seed{seed}" / "Seq.json", record)
            expected.setdefault(rule, []).append(success_auc(r.ious))
    lines = _tracking_section(tmp_path / "tracking", tmp_path / "docs" / "RESULTS.md")
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ")}
    for rule, scores in expected.items():
        assert f"| {np.mean(scores):.3f} ± {np.std(scores, ddof=1):.3f} |" in rows[rule]
    assert "0.999" not in "\n".join(lines)
    assert (tmp_path / "docs" / "figures" / "tracking-success_precision.png").is_file()


def test_report_shows_where_the_tracking_time_goes() -> None:
    from dfatorch.report import _tracking_phases

    phases = {"ms_per_frame": {"features": 10.0, "update": 30.0}}
    phases["share"] = {k: v / 40.0 for k, v in phases["ms_per_frame"].items()}
    lines = _tracking_phases({"bp": {"phases_640x360": phases}, "bdfa": {"fps_all": 1.0}})
    assert "| phase | bp |" in lines
    assert "| features | 10.0 (25%) |" in lines and "| update | 30.0 (75%) |" in lines
    assert _tracking_phases({"bp": {"fps_all": 1.0}}) == []  # a JSON written before phases
