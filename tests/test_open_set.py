"""The 1:N decision rule, the primary face and group-average clustering, on their own
(no model needed): the parts that decide whether the app names a stranger."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from models.face_quality import FaceQualityModel, load_quality_model, quality_path
from models.open_set import OpenSetCalibration, calibration_path, load_calibration
from pipeline.library.clustering import _average_linkage
from pipeline.library.identify import DecisionRule, decide, primary_face
from pipeline.results import PersonMatch

CAL = OpenSetCalibration.from_dict({"embedder_version": "e-1", "target_far": 0.01, "floor": 0.9,
                                    "grid": [[1, 0.92], [10, 0.94], [100, 0.95], [1000, 0.96]]})


def test_threshold_grows_with_the_gallery_and_interpolates_in_log_size() -> None:
    assert CAL.threshold(0) == CAL.threshold(1) == pytest.approx(0.92)
    assert CAL.threshold(10) == pytest.approx(0.94)
    # halfway between 10 and 100 in log size: halfway between the thresholds
    assert CAL.threshold(round(math.sqrt(10 * 100))) == pytest.approx(0.945, abs=1e-3)
    # beyond the grid it keeps the last slope per log size, and never passes 1
    assert CAL.threshold(10_000) == pytest.approx(0.97)
    assert CAL.threshold(10**40) == 1.0
    sizes = [1, 3, 10, 30, 100, 300, 1000, 3000, 10**5]
    values = [CAL.threshold(m) for m in sizes]
    assert values == sorted(values)


def test_a_non_monotone_fit_is_made_monotone_and_the_floor_holds() -> None:
    cal = OpenSetCalibration.from_dict({"embedder_version": "e", "target_far": 0.01, "floor": 0.93,
                                        "grid": [[1, 0.91], [10, 0.95], [100, 0.94]]})
    assert cal.threshold(1) == pytest.approx(0.93)  # never below the 1:1 threshold
    assert cal.threshold(100) == pytest.approx(0.95)  # the dip is flattened


def test_calibration_and_quality_files_only_apply_to_their_embedder_version(tmp_path) -> None:
    path = tmp_path / "open_set_x.json"
    path.write_text(json.dumps({"calibrations": [CAL.to_dict()]}))
    assert load_calibration("x", "e-1", path=path) == CAL
    assert load_calibration("x", "e-2", path=path) is None  # another checkpoint: not calibrated
    assert load_calibration("x", "e-1", target_far=0.001, path=path) is None
    model = FaceQualityModel("e-1", np.zeros(4), 0.0, 0.5)
    qpath = tmp_path / "q.json"
    qpath.write_text(json.dumps({"model": model.to_dict()}))
    assert load_quality_model("x", "e-1", path=qpath) is not None
    assert load_quality_model("x", "e-2", path=qpath) is None


def test_the_shipped_dlib_files_are_for_the_shipped_dlib_version() -> None:
    from models.embedders.factory import create_embedder

    version = create_embedder("dlib").version
    assert load_calibration("dlib", version, path=calibration_path("dlib")) is not None
    model = load_quality_model("dlib", version, path=quality_path("dlib"))
    assert model is not None and 0.0 < model.threshold < 1.0


def _people(*sims: float) -> list[PersonMatch]:
    return [PersonMatch(i + 1, f"p{i + 1}", s, True, 10 + i) for i, s in enumerate(sims)]


def test_only_the_best_person_above_the_threshold_is_a_match() -> None:
    rule = DecisionRule(0.95, 100, "calibrated", 0.01)
    accepted = decide(_people(0.97, 0.96), rule)
    assert [p.is_match for p in accepted] == [True, False]
    assert not any(p.is_match for p in decide(_people(0.94, 0.90), rule))  # a stranger: nobody
    assert not any(p.is_match for p in decide(_people(0.99), rule, searchable=False))  # maybe not a face
    assert decide([], rule) == []


def test_the_primary_face_is_the_big_central_searchable_one() -> None:
    big_edge = (0, 0, 200, 200)
    mid_centre = (420, 320, 500, 400)
    small_centre = (440, 340, 470, 370)
    assert primary_face([big_edge, mid_centre, small_centre], 960, 720, [True] * 3) == 0
    assert primary_face([small_centre, mid_centre], 960, 720, [True, True]) == 1
    # a box that may not be a face is never the primary one, however big
    assert primary_face([big_edge, small_centre], 960, 720, [False, True]) == 1
    assert primary_face([big_edge], 960, 720, [False]) is None


def test_average_linkage_does_not_chain_a_line_of_look_alikes() -> None:
    # ten faces in a line: each is very similar to its neighbours (0.96) and to nothing
    # else; single linkage (or DBSCAN with min 2) would make one group of ten
    ids = np.arange(1, 11)
    neighbours = [[(int(j), 0.96) for j in ids if abs(int(j) - int(i)) == 1] for i in ids]
    groups = _average_linkage(ids, neighbours, threshold=0.9, floor=0.8)
    assert max(len(g) for g in groups) <= 2
    assert sorted(f for g in groups for f in g) == list(ids)


def test_average_linkage_joins_a_tight_group_and_keeps_a_second_one_apart() -> None:
    a, b = [1, 2, 3, 4], [5, 6, 7]
    neighbours: dict[int, list[tuple[int, float]]] = {i: [] for i in a + b}
    for group in (a, b):
        for i in group:
            neighbours[i] += [(j, 0.97) for j in group if j != i]
    neighbours[4].append((5, 0.95))  # one look-alike pair across the two people
    neighbours[5].append((4, 0.95))
    ids = np.asarray(a + b)
    groups = sorted(sorted(g) for g in _average_linkage(ids, [neighbours[int(i)] for i in ids], 0.9, 0.8))
    assert groups == [a, b]
