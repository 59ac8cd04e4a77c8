"""Every command-line operation of ``python app.py`` (ingest, check, export, import, users,
train, models): progress bars, printed results, exit codes. The operations themselves are
pipeline functions; this module only talks to the terminal."""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.auth import (
    add_user,
    clean_username,
    list_users,
    remove_user,
    set_active,
    set_password,
    set_role,
    users_configured,
)
from pipeline.context import Lab
from pipeline.datasets.export import export_dataset
from pipeline.datasets.import_data import import_dataset
from pipeline.errors import FaceLabError, InvalidRequest
from pipeline.library.ingest import ingest, uploads_from_paths
from pipeline.training import registry
from pipeline.training.jobs import (
    KINDS,
    TrainRequest,
    comparison_lines,
    export_results,
    run_in_foreground,
)


@contextmanager
def percent_bar(desc: str) -> Iterator[Callable[[float, str], None]]:
    """A terminal progress bar in percent, as the ``progress(fraction, text)`` callback
    every long pipeline operation takes."""
    with tqdm(total=100, unit="%", desc=desc) as bar:
        def progress(fraction: float, text: str) -> None:
            bar.n = round(fraction * 100)
            bar.set_postfix_str(text)
            bar.refresh()

        yield progress


def ingest_command(lab: Lab, paths: Sequence[Path], chunk: int = 64, workers: int | None = None) -> int:
    """Import files and folders; prints one line per refused file. Exit 1 if any was refused.
    With more than one worker (default: one per core, at most 4) and enough files, the
    photos are analysed by worker processes (pipeline.library.parallel_ingest)."""
    from pipeline.library.parallel_ingest import (
        IngestWorkerFailed,
        default_workers,
        ingest_parallel,
        workers_for,
    )

    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        print(f"error: not found: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    if workers is not None and workers < 1:
        print(f"error: --workers must be at least 1, got {workers}", file=sys.stderr)
        return 2
    uploads = uploads_from_paths(paths)
    if not uploads:
        print("error: no image files found (looked for .jpg .png .gif .bmp .webp .tif .pgm)", file=sys.stderr)
        return 2
    workers = workers_for(len(uploads), default_workers() if workers is None else workers)
    faces = refused = duplicates = 0
    with tqdm(total=len(uploads), unit="img", desc="Ingesting" if workers == 1 else f"Ingesting ({workers} workers)") as bar:
        def counted(files: Sequence) -> None:
            nonlocal faces, refused, duplicates
            for result in files:
                if result.error:
                    refused += 1
                    tqdm.write(f"refused {result.name}: {result.error}", file=sys.stderr)
                duplicates += result.duplicate
                # a photo already in the library brings no new faces (its stored ones come back)
                faces += 0 if result.duplicate else len(result.faces)
            bar.update(len(files))
            bar.set_postfix(faces=faces, refused=refused)

        if workers > 1:
            bar.set_postfix_str(f"starting {workers} workers")
            try:
                ingest_parallel(lab.settings, uploads, workers, on_chunk=counted)
            except IngestWorkerFailed as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
        else:
            for start in range(0, len(uploads), chunk):
                counted(ingest(lab, uploads[start : start + chunk]).files)
    # "imported" counts only photos new to the library: a second run over the same folder
    # said "61 image(s) imported (61 already present)", as if it had done something
    new_images = len(uploads) - refused - duplicates
    print(f"{new_images} new image(s) imported, {duplicates} already in the library, "
          f"{faces} new face(s), {refused} refused")
    return 1 if refused else 0


def check_command(lab: Lab, repair: bool) -> int:
    from pipeline.library.consistency import check

    report = check(lab, repair=repair)
    for line in report.lines():
        print(line)
    return 0 if report.ok or repair else 1


def embed_missing_command(lab: Lab) -> int:
    """Before serving: bring the index up to date with the active embedder, with a progress bar."""
    from pipeline.library.embed import embed_missing, faces_missing_embeddings

    missing = len(faces_missing_embeddings(lab))
    if not missing:
        return 0
    print(f"{missing} face(s) have no {lab.model_version} embedding yet (new embedder?): embedding them now")
    with percent_bar("Re-embedding") as progress:
        return embed_missing(lab, progress)


def attributes_missing_command(lab: Lab) -> int:
    """Before serving: say which attribute weights are absent, and compute the attributes
    of faces the installed attribute models have not seen (new models?), with a progress bar."""
    from pipeline.library.attributes import (
        attribute_version,
        compute_missing,
        faces_missing_attributes,
        missing_note,
    )

    if note := missing_note(lab):
        print(note)
    missing = len(faces_missing_attributes(lab))
    if not missing:
        return 0
    print(f"{missing} face(s) have no {attribute_version(lab)} attributes yet (new attribute models?): computing them")
    with percent_bar("Face attributes") as progress:
        try:
            return compute_missing(lab, progress)
        except Exception as exc:  # noqa: BLE001 - e.g. a damaged weights file: serve without attributes
            print(f"face attributes not computed: {exc}", file=sys.stderr)
            return 0


# -- python app.py export / import --------------------------------------------------


def export_command(lab: Lab, fmt: str, out: Path, selection: str = "all") -> int:
    """``python app.py export FORMAT OUT.zip [--reviewed]``: exit 0, or 1 with the reason."""
    with percent_bar("Exporting") as progress:
        try:
            report = export_dataset(lab, fmt, out, selection, progress)
        except FaceLabError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print(report.summary())
    return 0


def import_command(lab: Lab, path: Path, fmt: str | None = None) -> int:
    """``python app.py import FILE.zip|FOLDER [--format voc|yolo|coco]``: exit 0, or 1 with the reasons."""
    try:
        with percent_bar("Importing") as progress:
            report = import_dataset(lab, path, fmt, progress=progress)
    except FaceLabError as exc:  # after the bar has closed, so the reason is on its own line
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in report.lines():
        print(line)
    return 0


# -- python app.py users ------------------------------------------------------------


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise InvalidRequest("The two passwords differ.")
    return first


def users_command(lab: Lab, action: str, name: str | None, role: str | None, password_stdin: bool) -> int:
    """``python app.py users add|passwd|role|disable|enable|remove NAME`` and ``users list``."""
    try:
        if action == "list":
            for user in list_users(lab):
                print(f"{user.name}\t{user.role}\t{'active' if user.active else 'disabled'}")
            if not users_configured(lab):
                print("no users: single-user mode (the app only listens on 127.0.0.1)")
            return 0
        if not name:
            raise InvalidRequest(f"`users {action}` needs a user name")
        if action == "add":
            info = add_user(lab, name, _read_password(password_stdin), role or "labeler")
            print(f"added {info.name} ({info.role}); restart the app if it is running so it asks for logins")
        elif action == "passwd":
            set_password(lab, name, _read_password(password_stdin))
            print(f"password changed for {clean_username(name)}")
        elif action == "role":
            if not role:
                raise InvalidRequest("`users role` needs --role admin|labeler")
            info = set_role(lab, name, role)
            print(f"{info.name} is now {info.role}")
        elif action in ("disable", "enable"):
            set_active(lab, name, action == "enable")
            print(f"{clean_username(name)} {action}d")
        elif action == "remove":
            remove_user(lab, name)
            print(f"removed {clean_username(name)}")
        else:
            raise InvalidRequest(f"unknown users action {action!r}")
    except FaceLabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


# -- python app.py train / models ---------------------------------------------------


def train_command(lab: Lab, req: TrainRequest, results: Path | None = None, command: str = "") -> int:
    """``python app.py train ...``: runs in the foreground, prints progress; exit 0 done,
    1 failed, 2 refused, 130 cancelled. ``results``: also export the evaluation there."""
    try:
        record, outcome = run_in_foreground(lab, req)
    except FaceLabError as exc:
        print(f"error: {exc}")
        return 2
    if outcome is not None and results is not None:
        for path in export_results(lab, outcome.run_id, results, command):
            print(f"wrote {path}")
    if outcome is not None:
        print("\nsplits: " + "; ".join(record.splits.values()))
        for name, comparison in outcome.comparisons.items():
            print("\n" + "\n".join(comparison_lines(name, comparison)))
        print(f"\nrun folder: {outcome.run_dir}\npromote with: python app.py models promote {outcome.version.id}")
    return {"done": 0, "cancelled": 130}.get(record.status, 1)


def models_command(lab: Lab, action: str, version_id: int | None = None, kind: str | None = None) -> int:
    """``python app.py models list|promote ID|rollback KIND [--to ID]``."""
    try:
        if action == "list":
            rows = registry.versions_table(lab)
            if not rows:
                print("no registered models yet (train one: python app.py train detector|embedder)")
            for row in rows:
                print(f"#{row[0]:<4} {row[1]:<9} {row[2]:<10} {row[3]:<34} {'IN USE' if row[4] else '':<6} "
                      f"{row[5]}  {row[6]}  {row[7]}")
            for k in KINDS:
                info = registry.active_version(lab, k)
                print(f"{k} in use: {info.label() if info else registry.in_use_spec(lab, k) + ' (settings default)'}")
            return 0
        with percent_bar(action.capitalize()) as progress:
            if action == "promote":
                if version_id is None:
                    raise InvalidRequest("Give the version id to promote (see `python app.py models list`).")
                message = registry.promote(lab, version_id, progress)
            else:
                if kind is None:
                    raise InvalidRequest("Say which model to roll back: detector or embedder.")
                message = registry.rollback(lab, kind, version_id, progress)
        print(message)
        return 0
    except FaceLabError as exc:
        print(f"error: {exc}")
        return 2


def request_from_args(args: Any) -> TrainRequest:
    """A TrainRequest from ``python app.py train`` arguments. ``--model`` is an
    architecture name, or a checkpoint path the owner of this machine vouches for."""
    from models.model_files import is_architecture

    source, path = "labels", None
    if getattr(args, "from_face_mask", None):
        source, path = "face_mask", args.from_face_mask
    elif getattr(args, "from_lfw", None):
        source, path = "lfw", args.from_lfw
    model = model_path = None
    if args.model:
        model, model_path = (args.model, None) if is_architecture(args.model) or args.model.endswith(
            (".yaml", ".yml")) else (None, args.model)
    req = TrainRequest(kind=args.kind, source=source, source_path=str(path) if path else None, epochs=args.epochs,
                       minutes=args.minutes, imgsz=args.imgsz, model=model, model_path=model_path,
                       init_version=getattr(args, "from_version", None), batch=args.batch, device=args.device,
                       limit_images=args.limit_images, eval_pairs=args.eval_pairs,
                       max_steps_per_epoch=args.max_steps, validate_every_epoch=not args.no_val,
                       threads=os.cpu_count())  # a CLI run has the process to itself
    for name in ("seed", "select_fraction", "test_fraction", "input_size"):
        if getattr(args, name, None) is not None:
            setattr(req, name, getattr(args, name))
    return req


def train_or_models_command(lab: Lab, args: Any) -> int:
    """Dispatch ``python app.py train ...`` and ``python app.py models ...``."""
    if args.command == "train":
        command = "python app.py " + " ".join(sys.argv[1:])
        return train_command(lab, request_from_args(args), getattr(args, "results", None), command)
    version_id, kind = args.to, None
    if args.action == "promote":
        if not (args.target or "").isdigit():
            print("error: give the version id to promote (see `python app.py models list`)")
            return 2
        version_id = int(args.target)
    elif args.action == "rollback":
        kind = args.target
    return models_command(lab, args.action, version_id, kind)
