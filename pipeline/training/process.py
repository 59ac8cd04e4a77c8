"""The process a training job started from the web app runs in.

``pipeline.training.jobs.start_training`` starts ``python -m pipeline.training.process`` with
the job lock's descriptor and writes a JSON spec to its stdin: the app's settings (so
the job opens the same data folder and database, with the models in use), the job
record and the lock. The job then runs exactly as ``python app.py train`` does, in this
process: a crash or a kill here ends this process only, and the app that started it
records the job as failed and keeps serving. The job stops by itself if that app goes
away (its parent process changes).

Not meant to be run by hand (``python app.py train ...`` is the command line's way).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    from pathlib import Path

    from pipeline.context import Lab
    from pipeline.settings import Settings
    from pipeline.training import jobs as training
    from pipeline.training import registry

    spec = json.loads(sys.stdin.read())
    try:
        os.nice(5)  # the app's requests come first on a shared CPU
    except OSError:
        pass
    lock = training._FileLock.adopt(Path(spec["lock_path"]), int(spec["lock_fd"]))
    record = training.JobRecord.from_dict(spec["record"])
    with Lab.open(Settings(**spec["settings"])) as lab:
        for line in registry.apply_active_models(lab):
            print(f"model in use: {line}", flush=True)
        record = training.run_job_process(lab, record, lock, int(spec["parent_pid"]))
    return {"done": 0, "cancelled": 130}.get(record.status, 1)


if __name__ == "__main__":
    sys.exit(main())
