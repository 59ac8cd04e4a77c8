"""The Gradio Blocks UI. Thin by design: every callback calls one ``pipeline.views``
function (which tests call without a browser) and only maps its result onto components.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gradio as gr

from pipeline import auth, views
from pipeline.context import Lab
from webapp import gradio_cache
from webapp.data_tab import build_data_tab
from webapp.endpoints import Endpoints, check_declared
from webapp.label_tab import build_label_tab
from webapp.train_tab import build_train_tab

log = logging.getLogger(__name__)

FACE_TABLE_HEADERS = ["face id", "file", "score", "face?", "person", "who (suggestion)", "similarity"]
SEARCH_TABLE_HEADERS = ["rank", "person", "similarity", "same person", "face id", "image id"]
PEOPLE_TABLE_HEADERS = ["id", "name", "faces"]

INTRO = """# FaceLab
Find faces in photos, name people, and search a gallery of enrolled faces.
Everything runs on this machine; no image leaves it."""


def build_ui(lab: Lab) -> gr.Blocks:
    gradio_cache.install()  # concurrent identical image outputs must not serve a half-written file
    from gradio.utils import get_upload_folder

    if Path(get_upload_folder()).resolve() != lab.settings.ui_cache_dir.resolve():
        # python app.py points GRADIO_TEMP_DIR there; other launchers may not
        log.warning("Gradio's temporary folder %s is not %s: uploads and served faces kept there are "
                    "out of reach of privacy deletes; start the app with `python app.py`, or set "
                    "GRADIO_TEMP_DIR before Gradio is imported", get_upload_folder(), lab.settings.ui_cache_dir)
    # delete_cache: Gradio's uploads and outputs older than a day go, checked hourly
    # (search photos are never stored; pictures of stored photos are made again on demand)
    endpoint = Endpoints(lab)
    with gr.Blocks(title="FaceLab", analytics_enabled=False, delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(views.status_line(lab), elem_id="status-line")
        with gr.Tab("Detect", id="detect"):
            _detect_tab(lab, endpoint)
        with gr.Tab("Label", id="label"):
            build_label_tab(lab, endpoint)
        with gr.Tab("Search", id="search"):
            _search_tab(lab, endpoint)
        with gr.Tab("People", id="people") as people_tab:
            refresh_people, people_outputs = _people_tab(lab, endpoint)
        # the list is fresh whenever someone opens the tab (names change in other tabs)
        people_tab.select(refresh_people, outputs=people_outputs, api_name=refresh_people.api_name,
                          api_visibility="private")
        with gr.Tab("Data", id="data"):
            build_data_tab(lab, endpoint)
        with gr.Tab("Train", id="train"):
            build_train_tab(lab, endpoint)
    check_declared(demo)  # every event, hidden ones included, has a declared role check
    return demo


def _detect_tab(lab: Lab, endpoint: Endpoints) -> None:
    with gr.Row():
        with gr.Column(scale=1):
            uploads = gr.File(
                label="Photos (one or many; a whole folder works too)",
                # no file_types filter: Gradio would refuse the whole batch for one
                # stray file; ingest refuses that file alone, with a reason
                file_count="multiple",
                elem_id="detect-files",
            )
            detect_button = gr.Button("Detect faces", variant="primary", elem_id="detect-button")
            message = gr.Markdown(elem_id="detect-message")
        with gr.Column(scale=2):
            annotated = gr.Gallery(
                label="Detected faces", columns=2, height=420, object_fit="contain", elem_id="detect-annotated"
            )
    crops = gr.Gallery(
        label="Face crops (click one to name it)", columns=10, height=200, fit_columns=False,
        allow_preview=False, elem_id="detect-crops",
    )
    table = gr.Dataframe(headers=FACE_TABLE_HEADERS, label="Faces", interactive=False, elem_id="detect-table")
    with gr.Row():
        face_id = gr.Number(label="Face id", value=None, precision=0, elem_id="enroll-face-id")
        name = gr.Textbox(label="Person's name", placeholder="e.g. Eileen Collins", elem_id="enroll-name")
        confirm_face = gr.Checkbox(label="It is a face (needed for boxes marked \"may not be a face\")",
                                   value=False, elem_id="enroll-confirm-face")
        enroll_button = gr.Button("Name this face", elem_id="enroll-button")
    enroll_message = gr.Markdown(elem_id="enroll-message")
    face_ids = gr.State([])

    @endpoint("detect")
    def on_detect(files: list[str] | None, progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:
        try:
            view = views.detect(lab, files or [], progress=lambda f, text: progress(f, desc=text))
        finally:
            views.forget_uploads(lab, files or [])  # stored now (or refused): no second copy lying around
        return view.annotated, view.crops, view.rows, view.message, view.face_ids

    clear_uploads = endpoint("detect_clear_uploads")(lambda: None)
    detect_button.click(
        on_detect, inputs=[uploads], outputs=[annotated, crops, table, message, face_ids], api_name=on_detect.api_name
    ).success(clear_uploads, None, uploads, api_name=clear_uploads.api_name, api_visibility="private",
              queue=False)  # their files are gone

    @endpoint("detect_pick_crop")
    def on_crop_select(ids: list[int], event: gr.SelectData) -> Any:
        return ids[event.index] if ids and event.index < len(ids) else gr.update()

    crops.select(on_crop_select, inputs=[face_ids], outputs=[face_id], api_name=on_crop_select.api_name,
                 api_visibility="private")

    @endpoint("enroll")
    def on_enroll(face: float | None, person: str, confirm: bool, request: gr.Request) -> str:
        user = endpoint.allow("enroll", request)
        return views.enroll(lab, face, person, user=user, confirm_face=bool(confirm))

    enroll_button.click(on_enroll, inputs=[face_id, name, confirm_face], outputs=[enroll_message],
                        api_name=on_enroll.api_name)


def _search_tab(lab: Lab, endpoint: Endpoints) -> None:
    with gr.Row():
        with gr.Column(scale=1):
            # a file, not gr.Image: Gradio would decode the upload itself before FaceLab's
            # size check (a 164 KB PNG of 13000x13000 pixels took 9 s and ~650 MB there);
            # views.search checks the header first (storage.image_decode)
            query = gr.File(label="Photo of the person to find", file_count="single", type="filepath",
                            elem_id="search-image")
            k = gr.Slider(1, lab.settings.max_k, value=10, step=1, label="How many results")
            automatic = gr.Checkbox(
                label="Automatic threshold (calibrated for the number of enrolled faces: about 1 % of strangers "
                      "accepted)", value=True, elem_id="search-automatic")
            threshold = gr.Slider(
                0.0, 1.0, value=lab.match_threshold, step=0.01,
                label="Fixed threshold (cosine similarity), when not automatic", elem_id="search-threshold",
            )
            with_embeddings = gr.Checkbox(label="Include the query embeddings in the details", value=False,
                                          elem_id="search-embeddings")
            search_button = gr.Button("Search", variant="primary", elem_id="search-button")
            message = gr.Markdown(elem_id="search-message")
        with gr.Column(scale=2):
            gallery = gr.Gallery(
                label="Most similar faces", columns=5, height=420, fit_columns=False, elem_id="search-gallery"
            )
    table = gr.Dataframe(headers=SEARCH_TABLE_HEADERS, label="Results", interactive=False, elem_id="search-table")
    details = gr.JSON(label="Details (every face: box, quality, decision, ranked people)", elem_id="search-details")

    @endpoint("search")
    def on_search(path: str | None, top_k: float, min_similarity: float, auto: bool, embeddings: bool) -> tuple[Any, ...]:
        view = views.search(lab, path, int(top_k), None if auto else float(min_similarity), bool(embeddings))
        return view.gallery, view.rows, view.message, view.details

    search_button.click(
        on_search, inputs=[query, k, threshold, automatic, with_embeddings], outputs=[gallery, table, message, details],
        api_name=on_search.api_name
    )


def _people_tab(lab: Lab, endpoint: Endpoints) -> tuple[Any, list[Any]]:
    refresh = gr.Button("Refresh", size="sm", elem_id="people-refresh")
    gallery = gr.Gallery(label="People", columns=10, height=220, fit_columns=False, elem_id="people-gallery")
    table = gr.Dataframe(headers=PEOPLE_TABLE_HEADERS, label="People", interactive=False, elem_id="people-table")
    message = gr.Markdown(elem_id="people-message")
    with gr.Row():
        with gr.Column():
            rename_from = gr.Textbox(label="Rename: current name")
            rename_to = gr.Textbox(label="New name")
            rename_button = gr.Button("Rename")
        with gr.Column():
            merge_from = gr.Textbox(label="Merge: move every face of")
            merge_into = gr.Textbox(label="into")
            merge_button = gr.Button("Merge")
        with gr.Column():
            delete_name = gr.Textbox(label="Delete: name")
            delete_confirm = gr.Checkbox(label="Also delete their faces, embeddings and index entries")
            delete_button = gr.Button("Delete person", variant="stop")

    def people_outputs(text: str = "") -> tuple[Any, ...]:
        view = views.people(lab)
        return view.gallery, view.rows, text or view.message

    def edit(action, api_name: str):  # noqa: ANN001, ANN202 - small adapter for the three edit actions
        @endpoint(api_name)
        def run(first: Any, second: Any, request: gr.Request) -> tuple[Any, ...]:
            user = endpoint.allow(api_name, request)  # the name for the audit log
            return people_outputs(action(lab, first, second, user=user))

        return run

    outputs = [gallery, table, message]
    on_refresh = endpoint("list_people")(lambda: people_outputs())
    on_open = endpoint("people_tab_open")(lambda: people_outputs())
    refresh.click(on_refresh, outputs=outputs, api_name=on_refresh.api_name)
    for button, action, api_name, inputs in (
            (rename_button, views.rename_person, "rename_person", [rename_from, rename_to]),
            (merge_button, views.merge_people, "merge_people", [merge_from, merge_into]),
            (delete_button, views.delete_person, "delete_person", [delete_name, delete_confirm])):
        button.click(edit(action, api_name), inputs, outputs, api_name=api_name)
    return on_open, outputs


def launch(lab: Lab, host: str = "127.0.0.1", port: int = 7860, share: bool = False, **kwargs: Any) -> None:
    # No users: loopback only and no share link (raises auth.LaunchRefused). With users:
    # Gradio asks for a login on every page and API call; callbacks check roles, and
    # webapp.http_guard checks every request (removed users, routes Gradio leaves open,
    # login throttling by address, export downloads, security headers).
    from starlette.middleware import Middleware

    from pipeline import downloads
    from webapp.http_guard import HttpGuard

    with_users = auth.users_configured(lab)
    auth.check_bind(host, share, with_users)
    downloads.purge(lab)  # exports left unsent by an earlier run
    demo = build_ui(lab)
    demo.queue(default_concurrency_limit=4)
    app_kwargs = dict(kwargs.pop("app_kwargs", None) or {})
    app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), Middleware(HttpGuard, lab=lab, with_users=with_users)]
    # show_error=False: gr.Error messages (written for users) still show; any other
    # exception's text (SQL, paths) stays in the server log instead of reaching the client
    # max_file_size: Gradio refuses bigger uploads before writing them to its temp folder
    demo.launch(server_name=host, server_port=port, share=share, show_error=False, footer_links=["api"],
                auth=auth.gradio_auth(lab) if with_users else None,
                auth_message="FaceLab: log in with the account an admin gave you.",
                max_file_size=lab.settings.max_upload_bytes, app_kwargs=app_kwargs, **kwargs)
