"""Hardening of the data folder and of the command line: what ``ingest`` will not read,
who may read the data folder, what a full disk and hostile datasets get, what ``check``
reports, where exports live and when they go. (The web app's side: tests/test_auth.py
and tests/test_hostile_input.py.)"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from pipeline.datasets import downloads
from pipeline.library import privacy
from pipeline.datasets.archive import ArchiveLimits, open_source
from pipeline.context import Lab
from pipeline.datasets.readers import ImportRejected, read_dataset
from pipeline.errors import InvalidRequest, NotFound
from pipeline.datasets.import_data import SAME_BOX_PX, BoxDeduper, _check_images, _plan, import_dataset
from pipeline.library.ingest import Upload, ingest
from pipeline.settings import Settings
from tests.conftest import astronaut_photo

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "FACELAB_MATCH_THRESHOLD": "0.8", "YOLO_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}


def _app(*args: str, data: Path, timeout: float = 300, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "app.py", "--data", str(data), *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout, input=input)


# -- ingest reads plain files only ---------------------------------------------------------
@pytest.mark.slow  # runs python app.py in a subprocess
def test_ingest_refuses_links_and_pipes_without_reading_them(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(astronaut_photo(1))  # a real photo: following the link would import it
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "real.jpg").write_bytes(astronaut_photo(2))
    (folder / "sub" / "linked.jpg").symlink_to(outside / "secret.jpg")
    (folder / "linked-folder").symlink_to(outside)
    (folder / "passwd.png").symlink_to("/etc/passwd")
    os.mkfifo(folder / "pipe.jpg")  # reading it would wait forever
    os.mkfifo(tmp_path / "given.png")
    data = tmp_path / "data"
    # timeout: a FIFO that is opened for reading blocks until a writer comes; it must not
    proc = _app("ingest", str(folder), str(tmp_path / "given.png"), data=data, timeout=240)
    assert proc.returncode == 1, proc.stderr[-2000:]
    refused = [line for line in proc.stderr.splitlines() if line.startswith("refused ")]
    assert sorted(refused) == sorted([
        "refused given.png: is a pipe, socket or device, not a file; not read",
        "refused linked-folder: is a symbolic link, not read (copy the real file instead)",
        "refused passwd.png: is a symbolic link, not read (copy the real file instead)",
        "refused pipe.jpg: is a pipe, socket or device, not a file; not read",
        "refused linked.jpg: is a symbolic link, not read (copy the real file instead)",
    ]), proc.stderr[-2000:]
    assert "1 new image(s) imported" in proc.stdout
    assert "root:" not in proc.stdout + proc.stderr
    with Lab.open(Settings(data_dir=data, match_threshold=0.8)) as lab:
        assert len(list(lab.images.iter_shas())) == 1  # only real.jpg


# -- who may read the data folder ------------------------------------------------------------
def _modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        if not path.is_symlink():
            out[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    return out


@pytest.mark.slow  # runs python app.py in a subprocess
def test_the_data_folder_is_for_its_owner_only(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(astronaut_photo(3))
    data = tmp_path / "data"
    proc = _app("ingest", str(photo), data=data)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modes = _modes(data)
    assert any(name.startswith("images/") and name.endswith(".jpg") for name in modes)
    assert any(name.startswith("index/") for name in modes) and "facelab.sqlite3" in modes
    open_to_others = {name: oct(mode) for name, mode in modes.items() if mode & 0o077}
    assert not open_to_others
    assert all(mode == 0o700 for name, mode in modes.items() if (data / name).is_dir())
    # a folder made by an older FaceLab (0755, database 0644) is closed when opened
    old = tmp_path / "old"
    shutil.copytree(data, old)
    os.chmod(old, 0o755)
    os.chmod(old / "facelab.sqlite3", 0o644)
    proc = _app("check", data=old)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert stat.S_IMODE(old.stat().st_mode) == 0o700
    assert stat.S_IMODE((old / "facelab.sqlite3").stat().st_mode) == 0o600
    assert "was open to other users" in proc.stderr


# -- a full disk: one clear line --------------------------------------------------------------
def _unshare_available() -> bool:
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30) \
        if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


@pytest.mark.slow  # runs python app.py in a subprocess
def test_a_full_disk_gives_one_clear_line_and_loses_nothing(tmp_path: Path) -> None:
    """A real full disk: a 3 MiB tmpfs mounted in a private mount namespace (``unshare``),
    holding the data folder; the app's commands run on it."""
    if not _unshare_available():
        pytest.skip("needs `unshare -rm` (user and mount namespaces) to mount a tiny tmpfs")
    mount = tmp_path / "tiny"
    mount.mkdir()
    photo = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    PILImage.fromarray(rng.integers(0, 255, (700, 700, 3), dtype=np.uint8)).save(photo)  # ~1.5 MB, incompressible
    script = tmp_path / "full.py"
    script.write_text(f'''
import os, subprocess, sys, json
mount, data = {str(mount)!r}, {str(mount / "data")!r}
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", mount], check=True)
env = {{**os.environ, "FACELAB_MATCH_THRESHOLD": "0.8"}}
def app(*args, input=None):
    p = subprocess.run([sys.executable, "app.py", "--data", data, *args], cwd={str(REPO)!r}, env=env,
                       capture_output=True, text=True, input=input)
    return {{"rc": p.returncode, "out": p.stdout, "err": p.stderr}}
out = {{"setup": app("check")}}
def fill(leave_kb):
    st = os.statvfs(mount)
    with open(os.path.join(mount, "filler"), "ab") as fh:
        try:
            fh.write(bytes(max(0, st.f_bavail * st.f_frsize - leave_kb * 1024)))
        except OSError:
            pass
fill(300)  # room for the database, not for the photo
out["ingest_photo_too_big"] = app("ingest", {str(photo)!r})
# the web app's callbacks say the same (webapp/endpoints.py)
sys.path.insert(0, {str(REPO)!r}); os.chdir({str(REPO)!r})
from pipeline.context import Lab
from pipeline.settings import Settings
import gradio as gr
from webapp.endpoints import Endpoints
from webapp import views
with Lab.open(Settings(data_dir=data, match_threshold=0.8)) as lab:
    detect = Endpoints(lab)("detect")(lambda files: views.detect(lab, files))
    try:
        detect([{str(photo)!r}])
        out["web"] = "ran"
    except gr.Error as exc:
        out["web"] = exc.message
os.remove(os.path.join(mount, "filler")); fill(0)  # nothing left at all
out["ingest_full"] = app("ingest", {str(photo)!r})
out["users_add_full"] = app("users", "add", "eve", "--password-stdin", input="a-long-enough-password\\n")
out["export_full"] = app("export", "yolo", os.path.join(mount, "out.zip"))
os.remove(os.path.join(mount, "filler"))
out["check_after"] = app("check", "--repair")
out["check_again"] = app("check")
print(json.dumps(out))
''')
    proc = subprocess.run(["unshare", "-rm", sys.executable, str(script)], capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["setup"]["rc"] == 0, out["setup"]
    for step in ("ingest_photo_too_big", "ingest_full", "users_add_full", "export_full"):
        result = out[step]
        assert result["rc"] == 1, (step, result)
        errors = [line for line in result["err"].splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "full" in errors[0], (step, result["err"][-1500:])
        assert "Traceback" not in result["err"], (step, result["err"][-1500:])
    assert "No space left on device" in out["ingest_photo_too_big"]["err"]
    assert "disk" in out["web"] and "full" in out["web"], out["web"]
    assert out["check_after"]["rc"] == 0 and out["check_again"]["rc"] == 0, out["check_again"]
    assert "consistent" in out["check_again"]["out"] and "0 image(s)" in out["check_again"]["out"]


# -- check reports what interrupted writes left ------------------------------------------------
@pytest.mark.slow  # runs python app.py in a subprocess
def test_check_reports_stale_temp_files_and_repair_removes_them(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with Lab.open(Settings(data_dir=data, match_threshold=0.8)) as lab:
        ingest(lab, [Upload("a.jpg", data=astronaut_photo(4))])
        sha = next(lab.images.iter_shas())
    stale = data / "images" / sha[:2] / sha[2:4] / ".tmp-k3j2h1.part"  # a photo copy cut off by a crash
    stale.write_bytes(b"\xff\xd8 half a photo")
    old = time.time() - 3 * 3600
    os.utime(stale, (old, old))
    fresh = data / "index" / ".dlib.faiss.x1y2.tmp"  # a write going on right now
    fresh.write_bytes(b"x")
    proc = _app("check", data=data)
    assert proc.returncode == 1, proc.stdout
    assert "problem: 1 temp file(s) left by a write that did not finish" in proc.stdout
    assert f"images/{sha[:2]}/{sha[2:4]}/.tmp-k3j2h1.part" in proc.stdout
    assert "1 temp file(s) younger than 10 min" in proc.stdout
    proc = _app("check", "--repair", data=data)
    assert proc.returncode == 0 and "deleted 2 temp or expired export file(s)" in proc.stdout, proc.stdout
    assert not stale.exists() and not fresh.exists()
    assert _app("check", data=data).returncode == 0


# -- hostile datasets ------------------------------------------------------------------------
def _coco_zip(path: Path, boxes: list[list[float]], size: tuple[int, int] = (2000, 2000), extra: str = "") -> Path:
    """One plain image and a COCO file with ``boxes`` ([x, y, w, h]) on it."""
    buf = io.BytesIO()
    PILImage.new("RGB", size, (90, 90, 90)).save(buf, format="PNG")
    anns = ",".join(f'{{"id": {i}, "image_id": 1, "category_id": 1, "bbox": [{", ".join(map(str, b))}]}}'
                    for i, b in enumerate(boxes, start=1))
    doc = ('{"images": [{"id": 1, "file_name": "one.png", "width": %d, "height": %d}], '
           '"categories": [{"id": 1, "name": "face"}], "annotations": [%s%s]}' % (*size, anns, extra))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("images/one.png", buf.getvalue())
        zf.writestr("annotations.json", doc)
    return path


@pytest.mark.slow  # runs python app.py in a subprocess
def test_a_huge_number_in_a_coco_box_is_one_problem_line(tmp_path: Path) -> None:
    zip_path = _coco_zip(tmp_path / "overflow.zip", [[10, 10, 50, 50]], extra=', {"id": 9, "image_id": 1, '
                         '"category_id": 1, "bbox": [1' + "0" * 400 + ', 1, 2, 3]}')
    proc = _app("import", str(zip_path), data=tmp_path / "data")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "annotations[1] (id 9): bbox has a number too large to use" in proc.stderr


def test_box_caps_per_image_and_per_import(tmp_path: Path) -> None:
    with Lab.open(Settings(data_dir=tmp_path / "data", match_threshold=0.8)) as lab:
        many = [[10 + 3 * (i % 100), 10 + 3 * (i // 100), 20, 20] for i in range(60)]
        per_image = _coco_zip(tmp_path / "per-image.zip", many)
        with pytest.raises(ImportRejected, match="more than 50 boxes on one image; the limit is 50"):
            import_dataset(lab, per_image, limits=ArchiveLimits(max_boxes_per_image=50))
        with pytest.raises(InvalidRequest, match="more than 40 boxes in this dataset; the limit for one import is 40"):
            import_dataset(lab, per_image, limits=ArchiveLimits(max_boxes=40))
        with lab.sessions() as session:  # nothing was imported
            from storage.orm import Image

            assert session.query(Image).count() == 0
    assert ArchiveLimits().max_boxes == 250_000 and ArchiveLimits().max_boxes_per_image == 5_000


def _scan_first_match(known: list[tuple[float, ...]], box: tuple[float, ...]) -> int | None:
    """The scan BoxDeduper replaced: the first known box within SAME_BOX_PX on every side."""
    return next((i for i, k in enumerate(known) if max(abs(a - b) for a, b in zip(box, k)) <= SAME_BOX_PX), None)


def test_box_dedupe_agrees_with_a_full_scan_and_is_not_quadratic() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 300, (600, 4))
    base[:, 2:] += base[:, :2] + 5
    # near copies within and just outside the tolerance, exact copies, values on cell edges
    jitter = rng.choice([0.0, 0.25, 0.5, 0.49, 0.51, 1.0], (600, 4)) * rng.choice([-1, 1], (600, 4))
    boxes = [tuple(b) for b in np.concatenate([base, base + jitter, np.round(base), np.round(base) + 0.5])]
    order = rng.permutation(len(boxes))
    known: list[tuple[float, ...]] = []
    dedupe = BoxDeduper()
    for i in order:
        expected = _scan_first_match(known, boxes[i])
        assert dedupe.first_match(boxes[i]) == expected
        if expected is None:
            known.append(boxes[i])
            dedupe.add(boxes[i])
    # 4,000 boxes on one image: the scan compared ~8 million pairs
    grid = [(float(x), float(y), float(x + 12), float(y + 12)) for x in range(0, 2000, 30) for y in range(0, 1800, 30)]
    grid = grid[:4000]
    dedupe = BoxDeduper()
    for box in grid:
        assert dedupe.first_match(box) is None
        dedupe.add(box)
    assert dedupe.comparisons <= 4 * len(grid), dedupe.comparisons  # linear, not n²/2 = 8e6
    # every box again, nudged: each found, still a handful of comparisons each
    before = dedupe.comparisons
    assert all(dedupe.first_match((x + 0.3, y - 0.3, x2, y2 + 0.5)) == i for i, (x, y, x2, y2) in enumerate(grid))
    assert dedupe.comparisons - before <= 16 * len(grid)


def test_a_4000_box_image_is_planned_without_quadratic_work(tmp_path: Path, database_url: str) -> None:
    """The import's planning (parse, decode, compare with the stored faces, dedupe) on one
    image with 4,000 boxes, 200 of them given twice; bench/import_plan.py times it."""
    boxes = [[float(20 + 30 * (i % 60)), float(20 + 30 * (i // 60)), 20.0, 20.0] for i in range(3800)]
    boxes += [[b[0] + 0.25, b[1], b[2], b[3] - 0.25] for b in boxes[:200]]
    zip_path = _coco_zip(tmp_path / "crowd.zip", boxes)
    with Lab.open(Settings(data_dir=tmp_path / "data", database_url=database_url, match_threshold=0.8)) as lab:
        with open_source(zip_path) as source:
            _fmt, entries, findings = read_dataset(source)
            metas = _check_images(lab, source, entries, findings, None)
            findings.check(source.label)
            plan = _plan(lab, entries, metas)
    assert sum(len(p.boxes) for p in plan.plans) == 3800 and plan.repeated == 200 and plan.existing == 0
    assert plan.comparisons <= 4 * 4000, plan.comparisons
    print(f"planned 4,000 boxes in {plan.seconds:.3f} s, {plan.comparisons} comparisons")


# -- exports: where they live and when they go ------------------------------------------------
def test_exports_expire_and_a_privacy_delete_takes_them_and_uploaded_archives(tmp_path: Path,
                                                                              database_url: str) -> None:
    from pipeline.library import identities
    from pipeline.datasets.export import export_dataset

    settings = Settings(data_dir=tmp_path / "data", database_url=database_url, match_threshold=0.8)
    with Lab.open(settings) as lab:
        report = ingest(lab, [Upload("a.jpg", data=astronaut_photo(5))])
        identities.enroll(lab, report.files[0].faces[0].face_id, "Zelda Export")
        offers = []
        for _ in range(2):  # single-user mode: the owner is "local" (nobody logged in)
            offer = downloads.reserve(lab, "local", "facelab-yolo-1.zip")
            export_dataset(lab, "yolo", offer.path)
            downloads.publish(lab, offer)
            offers.append(offer)
        assert offers[0].path.parent == settings.data_dir / "exports"
        old = time.time() - downloads.TTL_S - 60
        os.utime(offers[0].path, (old, old))
        os.utime(offers[0].path.with_suffix(".json"), (old, old))
        assert downloads.purge(lab) == 2  # the unfetched, expired one (zip and record)
        with pytest.raises(NotFound):
            downloads.claim(lab, offers[0].token, None)
        for bad in ("../../etc/passwd", "x" * 31, offers[1].token + "/", offers[1].token[:-1] + "."):
            with pytest.raises(NotFound):
                downloads.claim(lab, bad, None)
        upload = settings.ui_cache_dir / "0123abcd" / "dataset.zip"  # what Gradio keeps of an upload
        upload.parent.mkdir(parents=True)
        upload.write_bytes(offers[1].path.read_bytes())
        privacy.forget_person(lab, "Zelda Export")
        assert not downloads.pending(lab) and not upload.exists()


def test_an_import_plans_outside_the_write_lock_and_plans_again_if_the_image_changed(tmp_path: Path,
                                                                                    database_url: str) -> None:
    """The planning runs while another writer holds the lock; that writer adds a face where
    the import has a box; under the lock the import sees the change and does not add the
    box twice."""
    import threading

    from storage.orm import Face, Image

    zip_path = _coco_zip(tmp_path / "three.zip", [[100, 100, 80, 80], [400, 100, 80, 80], [700, 100, 80, 80]],
                         size=(900, 300))
    with Lab.open(Settings(data_dir=tmp_path / "data", database_url=database_url, match_threshold=0.8)) as lab:
        result: dict = {}
        with lab.write_lock:  # "another writer" holds the lock the whole time the import plans
            worker = threading.Thread(target=lambda: result.setdefault("report", import_dataset(lab, zip_path)))
            worker.start()
            deadline = time.monotonic() + 120
            while not list(lab.images.iter_shas()):  # files are stored before the lock is taken
                assert time.monotonic() < deadline and worker.is_alive(), "the import never got past planning"
                time.sleep(0.05)
            sha = next(lab.images.iter_shas())
            with lab.session() as session:  # the image as a row, with a face on the first box
                image = Image(sha256=sha, original_name="one.png", width=900, height=300, size_bytes=1,
                              mime="image/png", upload_sha256="0" * 64)
                image.faces.append(Face(x1=100.2, y1=100.0, x2=180.0, y2=180.0, score=1.0, origin="human"))
                session.add(image)
            assert worker.is_alive()  # waiting for the lock
        worker.join(300)
        report = result["report"]
        assert (report.images_new, report.faces_new, report.faces_existing) == (0, 2, 1), report
        with lab.sessions() as session:
            assert session.query(Face).count() == 3
