"""`python app.py ingest --workers N`: worker processes sharing one queue of files on one
library (real SQLite/PostgreSQL, real models, real processes). Every file comes back in
the order given, every photo and face is stored once, the index matches the database,
and a worker that cannot start is reported in one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from pipeline.cli import ingest_command
from pipeline.context import Lab
from pipeline.library.consistency import check
from pipeline.library.ingest import Upload, uploads_from_paths
from pipeline.library.parallel_ingest import (
    MIN_FILES_PER_WORKER,
    IngestWorkerFailed,
    ingest_parallel,
    workers_for,
)
from pipeline.settings import Settings
from storage.orm import Face, Image
from tests.conftest import astronaut_photo

pytestmark = pytest.mark.slow  # each worker process loads every model (seconds)


def test_worker_count_follows_the_import_size() -> None:
    assert workers_for(10, 2) == 1  # a small import: the models' load time is not worth it
    assert workers_for(2 * MIN_FILES_PER_WORKER, 2) == 2
    assert workers_for(10 * MIN_FILES_PER_WORKER, 2) == 2
    assert workers_for(10 * MIN_FILES_PER_WORKER, 0) == 1


def test_two_workers_store_every_photo_once_in_order(tmp_path: Path, database_url: str, capsys) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    n = 2 * MIN_FILES_PER_WORKER
    for i in range(n - 2):
        (folder / f"p{i:03d}.jpg").write_bytes(astronaut_photo(i))
    (folder / "p900.jpg").write_bytes(astronaut_photo(0))  # the same photo as p000: a duplicate
    (folder / "p901.jpg").write_bytes(b"not an image at all")
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url)
    with Lab.open(settings) as lab:
        rc = ingest_command(lab, [folder], workers=2)
    out = capsys.readouterr()
    assert rc == 1  # one file refused
    assert "Ingesting (2 workers)" in out.err and "refused p901.jpg" in out.err
    assert f"{n - 2} new image(s) imported, 1 already in the library" in out.out
    with Lab.open(settings) as lab:  # the same folder again: nothing new, and the summary says so
        assert ingest_command(lab, [folder], workers=1) == 1
    assert f"0 new image(s) imported, {n - 1} already in the library, 0 new face(s), 1 refused" in capsys.readouterr().out
    with Lab.open(settings) as lab:
        with lab.sessions() as s:
            assert s.scalar(select(func.count()).select_from(Image)) == n - 2  # the duplicate stored once
            assert s.scalar(select(func.count()).select_from(Face)) >= n - 2
        report = check(lab)  # database, image files and the index agree
        assert report.ok, report.lines()
        # the order of the report is the order of the files, whichever worker took them
        run = ingest_parallel(settings, uploads_from_paths([folder]), workers=2)
    names = [f.name for f in run.report.files]
    assert names == sorted(names) and len(names) == n
    assert all(f.duplicate for f in run.report.files if f.ok)  # all there from the first import
    assert run.workers == 2 and run.seconds_after_ready > 0


def test_a_worker_that_cannot_start_is_named_and_nothing_hangs(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", detector=f"yolo:{tmp_path / 'absent.pt'}")
    Lab.open(Settings(data_dir=tmp_path / "data")).close()
    uploads = [Upload(f"a{i}.jpg", data=astronaut_photo(i)) for i in range(4)]
    with pytest.raises(IngestWorkerFailed, match="could not start.*absent.pt"):
        ingest_parallel(settings, uploads, workers=2)
    with Lab.open(Settings(data_dir=tmp_path / "data")) as lab, lab.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Image)) == 0
