"""Command-line operations (``python app.py ingest|check``): progress bars, exit codes."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from pipeline.context import Lab
from pipeline.ingest import ingest, uploads_from_paths


def ingest_command(lab: Lab, paths: Sequence[Path], chunk: int = 64) -> int:
    """Import files and folders; prints one line per refused file. Exit 1 if any was refused."""
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        print(f"error: not found: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    uploads = uploads_from_paths(paths)
    if not uploads:
        print("error: no image files found (looked for .jpg .png .gif .bmp .webp .tif .pgm)", file=sys.stderr)
        return 2
    faces = refused = duplicates = 0
    with tqdm(total=len(uploads), unit="img", desc="Ingesting") as bar:
        for start in range(0, len(uploads), chunk):
            report = ingest(lab, uploads[start : start + chunk])
            for result in report.files:
                if result.error:
                    refused += 1
                    tqdm.write(f"refused {result.name}: {result.error}", file=sys.stderr)
                duplicates += result.duplicate
                faces += len(result.faces)
            bar.update(len(report.files))
            bar.set_postfix(faces=faces, refused=refused)
    print(f"{len(uploads) - refused} image(s) imported ({duplicates} already present), {faces} face(s), {refused} refused")
    return 1 if refused else 0


def check_command(lab: Lab, repair: bool) -> int:
    from pipeline.consistency import check

    report = check(lab, repair=repair)
    for line in report.lines():
        print(line)
    return 0 if report.ok or repair else 1


def embed_missing_command(lab: Lab) -> int:
    """Before serving: bring the index up to date with the active embedder, with a progress bar."""
    from pipeline.embed import embed_missing, faces_missing_embeddings

    missing = len(faces_missing_embeddings(lab))
    if not missing:
        return 0
    print(f"{missing} face(s) have no {lab.model_version} embedding yet (new embedder?): embedding them now")
    with tqdm(total=100, unit="%", desc="Re-embedding") as bar:
        def progress(fraction: float, text: str) -> None:
            bar.n = round(fraction * 100)
            bar.set_postfix_str(text)
            bar.refresh()

        return embed_missing(lab, progress)


def attributes_missing_command(lab: Lab) -> int:
    """Before serving: say which attribute weights are absent, and compute the attributes
    of faces the installed attribute models have not seen (new models?), with a progress bar."""
    from pipeline.attributes import attribute_version, faces_missing_attributes, compute_missing, missing_note

    if note := missing_note(lab):
        print(note)
    missing = len(faces_missing_attributes(lab))
    if not missing:
        return 0
    print(f"{missing} face(s) have no {attribute_version(lab)} attributes yet (new attribute models?): computing them")
    with tqdm(total=100, unit="%", desc="Face attributes") as bar:
        def progress(fraction: float, text: str) -> None:
            bar.n = round(fraction * 100)
            bar.set_postfix_str(text)
            bar.refresh()

        try:
            return compute_missing(lab, progress)
        except Exception as exc:  # noqa: BLE001 - e.g. a damaged weights file: serve without attributes
            print(f"face attributes not computed: {exc}", file=sys.stderr)
            return 0
