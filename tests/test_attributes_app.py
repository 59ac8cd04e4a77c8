"""The running app (``python app.py``) returns face attributes through gradio_client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image as PILImage
from skimage import data as skdata

from models.attributes.analyzer import AGE_GENDER_WEIGHTS, EMOTION_WEIGHTS
from models.attributes.emotion_net import EMOTIONS
from tests.conftest import start_app


pytestmark = pytest.mark.skipif(not (EMOTION_WEIGHTS.is_file() and AGE_GENDER_WEIGHTS.is_file()),
                                reason="attribute weights not in models/weights/ yet")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[str]:
    extra = ["--database-url", database_url] if database_url else []
    # a generous start-up limit: on a busy shared machine importing torch + gradio alone can take 2 minutes
    with start_app(tmp_path_factory.mktemp("appdata"), args=extra, timeout_s=400) as url:
        yield url


def test_detect_returns_attributes_for_the_astronaut(app_url: str, tmp_path: Path) -> None:
    photo = tmp_path / "astronaut.png"
    PILImage.fromarray(skdata.astronaut()).save(photo)
    client = Client(app_url, verbose=False)
    annotated, crops, table, message = client.predict([handle_file(str(photo))], api_name="/detect")
    assert "1 face(s) found" in message and "attributes" not in message  # no "weights missing" note
    headers = table["headers"]
    assert headers[-5:] == ["emotion", "emotion p", "age", "gender", "gender p"]
    (row,) = table["data"]
    face = dict(zip(headers, row))
    assert face["emotion"] in (*EMOTIONS, "unsure") and 0 < float(face["emotion p"]) <= 1
    assert 0 <= float(face["age"]) <= 100
    assert face["gender"] in ("female", "male") and 0.5 <= float(face["gender p"]) <= 1
    # the crop's caption says it too, e.g. "#1 · 0.99 · happy 0.93 · 38 y · female 0.98"
    assert face["emotion"] in crops[0]["caption"] and face["gender"] in crops[0]["caption"]

    # filters: this face under its own emotion, nothing under another one
    client.predict(face["face id"], "Eileen Collins", api_name="/enroll")
    _, found, found_message = client.predict("Eileen Collins", face["emotion"], "any", None, None,
                                             api_name="/find_faces")
    assert [r[0] for r in found["data"]] == [face["face id"]], found_message
    other = next(e for e in (*EMOTIONS, "unsure") if e != face["emotion"])
    _, none, _ = client.predict("Eileen Collins", other, "any", None, None, api_name="/find_faces")
    assert none["data"] in ([], [[""] * len(none["headers"])], [[None] * len(none["headers"])]) or not any(
        any(c not in ("", None) for c in r) for r in none["data"])
    # /search inputs: photo, k, fixed threshold, automatic threshold?, embeddings in details?, emotion
    _, results, search_message, _ = client.predict(handle_file(str(photo)), 5, 0.0, False, False, face["emotion"],
                                                   api_name="/search")
    assert results["data"][0][4] == face["face id"] and f"emotion is {face['emotion']}" in search_message
