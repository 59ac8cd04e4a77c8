"""Shared pytest fixtures. Keep this small: fixtures used by more than one test module."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from storage.db import default_sqlite_url, make_engine, migrate, session_factory

#: ../shared/data seen from the repository root; absent in a user's clone
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The shared evaluation data folder; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def tmp_data_dir(tmp_path: Path) -> Path:
    """An empty per-test data folder (database, image store, index files go inside)."""
    path = tmp_path / "facelab-data"
    path.mkdir()
    return path


@pytest.fixture
def db(tmp_data_dir: Path) -> Iterator[Engine]:
    """A migrated SQLite database in ``tmp_data_dir`` (an Engine; disposed afterwards)."""
    engine = make_engine(default_sqlite_url(tmp_data_dir))
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def db_sessions(db: Engine) -> sessionmaker[Session]:
    """A session factory on ``db``: ``with db_sessions() as s, s.begin(): ...``."""
    return session_factory(db)


# -- the running app (appended for the Label tab's API and browser tests) -----------------


def astronaut_photo(seed: int, canvas: tuple[int, int] = (460, 520), sizes: tuple[int, int] = (260, 420),
                    background: tuple[int, int] = (30, 220), fmt: str = "JPEG") -> bytes:
    """A new photo with one face: the astronaut at a size, place and brightness drawn from
    ``seed``, on a plain background (new bytes per seed, so never a duplicate upload)."""
    import io

    import numpy as np
    from PIL import Image as PILImage
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    height, width = canvas
    size = int(rng.integers(*sizes))
    face = np.asarray(PILImage.fromarray(skdata.astronaut()).resize((size, size)), dtype=np.float32)
    out = np.full((height, width, 3), int(rng.integers(*background)), np.uint8)
    y, x = int(rng.integers(0, height - size)), int(rng.integers(0, width - size))
    out[y : y + size, x : x + size] = (face * rng.uniform(0.7, 1.0)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(out).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def mirrored_astronaut():  # noqa: ANN201 - numpy array; numpy is imported lazily here
    """Another "photo" of the astronaut: mirrored, smaller, darker, on a grey canvas."""
    import numpy as np
    from PIL import Image as PILImage
    from skimage import data as skdata

    img = PILImage.fromarray(skdata.astronaut()).transpose(PILImage.FLIP_LEFT_RIGHT).resize((400, 400))
    canvas = np.full((520, 620, 3), 90, dtype=np.uint8)
    canvas[60:460, 180:580] = (np.asarray(img).astype(np.float32) * 0.8).astype(np.uint8)
    return canvas


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(data_dir: Path, env: dict[str, str] | None = None, timeout_s: float = 300.0,
              args: Sequence[str] = ()):
    """Start ``python app.py --data DIR [args]`` on a free port; a context manager yielding its URL."""
    import contextlib
    import os
    import subprocess
    import sys
    import time

    import httpx

    def launch(port: int, log) -> subprocess.Popen:  # noqa: ANN001 - an open log file
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        return subprocess.Popen(
            [sys.executable, "app.py", "--data", str(data_dir), "--port", str(port), *args],
            cwd=Path(__file__).resolve().parents[1], env=child_env, stdout=log, stderr=subprocess.STDOUT,
        )

    @contextlib.contextmanager
    def running() -> Iterator[str]:
        log_path = data_dir / "app.log"
        # The port is free when picked but another process (another test session on this
        # machine) can take it before the app binds it; then a 200 would come from *that*
        # server. So the app counts as up only once its own log says it serves this port,
        # and a child that exits first is started again on another port.
        for attempt in range(3):
            port = _free_port()
            url = f"http://127.0.0.1:{port}/"
            with open(log_path, "w") as log:
                proc = launch(port, log)
                try:
                    deadline = time.monotonic() + timeout_s
                    while True:
                        if proc.poll() is not None:
                            break
                        ours = f"127.0.0.1:{port}" in log_path.read_text(errors="replace")
                        try:
                            if ours and httpx.get(url, timeout=2).status_code == 200 and proc.poll() is None:
                                break
                        except httpx.HTTPError:
                            pass
                        if time.monotonic() > deadline:
                            pytest.fail(f"app did not answer within {timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}")
                        time.sleep(0.5)
                    if proc.poll() is not None:
                        said = log_path.read_text(errors="replace").lower()
                        if attempt < 2 and ("cannot find empty port" in said or "address already in use" in said):
                            continue  # the port was taken in between: another one
                        pytest.fail(f"app exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                    yield url
                    return
                finally:
                    if proc.poll() is None:
                        proc.terminate()
                        try:
                            proc.wait(timeout=20)
                        except subprocess.TimeoutExpired:
                            proc.kill()

    return running()


@pytest.fixture(scope="module")
def app_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A running FaceLab app with an empty data folder, shared by one test module; its URL."""
    with start_app(tmp_path_factory.mktemp("appdata")) as url:
        yield url


# -- database backends (appended for reliability: DB tests run on SQLite and PostgreSQL) ---
#: a PostgreSQL role allowed to CREATE DATABASE; tests/run.sh starts a private cluster
#: on loopback and sets it. Unset: SQLite only.
TEST_PG_URL = __import__("os").environ.get("FACELAB_TEST_PG_URL", "")
BACKENDS = ["sqlite", "postgresql"] if TEST_PG_URL else ["sqlite"]


def create_pg_database(admin_url: str = TEST_PG_URL) -> tuple[str, object]:
    """A new, empty PostgreSQL database: (its URL, a function that drops it)."""
    import uuid

    admin = make_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"facelab_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with admin.connect() as conn:  # FORCE: a killed test process may have left sessions
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    return admin.url.set(database=name).render_as_string(hide_password=False), drop


class DatabaseFactory:
    """Fresh empty databases of one backend; ``factory()`` -> URL ("" = SQLite in the data folder)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._drops: list = []

    def __call__(self) -> str:
        if self.backend == "sqlite":
            return ""
        url, drop = create_pg_database()
        self._drops.append(drop)
        return url

    def close(self) -> None:
        for drop in self._drops:
            drop()


@pytest.fixture(scope="module", params=BACKENDS)
def make_database_url(request: pytest.FixtureRequest) -> Iterator[DatabaseFactory]:
    """Per backend, a factory of fresh empty databases for one test module.

    Each call returns "" for SQLite (a SQLite file inside the data folder: give each Lab
    its own data folder) or a new ``postgresql+psycopg://`` database, dropped when the
    module is done. Pass the URL as ``Settings(database_url=...)``, ``python app.py
    --database-url`` or ``DATABASE_URL``. ``make_database_url.backend`` names the backend.
    """
    factory = DatabaseFactory(request.param)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def database_url(make_database_url: DatabaseFactory) -> str:
    """One fresh database per test module and backend ("" = SQLite in the data folder)."""
    return make_database_url()


# -- hostile files (appended for security: decompression bombs) ----------------------------
def huge_png(width: int = 13000, height: int = 13000) -> bytes:
    """A valid all-black 8-bit grayscale PNG of ``width`` x ``height`` pixels, compressed
    block by block so making it needs no pixel buffer: 13000 x 13000 is 164 KB on disk,
    169 MB of samples and 507 MB once decoded to RGB."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    packer = zlib.compressobj(9)
    rows_per_block = 256
    block = bytes(1 + width) * rows_per_block  # each row: filter byte 0, then black samples
    parts = [packer.compress(block) for _ in range(height // rows_per_block)]
    parts += [packer.compress(bytes(1 + width) * (height % rows_per_block)), packer.flush()]
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


#: fixtures that start ``python app.py`` in a subprocess (tens of seconds each on 2 cores)
APP_FIXTURES = {"app_server", "app_url", "secured_app", "app"}
#: Playwright fixtures: the test drives Chromium
BROWSER_FIXTURES = {"browser", "page"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tiers: ``pytest -m "not slow and not browser"`` is the fast tier (README,
    Contributing). A test is ``browser`` when it drives Chromium and ``slow`` when it
    starts the app in a subprocess; modules and tests can also say so themselves."""
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & BROWSER_FIXTURES:
            item.add_marker(pytest.mark.browser)
        if used & APP_FIXTURES:
            item.add_marker(pytest.mark.slow)
