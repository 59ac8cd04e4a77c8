"""Time and peak memory of refusing a pixel bomb: a 164 KB PNG of 13000 x 13000 pixels.

    python bench/pixel_bomb.py [--size 13000] [--app] [--out FILE]

In this process, one after the other (so each peak is the process's growth over the
highest it had been before; FaceLab's first, since it is the small one):

* ``facelab``: ``storage.image_decode.decode_upload`` on the file, what /search and every
  other photo input now call: it reads the header and refuses (ImageRejected);
* ``gradio_image``: the baseline, ``gradio.image_utils.preprocess_image`` with
  ``gr.Image``'s defaults (``type="filepath"``, ``image_mode="RGB"``), which is what
  /search ran on an upload before FaceLab saw it.

Peak memory: the growth of the process's VmHWM (peak resident set, /proc/self/status).

``--app`` also starts ``python app.py`` on an empty data folder and sends the file to
its /search with gradio_client: seconds until the refusal and the app process's VmHWM
growth over a normal search made just before.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import astronaut_photo, huge_png  # noqa: E402


def peak_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc")


def measure(fn) -> dict:  # noqa: ANN001
    before = peak_mib()
    started = time.perf_counter()
    try:
        outcome = f"returned {type(fn()).__name__}"
    except Exception as exc:  # noqa: BLE001 - the refusal is the expected outcome
        outcome = f"{type(exc).__name__}: {exc}"
    return {"seconds": time.perf_counter() - started, "peak_growth_mib": peak_mib() - before, "outcome": outcome}


def in_process(path: Path) -> dict:
    from gradio.data_classes import ImageData
    from gradio.image_utils import preprocess_image

    from storage.image_decode import decode_upload

    data = path.read_bytes()
    facelab = measure(lambda: decode_upload(data, path.name))
    with tempfile.TemporaryDirectory() as cache, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning: it decodes anyway
        gradio = measure(lambda: preprocess_image(ImageData(path=str(path), orig_name=path.name), cache, "webp",
                                                  "RGB", "filepath"))
    return {"facelab": facelab, "gradio_image": gradio,
            "memory_ratio": gradio["peak_growth_mib"] / max(facelab["peak_growth_mib"], 0.1),
            "time_ratio": gradio["seconds"] / facelab["seconds"]}


def against_app(path: Path) -> dict:
    import psutil
    from gradio_client import Client, handle_file

    from tests.conftest import start_app

    with tempfile.TemporaryDirectory() as tmp:
        photo = Path(tmp) / "query.jpg"
        photo.write_bytes(astronaut_photo(11))
        (Path(tmp) / "data").mkdir()
        with start_app(Path(tmp) / "data", env={"FACELAB_MATCH_THRESHOLD": "0.8"}) as url:
            port = url.rstrip("/").rsplit(":", 1)[1]
            app = next(p for p in psutil.Process().children(recursive=True) if port in p.cmdline())
            client = Client(url, verbose=False)
            try:
                client.predict(handle_file(str(photo)), 5, 0.5, api_name="/search")
            except Exception:  # noqa: BLE001 - "No face enrolled" etc.: only warming up
                pass
            before = peak_mib(app.pid)
            started = time.perf_counter()
            try:
                client.predict(handle_file(str(path)), 5, 0.5, api_name="/search")
                outcome = "answered"
            except Exception as exc:  # noqa: BLE001
                outcome = str(exc)
            seconds = time.perf_counter() - started
            return {"seconds_to_refusal": seconds, "app_peak_growth_mib": peak_mib(app.pid) - before,
                    "app_peak_mib": peak_mib(app.pid), "message": outcome}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=13000)
    parser.add_argument("--app", action="store_true", help="also send it to a running app's /search")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bomb.png"
        path.write_bytes(huge_png(args.size, args.size))
        result = {"file_bytes": path.stat().st_size, "pixels": f"{args.size}x{args.size}",
                  "in_process": in_process(path)}
        if args.app:
            result["app_search"] = against_app(path)
    result["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
