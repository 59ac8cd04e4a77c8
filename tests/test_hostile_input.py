"""Hostile input everywhere: names and file names full of HTML/JS/Markdown render as text
in a real browser on every tab; API parameters out of range or of the wrong type get clear
refusals; size and count limits say what the limit is. The app keeps working afterwards."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image as PILImage
from skimage import data as skdata

from pipeline.library import identities
from pipeline.context import Lab
from pipeline.errors import InvalidRequest, NotFound
from pipeline.library.ingest import Upload, ingest
from pipeline.library.search import search_image
from pipeline.settings import Settings
from pipeline.text import md
from tests.conftest import start_app

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_MS = 60_000
XSS_NAME = "<img src=x onerror=window.__xss=1>"
MD_NAME = "[click](javascript:window.__xss=2) **bold** <script>window.__xss=3</script>"
XSS_FILE = "<img src=x onerror=window.__xss=4>.png"
XSS_TEXT_FILE = "<b onmouseover=window.__xss=5>bad.txt"
XSS_MISSING = "<img src=x onerror=window.__xss=6>"
XSS_TYPED = "<img src=x onerror=window.__xss=7> **not bold** [link](javascript:window.__xss=8)"
#: what a refusal must not look like: an internal error leaking through
INTERNALS = re.compile(r"Traceback|sqlalchemy|psycopg|File \"|/work/|site-packages", re.I)


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _mirrored(scale: float = 0.85) -> np.ndarray:
    img = PILImage.fromarray(skdata.astronaut()).transpose(PILImage.FLIP_LEFT_RIGHT).resize((380, 380))
    canvas = np.full((500, 620, 3), 70, np.uint8)
    canvas[60:440, 200:580] = (np.asarray(img) * scale).astype(np.uint8)
    return canvas


# -- markdown escaping, no browser -----------------------------------------------------------------
@pytest.mark.parametrize("text", [XSS_NAME, MD_NAME, "<svg/onload=alert(1)>", "a|b\n| --- |", "![x](http://x/y.png)",
                                  "`code` <a href='javascript:1'>x</a>", "&lt;img src=x&gt;"])
def test_md_leaves_no_live_html_or_markdown(text: str) -> None:
    import markdown_it  # the CommonMark parser family Gradio's Markdown follows

    rendered = markdown_it.MarkdownIt("commonmark").render(md(text))
    assert "<img" not in rendered and "<script" not in rendered and "<svg" not in rendered and "<a " not in rendered
    assert "<strong>" not in rendered and "<code>" not in rendered and "<table" not in rendered


# -- limits, in-process ------------------------------------------------------------------------------
def test_size_and_count_limits_are_enforced_with_clear_messages(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, match_threshold=0.8, max_upload_bytes=200_000, max_pixels=300_000,
                        max_files_per_batch=3)
    with Lab.open(settings) as lab:
        with pytest.raises(InvalidRequest, match="limit is 3"):
            ingest(lab, [Upload(f"{i}.png", data=b"x") for i in range(4)])
        big_file = np.random.default_rng(0).integers(0, 255, (400, 600, 3), dtype=np.uint8)  # noise: ~700 kB PNG
        huge = _png(np.zeros((1000, 1000, 3), np.uint8))  # small file, 1 megapixel
        report = ingest(lab, [Upload("big.png", data=_png(big_file)), Upload("huge.png", data=huge)])
        big, many = report.files
        assert not big.ok and "limit" in big.error and "MB" in big.error
        assert not many.ok and "megapixels" in many.error and "limit" in many.error
        with pytest.raises(InvalidRequest, match="larger than"):
            search_image(lab, _png(big_file), k=5)
        for name in ("x" * 121, "\x00\x07\x1b", "   "):
            with pytest.raises(InvalidRequest, match="name|Name"):
                identities.clean_name(name)
        # bidi overrides and control characters never reach a stored name
        assert identities.clean_name("ab\u202e\x00cd") in ("ab\u202ecd", "abcd")
        with pytest.raises(NotFound):
            identities.enroll(lab, 10**12, "Nobody")


# -- the running app: API parameters -----------------------------------------------------------------
@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    data_dir = tmp_path_factory.mktemp("hostile")
    with Lab.open(Settings(data_dir=data_dir, match_threshold=0.8)) as lab:
        first, second = ingest(lab, [Upload(XSS_FILE, data=_png(skdata.astronaut())),
                                     Upload("second.png", data=_png(_mirrored(0.9)))]).files
        identities.enroll(lab, first.faces[0].face_id, XSS_NAME)
        identities.enroll(lab, second.faces[0].face_id, MD_NAME)
    photos = tmp_path_factory.mktemp("hostile-photos")
    PILImage.fromarray(_mirrored(0.75)).save(photos / "query.jpg", quality=90)
    PILImage.fromarray(_mirrored(0.6)).save(photos / XSS_FILE)
    (photos / XSS_TEXT_FILE).write_text("not an image")
    with start_app(data_dir) as url:
        yield url, photos


def _refused(client: Client, *args: object, api_name: str, expect: str) -> str:
    with pytest.raises(Exception) as info:  # noqa: PT011 - gradio_client raises AppError
        client.predict(*args, api_name=api_name)
    message = str(info.value)
    assert re.search(expect, message), (api_name, args, message)
    assert not INTERNALS.search(message), message
    return message


def test_api_parameters_out_of_range_or_of_the_wrong_type(app: tuple[str, Path]) -> None:
    url, photos = app
    client = Client(url, verbose=False)
    query = handle_file(str(photos / "query.jpg"))
    for k in (0, -5, 101, 10**9):
        _refused(client, query, k, 0.5, api_name="/search", expect=r"k must|greater|less|between|range|[Mm]ax|[Mm]in")
    for threshold in (1.5, -2.0, 1e308):
        _refused(client, query, 5, threshold, api_name="/search", expect=r"threshold|greater|less|[Mm]ax|[Mm]in")
    _refused(client, query, "ten", 0.5, api_name="/search", expect=r".")
    _refused(client, None, 5, 0.5, api_name="/search", expect="Choose a photo")
    # (2.5 is not refused: gr.Number(precision=0) rounds it to face 2 before the app sees it)
    for face in (-1, 0, 10**12):
        _refused(client, face, "Someone", api_name="/enroll", expect=r"positive whole number|does not exist|Pick a face")
    _refused(client, None, "Someone", api_name="/enroll", expect="Pick a face")
    _refused(client, 1, "x" * 5000, api_name="/enroll", expect="at most 120 characters")
    _refused(client, 1, "\x00\x01\t ", api_name="/enroll", expect="Type a name")
    _refused(client, "x" * 100_000, "y", api_name="/rename_person", expect="at most 120 characters")
    for image_id in (-1, 10**12):
        _refused(client, image_id, "any", False, "", 0.0, api_name="/label_load",
                 expect=r"positive whole number|does not exist|[Nn]o image|not found|less than minimum")
    _refused(client, 1, "<script>", False, "", 0.0, api_name="/label_load", expect="not in the list of choices")
    # still healthy: a normal search answers, with the hostile name as plain data
    _, results, message, _ = client.predict(query, 5, 0.0, api_name="/search")
    assert {row[1] for row in results["data"]} >= {XSS_NAME}


def _app_process(url: str):  # noqa: ANN202 - a psutil.Process
    """The `python app.py ... --port PORT` process this test session started for ``url``."""
    import psutil

    port = url.rstrip("/").rsplit(":", 1)[1]
    for child in psutil.Process().children(recursive=True):
        cmdline = child.cmdline()
        if "app.py" in cmdline and port in cmdline:
            return child
    raise AssertionError(f"no app process on port {port}")


def _peak_rss_mb(process) -> float:  # noqa: ANN001
    """The process's peak resident memory so far (VmHWM), in MiB."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_search_refuses_a_pixel_bomb_before_decoding_it(app: tuple[str, Path], tmp_path: Path) -> None:
    """A 164 KB PNG of 13000 x 13000 pixels (507 MB as RGB): /search used to hand it to
    Gradio's gr.Image, which decoded it before FaceLab saw it (9 s, ~650 MB). Now FaceLab
    reads the header and refuses it; the app's peak memory does not move."""
    from tests.conftest import huge_png

    url, photos = app
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(huge_png(13000, 13000))
    assert len(bomb.read_bytes()) < 200_000
    process = _app_process(url)
    client = Client(url, verbose=False)
    client.predict(handle_file(str(photos / "query.jpg")), 5, 0.0, api_name="/search")  # a normal search first
    before = _peak_rss_mb(process)
    message = _refused(client, handle_file(str(bomb)), 5, 0.5, api_name="/search",
                       expect=r"13000x13000 = 169\.0 megapixels; the limit is 50\.0 megapixels")
    grown = _peak_rss_mb(process) - before
    print(f"pixel bomb on /search: {message!r}; peak memory of the app grew by {grown:.1f} MiB")
    assert grown < 100, grown  # decoding it takes 169 MB as grayscale, 507 MB as RGB
    # empty and text files: a clear message, not a bare "Error"
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a photo at all")
    _refused(client, handle_file(str(tmp_path / "empty.jpg")), 5, 0.5, api_name="/search",
             expect=r"the file is empty \(0 bytes\)")
    _refused(client, handle_file(str(tmp_path / "notes.txt")), 5, 0.5, api_name="/search",
             expect=r"not an image, or a format this app does not accept")


# -- the running app in a real browser ----------------------------------------------------------------
@pytest.fixture(scope="module")
def page(app: tuple[str, Path]):  # noqa: ANN201 - a Playwright page
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(TIMEOUT_MS)
        opened = context.new_page()
        opened.goto(app[0])
        opened.wait_for_selector("#status-line")
        yield opened
        browser.close()


def _no_script_ran(page) -> None:  # noqa: ANN001
    assert page.evaluate("window.__xss") is None
    assert page.evaluate("document.querySelectorAll('img[src=x], b[onmouseover]').length") == 0
    assert page.evaluate("[...document.scripts].filter(s => s.textContent.includes('__xss')).length") == 0


def _wait_text(page, selector: str, text: str) -> None:  # noqa: ANN001
    try:
        page.wait_for_function("([s, t]) => (document.querySelector(s)?.innerText || '').includes(t)",
                               arg=[selector, text])
    except Exception as exc:
        shown = page.evaluate("s => document.querySelector(s)?.innerText", selector)
        raise AssertionError(f"{selector} never showed {text!r}; it shows {shown!r}") from exc


@pytest.mark.browser
def test_names_render_as_text_on_every_tab(page, app: tuple[str, Path], tmp_path: Path) -> None:  # noqa: ANN001
    _, photos = app
    page.get_by_role("tab", name="People").click()  # opening the tab lists everyone
    _wait_text(page, "#people-table", XSS_NAME)
    _wait_text(page, "#people-table", "**bold**")
    _wait_text(page, "#people-gallery", XSS_NAME)
    _no_script_ran(page)

    page.get_by_role("tab", name="Detect").click()
    files = [str(photos / XSS_FILE), str(photos / XSS_TEXT_FILE)]
    page.locator("#detect-files input[type=file]").set_input_files(files)
    page.locator("#detect-button").click()
    _wait_text(page, "#detect-message", "refused")
    # Gradio's upload already drops < > from file names; the rest is shown as text
    _wait_text(page, "#detect-message", "onmouseover=window.__xss=5bad.txt")
    _wait_text(page, "#detect-annotated", "onerror=window.__xss=4")
    _wait_text(page, "#detect-table", "onerror=window.__xss=4")
    _no_script_ran(page)
    # a name typed by the user goes through Markdown in the confirmation message
    table = page.evaluate("document.querySelector('#detect-table').innerText")
    face_id = re.search(r"\d+", table.split("similarity", 1)[1]).group(0)  # first cell of the first row
    page.get_by_label("Face id").fill(face_id)
    page.get_by_label("Person's name").fill(XSS_TYPED)
    page.locator("#enroll-button").click()
    _wait_text(page, "#enroll-message", XSS_TYPED)
    _no_script_ran(page)

    page.get_by_role("tab", name="Search").click()
    page.locator("#search-image input[type=file]").set_input_files(str(photos / "query.jpg"))
    page.locator("#search-button").click()
    _wait_text(page, "#search-message", "threshold")
    _wait_text(page, "#search-table", XSS_NAME)
    _wait_text(page, "#search-gallery", XSS_NAME)
    _no_script_ran(page)

    page.get_by_role("tab", name="People").click()  # an error that quotes the hostile input
    page.get_by_role("textbox", name="Selected person").fill(XSS_MISSING)
    page.get_by_label("New name").fill("Anyone")
    page.get_by_role("button", name="Rename").click()
    page.wait_for_function("document.body.innerText.includes('No person called')")
    toast = page.evaluate("[...document.querySelectorAll('*')].filter(e => e.children.length === 0 && "
                          "e.innerText && e.innerText.includes('No person called')).map(e => e.innerText)")
    assert toast and all(XSS_MISSING in t for t in toast), toast  # shown literally, not run, not "&lt;"
    _no_script_ran(page)

    # each tab is checked once its content is on screen (the Label tab: after its first load)
    for tab, ready in (("Label", "#label-counts"), ("Data", "#export-button"), ("Train", "#train-status")):
        page.get_by_role("tab", name=tab).click()
        page.wait_for_function("s => (document.querySelector(s)?.innerText || '').trim().length > 0", arg=ready)
        _no_script_ran(page)
    page.screenshot(path=str(tmp_path / "hostile-last-tab.png"), full_page=True)


def test_uploads_over_the_size_limit_are_refused_before_they_are_stored(app: tuple[str, Path], tmp_path: Path) -> None:
    import httpx

    url, _ = app
    limit = Settings().max_upload_bytes
    big = tmp_path / "big.jpg"
    with big.open("wb") as fh:  # sparse: no disk or memory spent on zeros
        fh.truncate(limit + 1024)
    with big.open("rb") as fh:
        response = httpx.post(url.rstrip("/") + "/gradio_api/upload", files={"files": ("big.jpg", fh)}, timeout=120)
    assert response.status_code == 413, response.text[:300]
    assert "size" in response.text.lower()
