"""Crash consistency: a child process is SIGKILLed at chosen points of ingest, enrollment,
label saves and deletes (``FACELAB_FAULT``, pipeline/faults.py, or a kill inside the index
writer), then ``check --repair`` and a fresh Lab must find database, image store and FAISS
index consistent, with no acknowledged label lost and no half-written file in the store.

All scenarios share one library per backend, so each also starts from the state the
previous crashes and repairs left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from pipeline.library import identities
from pipeline.library.consistency import check
from pipeline.context import Lab
from pipeline.library.ingest import Upload, ingest
from pipeline.settings import Settings
from storage.embedding_rows import fetch_embeddings
from storage.faiss_index import MANIFEST_FORMAT, FaceIndex
from storage.orm import Face, Identity, Image
from tests.conftest import astronaut_photo

pytestmark = pytest.mark.slow  # each test kills a python app.py subprocess at a fault point

REPO = Path(__file__).resolve().parents[1]

# The child: opens the library, runs one operation, prints "ACK {...}" after each
# acknowledged step. "harness" faults kill inside storage.faiss_index's atomic writer
# (a checkpoint of the base files) or its delta append, which pipeline code cannot reach
# (storage never imports pipeline).
CHILD = r"""
import json, os, signal, sys
from pathlib import Path
spec = json.loads(sys.argv[1])
import storage.faiss_index as fi
real_write = fi._atomic_write
def killing_write(path, write):
    if spec.get("harness") == "index_before_manifest" and path.name.endswith(".manifest.json"):
        os.kill(os.getpid(), signal.SIGKILL)  # index file replaced, manifest still the old one
    if spec.get("harness") == "index_save_start" and path.name.endswith(".faiss"):
        os.kill(os.getpid(), signal.SIGKILL)  # database committed, index not written at all
    if spec.get("harness") == "index_half_written" and path.name.endswith(".faiss"):
        def half(tmp):
            write(tmp)
            size = tmp.stat().st_size
            with open(tmp, "r+b") as fh:
                fh.truncate(size // 2)
            os.kill(os.getpid(), signal.SIGKILL)  # mid-write: a torn temp file is left
        return real_write(path, half)
    return real_write(path, write)
fi._atomic_write = killing_write
real_append = fi._append
def killing_append(path, data):
    if spec.get("harness") == "index_save_start":
        os.kill(os.getpid(), signal.SIGKILL)  # database committed, index not written at all
    if spec.get("harness") == "delta_half_written":
        real_append(path, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)  # mid-append: a torn record ends the delta
    return real_append(path, data)
fi._append = killing_append
if spec.get("harness") in ("index_before_manifest", "index_half_written"):
    # a save that rewrites the base files (a checkpoint) rather than appending to the delta
    real_save = fi.FaceIndex.save
    fi.FaceIndex.save = lambda self, directory=None, checkpoint=False: real_save(self, directory, checkpoint=True)
from pipeline.context import Lab
from pipeline.settings import Settings
lab = Lab.open(Settings(data_dir=Path(spec["data"]), database_url=spec["db"], match_threshold=0.8))
if spec.get("harness"):
    lab.index()  # in memory before the write, as in a running app: the write then saves it
def ack(**kw):
    print("ACK " + json.dumps(kw), flush=True)
op = spec["op"]
if op == "ingest":
    from pipeline.library.ingest import Upload, ingest
    (r,) = ingest(lab, [Upload(Path(spec["path"]).name, path=Path(spec["path"]))]).files
    ack(image_id=r.image_id, faces=[f.face_id for f in r.faces], error=r.error)
elif op == "enroll":
    from pipeline.library import identities
    for face_id, name in spec["labels"]:
        identities.enroll(lab, face_id, name, user="child")
        ack(face=face_id, name=name)
elif op == "delete_person":
    from pipeline.library import identities
    identities.delete_person(lab, spec["name"], delete_faces=True, user="child")
    ack()
elif op == "delete_image":
    from pipeline.library import privacy
    privacy.delete_image(lab, spec["image_id"], user="child")
    ack()
elif op == "move_box":
    from pipeline.labeling import edits as labeling
    state = labeling.load_for_labeling(lab, spec["image_id"], with_pixels=False)
    boxes = [labeling.BoxEdit(b.face_id, b.box[0] + 12, b.box[1] + 8, b.box[2] + 12, b.box[3] + 8, name=b.name)
             for b in state.boxes]
    labeling.save_labels(lab, spec["image_id"], state.version, boxes, user="child")
    ack()
print("DONE", flush=True)
"""


@dataclass
class Library:
    settings: Settings

    def spec(self, **kw: object) -> dict:
        return {"data": str(self.settings.data_dir), "db": self.settings.database_url, **kw}

    @contextmanager
    def open(self) -> Iterator[Lab]:
        with Lab.open(self.settings) as lab:
            yield lab


def _photo(seed: int) -> bytes:
    """A new photo of the astronaut (own size, brightness and position), as PNG bytes."""
    return astronaut_photo(seed, canvas=(520, 600), sizes=(300, 460), background=(40, 200), fmt="PNG")


def _run(library: Library, spec: dict, fault: str | None = None, timeout: float = 300) -> tuple[int, list[dict]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("FACELAB_FAULT", None)
    if fault:
        env["FACELAB_FAULT"] = fault
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(library.spec(**spec))], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode not in (0, -signal.SIGKILL):
        pytest.fail(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    acks = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ACK ")]
    return proc.returncode, acks


def _repair_and_verify(library: Library, expect: str) -> None:
    """The crash left a problem matching ``expect``; repair fixes all, nothing half-written."""
    with library.open() as lab:
        before = check(lab)
        assert not before.ok and any(expect in p for p in before.problems), before.lines()
        assert not any(p.startswith("image ") for p in before.problems), before.lines()  # no damaged or lost photo
        check(lab, repair=True)
    with library.open() as lab:  # a fresh process view: everything agrees
        after = check(lab)
        assert after.ok, after.lines()
        assert not [p for p in lab.images.root.rglob("*") if p.is_file() and p.name.startswith(".")]
        assert not list(Path(lab.settings.index_dir).glob(".*.tmp"))


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Library:
    settings = Settings(data_dir=tmp_path_factory.mktemp("faults"), database_url=database_url, match_threshold=0.8)
    with Lab.open(settings) as lab:
        report = ingest(lab, [Upload(f"base-{i}.png", data=_photo(i)) for i in range(3)])
        assert all(r.ok and len(r.faces) == 1 for r in report.files), [r.error for r in report.files]
        for r in report.files:
            identities.enroll(lab, r.faces[0].face_id, "Base Person")
    return Library(settings)


def test_crash_after_the_image_file_is_written(library: Library, tmp_path: Path) -> None:
    photo = tmp_path / "crash-file.png"
    photo.write_bytes(_photo(100))
    rc, acks = _run(library, {"op": "ingest", "path": str(photo)}, fault="ingest_after_file")
    assert rc == -signal.SIGKILL and not acks
    # the real CLI, as an operator would run it after the crash
    db = ["--database-url", library.settings.database_url] if library.settings.database_url else []
    base = [sys.executable, "app.py", "--data", str(library.settings.data_dir), *db, "check"]
    env = {**os.environ, "FACELAB_MATCH_THRESHOLD": "0.8"}
    found = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert found.returncode == 1 and "belong to no image row" in found.stdout, found.stdout + found.stderr[-2000:]
    repaired = subprocess.run([*base, "--repair"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert repaired.returncode == 0 and "deleted 1 orphan file(s)" in repaired.stdout, repaired.stdout
    with library.open() as lab:
        assert check(lab).ok
        (again,) = ingest(lab, [Upload("crash-file.png", path=photo)]).files  # not mistaken for a duplicate
        assert again.ok and not again.duplicate and len(again.faces) == 1
        assert check(lab).ok


def test_crash_after_commit_before_the_index_is_saved(library: Library, tmp_path: Path) -> None:
    photo = tmp_path / "crash-commit.png"
    photo.write_bytes(_photo(101))
    rc, _ = _run(library, {"op": "ingest", "path": str(photo)}, fault="ingest_after_commit")
    assert rc == -signal.SIGKILL
    with library.open() as lab:
        with lab.sessions() as s:
            image = s.scalars(select(Image).where(Image.original_name == "crash-commit.png")).one()
            (face_id,) = [f.id for f in image.faces]
    _repair_and_verify(library, "search index differs")
    with library.open() as lab:
        assert face_id in lab.index()


@pytest.mark.parametrize(("harness", "expect"), [
    ("index_before_manifest", "cannot be used"),
    ("index_half_written", "search index differs"),
    ("delta_half_written", "search index differs"),
])
def test_crash_inside_the_index_save(library: Library, tmp_path: Path, harness: str, expect: str) -> None:
    photo = tmp_path / f"{harness}.png"
    photo.write_bytes(_photo({"index_before_manifest": 102, "index_half_written": 103}.get(harness, 107)))
    rc, _ = _run(library, {"op": "ingest", "path": str(photo), "harness": harness})
    assert rc == -signal.SIGKILL
    if harness == "index_half_written":
        assert list(Path(library.settings.index_dir).glob(".*.tmp")), "the torn temp file should be there"
    _repair_and_verify(library, expect)


def test_no_acknowledged_label_is_lost_when_killed_at_any_moment(library: Library) -> None:
    with library.open() as lab, lab.sessions() as s:
        faces = s.scalars(select(Face.id).order_by(Face.id)).all()[:3]
    labels = [(faces[i % len(faces)], f"Person {i:03d}") for i in range(400)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("FACELAB_FAULT", None)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(library.spec(op="enroll", labels=labels))],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    acked = 0
    assert proc.stdout is not None
    for line in proc.stdout:  # kill it while it is busy enrolling, wherever it happens to be
        if line.startswith("ACK "):
            acked += 1
            if acked == 40:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and acked == 40
    with library.open() as lab, lab.sessions() as s:
        for face_id in faces:
            row = s.get(Face, face_id)
            name = s.get(Identity, row.identity_id).name
            done = [n for f, n in labels[:acked] if f == face_id]
            maybe = [n for f, n in labels[acked : acked + 1] if f == face_id]  # committed, ack not printed
            assert name in {done[-1], *maybe}, (face_id, name, done[-1:], maybe)
        assert check(lab).ok


def test_crash_after_enroll_commit_keeps_the_label(library: Library) -> None:
    with library.open() as lab, lab.sessions() as s:
        face_id = s.scalars(select(Face.id).order_by(Face.id.desc())).first()
    rc, acks = _run(library, {"op": "enroll", "labels": [[face_id, "Survivor Of Crash"]]}, fault="enroll_after_commit")
    assert rc == -signal.SIGKILL and not acks
    with library.open() as lab, lab.sessions() as s:
        assert s.get(Face, face_id).identity.name == "Survivor Of Crash"
        assert check(lab).ok


def test_crash_in_a_label_save_leaves_no_stale_vector(library: Library) -> None:
    with library.open() as lab, lab.sessions() as s:
        image_id = s.scalars(select(Image.id).where(Image.original_name == "base-0.png")).one()
        (face_id,) = s.scalars(select(Face.id).where(Face.image_id == image_id)).all()
    rc, _ = _run(library, {"op": "move_box", "image_id": image_id, "harness": "index_save_start"})
    assert rc == -signal.SIGKILL
    with library.open() as lab:
        # the moved box keeps its face id, so the saved index has the database's face ids
        # but the old vector for that face
        assert any("outdated vectors" in p for p in check(lab).problems)
        stale = FaceIndex.load(lab.settings.index_dir, lab.model_version, lab.embedder.dim).reconstruct(face_id)
        with lab.sessions() as s:
            ids, vectors = fetch_embeddings(s, lab.model_version, lab.embedder.dim)
        new = vectors[ids == face_id][0] / np.linalg.norm(vectors[ids == face_id][0])
        assert float(stale @ new) < 0.9999
        # the manifest names (face id, embedding row) pairs: the moved box's new row makes
        # the reopened Lab rebuild instead of serving the old vector
        np.testing.assert_allclose(lab.index().reconstruct(face_id), new, atol=1e-5)
        scores, hits = lab.index().search(new, 1)
        assert hits[0] == face_id and scores[0] > 0.9999
        after = check(lab)  # the rebuilt index was saved
        assert after.ok, after.lines()


def test_crash_after_deleting_a_person(library: Library, tmp_path: Path) -> None:
    photo = tmp_path / "to-delete.png"
    photo.write_bytes(_photo(104))
    _, (ack,) = _run(library, {"op": "ingest", "path": str(photo)})
    _run(library, {"op": "enroll", "labels": [[ack["faces"][0], "Short Lived"]]})
    rc, acks = _run(library, {"op": "delete_person", "name": "Short Lived"}, fault="delete_person_after_commit")
    assert rc == -signal.SIGKILL and not acks
    _repair_and_verify(library, "search index differs")
    with library.open() as lab, lab.sessions() as s:
        assert s.get(Face, ack["faces"][0]) is None and ack["faces"][0] not in lab.index()


def test_crash_in_a_privacy_delete_of_a_photo(library: Library, tmp_path: Path) -> None:
    photo = tmp_path / "photo-to-delete.png"
    photo.write_bytes(_photo(105))
    _, (ack,) = _run(library, {"op": "ingest", "path": str(photo)})
    rc, _ = _run(library, {"op": "delete_image", "image_id": ack["image_id"]}, fault="delete_image_after_commit")
    assert rc == -signal.SIGKILL
    _repair_and_verify(library, "belong to no image row")
    with library.open() as lab, lab.sessions() as s:
        assert s.get(Image, ack["image_id"]) is None and not any(f in lab.index() for f in ack["faces"])


def test_an_empty_library_is_consistent(tmp_path: Path) -> None:
    with Lab.open(Settings(data_dir=tmp_path, match_threshold=0.8)) as lab:
        report = check(lab)
        assert report.ok, report.lines()
        assert any("no faces yet" in f for f in report.facts)


def test_an_index_saved_by_an_older_version_is_reported_and_rebuilt_not_a_problem(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, match_threshold=0.8)
    with Lab.open(settings) as lab:
        (result,) = ingest(lab, [Upload("old.png", data=_photo(106))]).files
        version = lab.model_version
    # what a FaceLab from before the (face id, embedding row) manifest left behind
    _, manifest_path = FaceIndex.paths(settings.index_dir, version)
    manifest = json.loads(manifest_path.read_text())
    manifest["format"] = 1
    manifest.pop("rows_checksum", None)
    manifest_path.write_text(json.dumps(manifest))
    with Lab.open(settings) as lab:
        report = check(lab)
        assert report.ok, report.lines()  # a cache in an old format is not an inconsistency
        assert any("older FaceLab" in fact for fact in report.facts), report.lines()
        repaired = check(lab, repair=True)
        assert repaired.ok and any("current format" in line for line in repaired.repaired), repaired.lines()
        assert FaceIndex.read_manifest(settings.index_dir, version)["format"] == MANIFEST_FORMAT
        assert all(face.face_id in lab.index() for face in result.faces)
        assert check(lab).ok and not any("older FaceLab" in fact for fact in check(lab).facts)
