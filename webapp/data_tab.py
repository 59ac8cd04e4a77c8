"""The Data tab: export the labels as a dataset zip, import one, and name groups of
unknown faces at once. Thin like the rest of the UI: each callback calls one pipeline
operation (pipeline.export / pipeline.import_data / pipeline.clustering) and maps its
result onto components.
"""

from __future__ import annotations

import html
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import gradio as gr

from pipeline.clustering import (
    FaceCluster,
    cluster_thumbnails,
    cluster_unknown_faces,
    default_threshold,
    name_cluster,
    remove_group_from_person,
    split_person,
)
from pipeline import auth
from pipeline.context import Lab
from pipeline.errors import FaceLabError
from pipeline.export import export_dataset
from pipeline.import_data import ImportRejected, import_dataset
from pipeline.views import md

EXPORT_CHOICES = [("YOLO (labels/*.txt)", "yolo"), ("COCO JSON", "coco"), ("Pascal VOC (XML)", "voc")]
IMPORT_CHOICES = [("Detect automatically", "auto"), ("Pascal VOC", "voc"), ("YOLO", "yolo"), ("COCO JSON", "coco")]


def _user_error(exc: FaceLabError) -> gr.Error:
    return gr.Error(html.escape(str(exc)), print_exception=False)


def _allow(lab: Lab, request: gr.Request, api_name: str) -> None:
    """Refuse the call unless the logged-in user's role may use this endpoint."""
    try:
        auth.require_endpoint(lab, getattr(request, "username", None), api_name)
    except FaceLabError as exc:
        raise gr.Error(html.escape(str(exc)), print_exception=False) from exc


def build_data_tab(lab: Lab) -> None:
    """Create the tab's components inside the caller's ``gr.Tab("Data")``."""
    _export_section(lab)
    _import_section(lab)
    _cluster_section(lab)


def _export_section(lab: Lab) -> None:
    gr.Markdown("### Export labels as a dataset")
    with gr.Row():
        fmt = gr.Dropdown(EXPORT_CHOICES, value="yolo", label="Format", elem_id="export-format")
        reviewed = gr.Checkbox(label="Only faces a person accepted", elem_id="export-reviewed")
        button = gr.Button("Export", variant="primary", elem_id="export-button")
    file = gr.File(label="Dataset zip", interactive=False, elem_id="export-file")
    message = gr.Markdown(elem_id="export-message")

    def on_export(chosen: str, reviewed_only: bool, request: gr.Request, progress: gr.Progress = gr.Progress()) -> tuple[Any, str]:
        _allow(lab, request, "export_dataset")  # roles are enforced here, server-side
        folder = Path(tempfile.mkdtemp(prefix="facelab-export-"))  # Gradio serves files from the temp dir
        out = folder / f"facelab-{chosen}-{datetime.now():%Y%m%d-%H%M%S}.zip"
        try:
            report = export_dataset(lab, chosen, out, "reviewed" if reviewed_only else "all",
                                    progress=lambda f, text: progress(f, desc=text))
        except FaceLabError as exc:
            raise _user_error(exc) from exc
        return str(report.path), md(report.summary())

    button.click(on_export, inputs=[fmt, reviewed], outputs=[file, message], api_name="export_dataset")


def _import_section(lab: Lab) -> None:
    gr.Markdown("### Import a labelled dataset\nA zip in Pascal VOC, YOLO or COCO format. "
                "Everything is checked first; if anything is wrong, nothing is imported. "
                "(Folders: `python app.py import FOLDER`.)")
    with gr.Row():
        upload = gr.File(label="Dataset zip", file_types=[".zip"], elem_id="import-file")
        fmt = gr.Dropdown(IMPORT_CHOICES, value="auto", label="Format", elem_id="import-format")
        button = gr.Button("Import", variant="primary", elem_id="import-button")
    message = gr.Markdown(elem_id="import-message")

    def on_import(path: str | None, chosen: str, request: gr.Request, progress: gr.Progress = gr.Progress()) -> str:
        _allow(lab, request, "import_dataset")  # roles are enforced here, server-side
        if not path:
            raise gr.Error("Choose a dataset zip first.", print_exception=False)
        try:
            report = import_dataset(lab, Path(path), None if chosen == "auto" else chosen,
                                    progress=lambda f, text: progress(f, desc=text))
        except ImportRejected as exc:
            head = str(exc).splitlines()[0]
            return "\n".join([f"**{md(head)}**", *(f"- {md(p)}" for p in exc.problems[:50])])
        except FaceLabError as exc:
            return f"**Nothing was imported.** {md(exc)}"
        return "\n".join([md(report.summary()), *(f"- {md(note)}" for note in report.notes)])

    button.click(on_import, inputs=[upload, fmt], outputs=[message], api_name="import_dataset")


def _cluster_section(lab: Lab) -> None:
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

    def on_find(sim: float, needed: float, request: gr.Request) -> tuple[Any, ...]:
        _allow(lab, request, "cluster_faces")  # roles are enforced here, server-side
        try:
            clusters = cluster_unknown_faces(lab, float(sim), int(needed))
        except FaceLabError as exc:
            raise _user_error(exc) from exc
        faces = sum(c.size for c in clusters)
        return show(clusters, f"{len(clusters)} group(s) covering {faces} unknown face(s)." if clusters
                    else "No group found: too few similar unknown faces (lower the similarity or the faces needed).")

    def on_split(who: str, sim: float, request: gr.Request) -> tuple[Any, ...]:
        _allow(lab, request, "split_person")  # roles are enforced here, server-side
        try:
            clusters = split_person(lab, who, float(sim))
        except FaceLabError as exc:
            raise _user_error(exc) from exc
        verdict = "looks like one person" if len(clusters) <= 1 else "falls into several groups: check the small ones"
        return show(clusters, f"**{md(who)}**: {sum(c.size for c in clusters)} face(s); {verdict}.")

    def on_select(ids: list[list[int]], event: gr.SelectData) -> tuple[Any, ...]:
        if not ids or event.index >= len(ids):
            return gr.update(), gr.update()
        return cluster_thumbnails(lab, ids[event.index]), event.index + 1

    def chosen(ids: list[list[int]], number: float | None) -> list[int]:
        if not ids or number is None or not 1 <= int(number) <= len(ids):
            raise gr.Error("Pick a group first: find groups, then click one.", print_exception=False)
        return ids[int(number) - 1]

    def on_name(ids: list[list[int]], number: float | None, who: str, request: gr.Request) -> str:
        _allow(lab, request, "name_group")  # roles are enforced here, server-side
        try:
            result = name_cluster(lab, chosen(ids, number), who)
        except FaceLabError as exc:
            raise _user_error(exc) from exc
        text = f"Named {len(result.named)} face(s) **{md(result.person.name)}** ({result.person.face_count} in all)."
        if result.skipped:
            text += f" Left {len(result.skipped)} face(s) alone: they are named as someone else."
        return text + " Find groups again to refresh."

    def on_remove(ids: list[list[int]], number: float | None, request: gr.Request) -> str:
        _allow(lab, request, "remove_group_name")  # roles are enforced here, server-side
        try:
            return md(remove_group_from_person(lab, chosen(ids, number)))
        except FaceLabError as exc:
            raise _user_error(exc) from exc

    find.click(on_find, inputs=[threshold, min_faces], outputs=outputs, api_name="cluster_faces")
    split.click(on_split, inputs=[person, threshold], outputs=outputs, api_name="split_person")
    groups_gallery.select(on_select, inputs=[groups], outputs=[members, group_number], api_visibility="private")
    name_button.click(on_name, inputs=[groups, group_number, name], outputs=[message], api_name="name_group")
    remove_button.click(on_remove, inputs=[groups, group_number], outputs=[message], api_name="remove_group_name")
