"""The People tab in a real browser (Debian's Chromium through Playwright): select a person
by clicking, rename and merge the selection, and a delete that asks first and says it is final.

Skipped when /usr/bin/chromium or the playwright package is missing. Waits are for text on
the page (``wait_for_function``), never timed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image as PILImage

from tests.conftest import mirrored_astronaut
from tests.test_label_browser import CHROMIUM, _astronaut_on_canvas, _upload, _wait_text, browser, page  # noqa: F401

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed")


def _people(page) -> list[str]:  # noqa: ANN001
    return page.evaluate("[...document.querySelectorAll('#people-table [role=row].virtual-row')].map(r => r.innerText)")


def test_select_by_click_then_rename_merge_and_a_delete_that_asks_first(app_server: str, page,  # noqa: ANN001, F811
                                                                          tmp_path: Path) -> None:
    photos = [tmp_path / f"{who}.png" for who in ("ann", "bob", "cy")]
    PILImage.fromarray(mirrored_astronaut()).save(photos[0])
    PILImage.fromarray(_astronaut_on_canvas(200, 20)).save(photos[1])
    PILImage.fromarray(_astronaut_on_canvas(90, 110)).save(photos[2])
    page.goto(app_server)
    _upload(page, photos, "3 face(s) found")
    # name the faces in the Detect tab (by face id, as users do there)
    for face_id, person in ((1, "Ann Example"), (2, "Bob Example"), (3, "Cy Example")):
        page.get_by_label("Face id").fill(str(face_id))
        page.get_by_label("Person's name").fill(person)
        page.locator("#enroll-button").click()
        _wait_text(page, "#enroll-message", person)

    page.get_by_role("tab", name="People").click()
    _wait_text(page, "#people-table", "Bob Example")
    selected = page.locator("#people-selected input, #people-selected textarea").first

    # a click on a table row selects that person; Rename acts on the selection
    page.locator("#people-table [role=row].virtual-row", has_text="Ann Example").locator("[role=gridcell]").nth(1).click()
    page.wait_for_function("document.querySelector('#people-selected input, #people-selected textarea')"
                           ".value === 'Ann Example'")
    page.locator("#people-rename-to input, #people-rename-to textarea").first.fill("Ann Renamed")
    page.locator("#people-rename").click()
    _wait_text(page, "#people-message", "Renamed to Ann Renamed")
    _wait_text(page, "#people-table", "Ann Renamed")
    page.wait_for_function("document.querySelector('#people-selected input, #people-selected textarea')"
                           ".value === 'Ann Renamed'")

    # merge: select Cy, pick the person to merge into from the list
    page.locator("#people-table [role=row].virtual-row", has_text="Cy Example").locator("[role=gridcell]").nth(1).click()
    page.wait_for_function("document.querySelector('#people-selected input, #people-selected textarea')"
                           ".value === 'Cy Example'")
    page.locator("#people-merge-into input").click()
    page.locator("#people-merge-into [role=option]", has_text="Ann Renamed").click()
    page.locator("#people-merge").click()
    _wait_text(page, "#people-message", "Merged into Ann Renamed (2 face(s))")
    page.wait_for_function("!document.querySelector('#people-table').innerText.includes('Cy Example')")
    page.wait_for_function("document.querySelector('#people-selected input, #people-selected textarea')"
                           ".value === 'Ann Renamed'")

    # a click on a face in the gallery selects its person
    page.locator("#people-gallery button.thumbnail-item", has_text="Bob Example").click()
    page.wait_for_function("document.querySelector('#people-selected input, #people-selected textarea')"
                           ".value === 'Bob Example'")

    # delete asks first, says what goes and that it is final; Cancel deletes nothing
    page.locator("#people-delete").click()
    _wait_text(page, "#people-confirm-text", "Delete the name Bob Example?")
    assert "This is final" in page.locator("#people-confirm-text").inner_text()
    page.locator("#people-confirm-no").click()
    _wait_text(page, "#people-message", "Nothing was deleted.")
    assert any("Bob Example" in row for row in _people(page))

    # asked again and confirmed: gone (its face stays, unnamed); the selection is cleared
    page.locator("#people-delete").click()
    _wait_text(page, "#people-confirm-text", "Delete the name Bob Example?")
    selected.fill("Ann Renamed")  # changing the selection now does not change what the question was about
    page.locator("#people-confirm-yes").click()
    _wait_text(page, "#people-message", "Deleted Bob Example")
    page.wait_for_function("!document.querySelector('#people-table').innerText.includes('Bob Example')")
    assert any("Ann Renamed" in row for row in _people(page))
    page.wait_for_function("document.querySelector('#people-selected input, #people-selected textarea').value === ''")
    page.screenshot(path=str(tmp_path / "people-after-delete.png"), full_page=True)
