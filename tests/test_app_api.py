"""Start the real app (``python app.py``) and drive it through gradio_client's named endpoints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image as PILImage
from skimage import data as skdata

from tests.conftest import start_app


@pytest.fixture(scope="module")
def app_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("appdata")


@pytest.fixture(scope="module")
def app_url(app_data: Path, database_url: str) -> Iterator[str]:
    extra = ["--database-url", database_url] if database_url else []
    with start_app(app_data, args=extra) as url:
        yield url


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("photos")
    astronaut = skdata.astronaut()
    PILImage.fromarray(astronaut).save(folder / "astronaut.png")
    # a second photo of the same person: mirrored, scaled down, darker, on a wider canvas
    other = PILImage.fromarray(astronaut).transpose(PILImage.FLIP_LEFT_RIGHT).resize((360, 360))
    canvas = np.full((500, 640, 3), 70, np.uint8)
    canvas[70:430, 200:560] = (np.asarray(other) * 0.85).astype(np.uint8)
    PILImage.fromarray(canvas).save(folder / "query.jpg", quality=88)
    (folder / "notes.txt").write_text("not an image")
    return {"astronaut": folder / "astronaut.png", "query": folder / "query.jpg", "text": folder / "notes.txt"}


def test_upload_enroll_search_through_named_endpoints(app_url: str, app_data: Path, photos: dict[str, Path]) -> None:
    client = Client(app_url, verbose=False)
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/detect", "/enroll", "/search", "/list_people", "/rename_person", "/merge_people", "/delete_person"} <= set(endpoints)

    annotated, crops, table, message, = client.predict(
        [handle_file(str(photos["astronaut"])), handle_file(str(photos["text"]))], api_name="/detect"
    )
    assert "1 face(s) found" in message and "1 file(s) refused" in message
    assert len(annotated) == 1 and len(crops) == 1
    face_id = table["data"][0][0]
    # Gradio's temporary files live in the data folder; the uploads are gone once stored,
    # and the pictures served are named after the stored photo (privacy deletes find them)
    ui_cache = app_data / "ui-cache"
    assert not [p for p in ui_cache.rglob("*") if p.name in ("astronaut.png", "notes.txt")]
    served = sorted((ui_cache / "facelab-served").glob("*.webp"))
    assert len(served) == 2 and len({p.name[:64] for p in served}) == 1  # photo with boxes + one crop

    enrolled = client.predict(face_id, "Eileen Collins", api_name="/enroll")
    assert "Eileen Collins" in enrolled

    gallery, results, search_message, details = client.predict(
        handle_file(str(photos["query"])), 5, 0.0, True, True, api_name="/search"
    )
    assert "This is" in search_message and "Eileen Collins" in search_message
    assert details["person"] == "Eileen Collins" and details["primary"] == 0
    assert len(details["faces"][0]["embedding"]) == 128  # asked for with the last argument
    top = results["data"][0]
    assert top[1] == "Eileen Collins" and top[4] == face_id and float(top[2]) > 0.5

    people_gallery, people, _ = client.predict(api_name="/list_people")
    assert [row[1] for row in people["data"]] == ["Eileen Collins"] and people["data"][0][2] == 1


def test_errors_come_back_as_messages(app_url: str) -> None:
    client = Client(app_url, verbose=False)
    with pytest.raises(Exception, match="Pick a face first|positive whole number|does not exist"):
        client.predict(123456, "Somebody", api_name="/enroll")
    with pytest.raises(Exception, match="No person called"):
        client.predict("Nobody", "Somebody", api_name="/rename_person")
