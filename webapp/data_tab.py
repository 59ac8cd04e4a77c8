"""The Data tab: export the labels as a dataset zip, import one, and name groups of
unknown faces at once. Thin like the rest of the UI: each callback calls one pipeline
operation (pipeline.datasets.export / pipeline.datasets.import_data / pipeline.library.clustering) and maps its
result onto components.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

import gradio as gr

from pipeline.context import Lab
from pipeline.datasets import downloads
from pipeline.datasets.export import export_dataset
from pipeline.datasets.import_data import ImportRejected, import_dataset
from pipeline.errors import FaceLabError
from pipeline.library.clustering import (
    FaceCluster,
    cluster_thumbnails,
    cluster_unknown_faces,
    default_threshold,
    name_cluster,
    remove_group_from_person,
    split_person,
)
from pipeline.text import md
from webapp.endpoints import Endpoints
from webapp.views import forget_uploads

#: where webapp.http_guard serves exports (relative: the link works under any root path)
DOWNLOAD_PATH = "facelab/download/"

EXPORT_CHOICES = [("YOLO (labels/*.txt)", "yolo"), ("COCO JSON", "coco"), ("Pascal VOC (XML)", "voc")]
IMPORT_CHOICES = [("Detect automatically", "auto"), ("Pascal VOC", "voc"), ("YOLO", "yolo"), ("COCO JSON", "coco")]


def build_data_tab(lab: Lab, endpoint: Endpoints) -> None:
    """Create the tab's components inside the caller's ``gr.Tab("Data")``. Every callback
    is declared with ``endpoint`` (webapp/endpoints.py), which checks the role first."""
    _export_section(lab, endpoint)
    _import_section(lab, endpoint)
    _cluster_section(lab, endpoint)


def _export_section(lab: Lab, endpoint: Endpoints) -> None:
    gr.Markdown("### Export labels as a dataset")
    with gr.Row():
        fmt = gr.Dropdown(EXPORT_CHOICES, value="yolo", label="Format", elem_id="export-format")
        reviewed = gr.Checkbox(label="Only faces a person accepted", elem_id="export-reviewed")
        button = gr.Button("Export", variant="primary", elem_id="export-button")
    # a link, not a gr.File: the zip holds every face and name, so it stays in the data
    # folder and is served once, to the user who asked (pipeline.datasets.downloads)
    link = gr.Markdown(elem_id="export-file")
    message = gr.Markdown(elem_id="export-message")

    @endpoint("export_dataset")
    def on_export(chosen: str, reviewed_only: bool, request: gr.Request,
                  progress: gr.Progress = gr.Progress()) -> tuple[str, str]:
        user = endpoint.allow("export_dataset", request)
        kind = re.sub(r"[^a-z]", "", str(chosen))[:8] or "dataset"
        offer = downloads.reserve(lab, user, f"facelab-{kind}-{datetime.now():%Y%m%d-%H%M%S}.zip")
        try:
            report = export_dataset(lab, chosen, offer.path, "reviewed" if reviewed_only else "all",
                                    progress=lambda f, text: progress(f, desc=text))
            downloads.publish(lab, offer)
        except BaseException:
            downloads.withdraw(lab, offer)
            raise
        minutes = downloads.TTL_S // 60
        return (f"[Download {offer.filename}]({DOWNLOAD_PATH}{offer.token}) (for you only, once, "
                f"within {minutes} minutes)", md(report.summary().replace(offer.path.name, offer.filename)))

    button.click(on_export, inputs=[fmt, reviewed], outputs=[link, message], api_name=on_export.api_name)


def _import_section(lab: Lab, endpoint: Endpoints) -> None:
    gr.Markdown("### Import a labelled dataset\nA zip in Pascal VOC, YOLO or COCO format. "
                "Everything is checked first; if anything is wrong, nothing is imported. "
                "(Folders: `python app.py import FOLDER`.)")
    with gr.Row():
        upload = gr.File(label="Dataset zip", file_types=[".zip"], elem_id="import-file")
        fmt = gr.Dropdown(IMPORT_CHOICES, value="auto", label="Format", elem_id="import-format")
        button = gr.Button("Import", variant="primary", elem_id="import-button")
    message = gr.Markdown(elem_id="import-message")

    @endpoint("import_dataset")
    def on_import(path: str | None, chosen: str, request: gr.Request,
                  progress: gr.Progress = gr.Progress()) -> tuple[str, None]:
        user = endpoint.allow("import_dataset", request)
        if not path:
            raise gr.Error("Choose a dataset zip first.", print_exception=False)
        try:
            report = import_dataset(lab, Path(path), None if chosen == "auto" else chosen, user=user,
                                    progress=lambda f, text: progress(f, desc=text))
        except ImportRejected as exc:
            head = str(exc).splitlines()[0]
            return "\n".join([f"**{md(head)}**", *(f"- {md(p)}" for p in exc.problems[:50])]), None
        except FaceLabError as exc:
            return f"**Nothing was imported.** {md(exc)}", None
        finally:  # imported or refused: the uploaded archive (faces, names) is not kept
            forget_uploads(lab, [path])
        return "\n".join([md(report.summary()), *(f"- {md(note)}" for note in report.notes)]), None

    button.click(on_import, inputs=[upload, fmt], outputs=[message, upload], api_name=on_import.api_name)


def _cluster_section(lab: Lab, endpoint: Endpoints) -> None:
    gr.Markdown("### Groups of faces\nFind groups of unknown faces that look like one person and name each "
                "group at once, or split a person's faces into groups to find wrongly named ones.")
    with gr.Row():
        threshold = gr.Slider(0.0, 1.0, value=round(default_threshold(lab), 3), step=0.001,
                              label="Same-person similarity", elem_id="cluster-threshold")
        min_faces = gr.Slider(2, 20, value=3, step=1, label="Faces needed to start a group", elem_id="cluster-min-faces")
        find = gr.Button("Find groups of unknown faces", variant="primary", elem_id="cluster-button")
    with gr.Row():
        person = gr.Textbox(label="Or check one person", placeholder="a name", elem_id="split-name")
        split = gr.Button("Split this person into groups", elem_id="split-button")
    groups_gallery = gr.Gallery(label="Groups (click one)", columns=8, height=240, elem_id="cluster-groups")
    members = gr.Gallery(label="Faces of the selected group", columns=10, height=240, elem_id="cluster-members")
    with gr.Row():
        group_number = gr.Number(label="Group", precision=0, elem_id="cluster-group")
        name = gr.Textbox(label="Name for this group", elem_id="cluster-name")
        name_button = gr.Button("Name this group", elem_id="cluster-name-button")
        remove_button = gr.Button("Not this person", variant="stop", elem_id="cluster-remove-button")
    message = gr.Markdown(elem_id="cluster-message")
    groups = gr.State([])  # list[list[int]]: face ids per group, in gallery order

    def show(clusters: list[FaceCluster], text: str) -> tuple[Any, ...]:
        covers = []
        for i, cluster in enumerate(clusters, start=1):
            crop, _ = cluster_thumbnails(lab, [cluster.representative], limit=1)[0]
            covers.append((crop, f"Group {i} · {cluster.size} faces"))
        first = cluster_thumbnails(lab, clusters[0].face_ids) if clusters else []
        return covers, first, 1 if clusters else None, [c.face_ids for c in clusters], text

    outputs = [groups_gallery, members, group_number, groups, message]

    @endpoint("cluster_faces")
    def on_find(sim: float, needed: float) -> tuple[Any, ...]:
        clusters = cluster_unknown_faces(lab, float(sim), int(needed))
        faces = sum(c.size for c in clusters)
        return show(clusters, f"{len(clusters)} group(s) covering {faces} unknown face(s)." if clusters
                    else "No group found: too few similar unknown faces (lower the similarity or the faces needed).")

    @endpoint("split_person")
    def on_split(who: str, sim: float) -> tuple[Any, ...]:
        clusters = split_person(lab, who, float(sim))
        verdict = "looks like one person" if len(clusters) <= 1 else "falls into several groups: check the small ones"
        return show(clusters, f"**{md(who)}**: {sum(c.size for c in clusters)} face(s); {verdict}.")

    @endpoint("cluster_pick_group")
    def on_select(ids: list[list[int]], event: gr.SelectData) -> tuple[Any, ...]:
        if not ids or event.index >= len(ids):
            return gr.update(), gr.update()
        return cluster_thumbnails(lab, ids[event.index]), event.index + 1

    def chosen(ids: list[list[int]], number: float | None) -> list[int]:
        if not ids or number is None or not 1 <= int(number) <= len(ids):
            raise gr.Error("Pick a group first: find groups, then click one.", print_exception=False)
        return ids[int(number) - 1]

    @endpoint("name_group")
    def on_name(ids: list[list[int]], number: float | None, who: str) -> str:
        result = name_cluster(lab, chosen(ids, number), who)
        text = f"Named {len(result.named)} face(s) **{md(result.person.name)}** ({result.person.face_count} in all)."
        if result.skipped:
            text += f" Left {len(result.skipped)} face(s) alone: they are named as someone else."
        return text + " Find groups again to refresh."

    @endpoint("remove_group_name")
    def on_remove(ids: list[list[int]], number: float | None) -> str:
        return md(remove_group_from_person(lab, chosen(ids, number)))

    find.click(on_find, inputs=[threshold, min_faces], outputs=outputs, api_name=on_find.api_name)
    split.click(on_split, inputs=[person, threshold], outputs=outputs, api_name=on_split.api_name)
    groups_gallery.select(on_select, inputs=[groups], outputs=[members, group_number], api_name=on_select.api_name,
                          api_visibility="private")
    name_button.click(on_name, inputs=[groups, group_number, name], outputs=[message], api_name=on_name.api_name)
    remove_button.click(on_remove, inputs=[groups, group_number], outputs=[message], api_name=on_remove.api_name)
