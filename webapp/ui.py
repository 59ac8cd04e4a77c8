"""The Gradio Blocks UI. Thin by design: every callback calls one ``pipeline.views``
function (which tests call without a browser) and only maps its result onto components.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

import gradio as gr

from models.attributes.emotion_net import EMOTIONS
from pipeline import auth, views
from pipeline.context import Lab
from pipeline.errors import FaceLabError
from webapp import gradio_cache
from webapp.data_tab import build_data_tab
from webapp.label_tab import build_label_tab
from webapp.train_tab import build_train_tab

log = logging.getLogger(__name__)

FACE_TABLE_HEADERS = ["face id", "file", "score", "person", "suggestion", "similarity", *views.ATTRIBUTE_HEADERS]
SEARCH_TABLE_HEADERS = ["rank", "person", "similarity", "match", "face id", "image id", *views.ATTRIBUTE_HEADERS]
FACES_TABLE_HEADERS = ["face id", "image id", "person", *views.ATTRIBUTE_HEADERS]
EMOTION_CHOICES = ["any", *EMOTIONS]
PEOPLE_TABLE_HEADERS = ["id", "name", "faces"]

INTRO = """# FaceLab
Find faces in photos, name people, and search a gallery of enrolled faces.
Everything runs on this machine; no image leaves it."""


def _user_error(exc: FaceLabError) -> gr.Error:
    # the message may quote user input (names, file names): show it as text
    return gr.Error(html.escape(str(exc)), print_exception=False)


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
    with gr.Blocks(title="FaceLab", analytics_enabled=False, delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(views.status_line(lab), elem_id="status-line")
        with gr.Tab("Detect", id="detect"):
            _detect_tab(lab)
        with gr.Tab("Label", id="label"):
            build_label_tab(lab)
        with gr.Tab("Search", id="search"):
            _search_tab(lab)
        with gr.Tab("People", id="people") as people_tab:
            refresh_people, people_outputs = _people_tab(lab)
        # the list is fresh whenever someone opens the tab (names change in other tabs)
        people_tab.select(refresh_people, outputs=people_outputs, api_visibility="private")
        with gr.Tab("Data", id="data"):
            build_data_tab(lab)
        with gr.Tab("Train", id="train"):
            build_train_tab(lab)
    return demo


def _detect_tab(lab: Lab) -> None:
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
        enroll_button = gr.Button("Name this face", elem_id="enroll-button")
    enroll_message = gr.Markdown(elem_id="enroll-message")
    face_ids = gr.State([])

    def on_detect(files: list[str] | None, request: gr.Request,
                  progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:
        try:
            auth.require_endpoint(lab, request.username, "detect")
            view = views.detect(lab, files or [], progress=lambda f, text: progress(f, desc=text))
        except FaceLabError as exc:
            raise _user_error(exc) from exc
        views.forget_uploads(lab, files or [])  # stored now (or refused): no second copy lying around
        return view.annotated, view.crops, view.rows, view.message, view.face_ids

    detect_button.click(
        on_detect, inputs=[uploads], outputs=[annotated, crops, table, message, face_ids], api_name="detect"
    ).success(lambda: None, None, uploads, api_visibility="private", queue=False)  # their files are gone

    def on_crop_select(ids: list[int], event: gr.SelectData) -> Any:
        return ids[event.index] if ids and event.index < len(ids) else gr.update()

    crops.select(on_crop_select, inputs=[face_ids], outputs=[face_id], api_visibility="private")

    def on_enroll(face: float | None, person: str, request: gr.Request) -> str:
        try:
            user = auth.require_endpoint(lab, request.username, "enroll")
            return views.enroll(lab, face, person, user=user)
        except FaceLabError as exc:
            raise _user_error(exc) from exc

    enroll_button.click(on_enroll, inputs=[face_id, name], outputs=[enroll_message], api_name="enroll")


def _search_tab(lab: Lab) -> None:
    with gr.Row():
        with gr.Column(scale=1):
            query = gr.Image(label="Photo of the person to find", type="filepath", elem_id="search-image")
            k = gr.Slider(1, lab.settings.max_k, value=10, step=1, label="How many results")
            threshold = gr.Slider(
                0.0, 1.0, value=lab.match_threshold, step=0.01,
                label="Match threshold (cosine similarity)", elem_id="search-threshold",
            )
            emotion = gr.Dropdown(EMOTION_CHOICES, value="any", label="Only faces whose emotion is",
                                  elem_id="search-emotion")
            search_button = gr.Button("Search", variant="primary", elem_id="search-button")
            message = gr.Markdown(elem_id="search-message")
        with gr.Column(scale=2):
            gallery = gr.Gallery(
                label="Most similar faces", columns=5, height=420, fit_columns=False, elem_id="search-gallery"
            )
    table = gr.Dataframe(headers=SEARCH_TABLE_HEADERS, label="Results", interactive=False, elem_id="search-table")

    def on_search(path: str | None, top_k: float, min_similarity: float, request: gr.Request,
                  only_emotion: str | None = "any") -> tuple[Any, ...]:
        try:
            auth.require_endpoint(lab, request.username, "search")
            view = views.search(lab, path, int(top_k), float(min_similarity), only_emotion)
        except FaceLabError as exc:
            raise _user_error(exc) from exc
        return view.gallery, view.rows, view.message

    search_button.click(
        on_search, inputs=[query, k, threshold, emotion], outputs=[gallery, table, message], api_name="search"
    )


def _people_tab(lab: Lab) -> tuple[Any, list[Any]]:
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

    def guarded(action, api_name: str):  # noqa: ANN001, ANN202 - small adapter for the three edit actions
        def run(first: Any, second: Any, request: gr.Request) -> tuple[Any, ...]:
            try:
                user = auth.require_endpoint(lab, request.username, api_name)
                return people_outputs(action(lab, first, second, user=user))
            except FaceLabError as exc:
                raise _user_error(exc) from exc

        return run

    outputs = [gallery, table, message]

    def on_refresh(request: gr.Request) -> tuple[Any, ...]:
        try:
            auth.require_endpoint(lab, request.username, "list_people")
        except FaceLabError as exc:
            raise _user_error(exc) from exc
        return people_outputs()

    refresh.click(on_refresh, outputs=outputs, api_name="list_people")
    _find_faces_panel(lab)
    rename_button.click(guarded(views.rename_person, "rename_person"), [rename_from, rename_to], outputs,
                        api_name="rename_person")
    merge_button.click(guarded(views.merge_people, "merge_people"), [merge_from, merge_into], outputs,
                       api_name="merge_people")
    delete_button.click(guarded(views.delete_person, "delete_person"), [delete_name, delete_confirm], outputs,
                        api_name="delete_person")
    return people_outputs, outputs


def _find_faces_panel(lab: Lab) -> None:
    """People tab: a person's faces (or everyone's) filtered by emotion, gender and age."""
    with gr.Accordion("Find faces by emotion, age and gender", open=False, elem_id="find-faces"):
        with gr.Row():
            person = gr.Textbox(label="Person (empty: everyone)", elem_id="find-person")
            emotion = gr.Dropdown(EMOTION_CHOICES, value="any", label="Emotion", elem_id="find-emotion")
            gender = gr.Dropdown(["any", "female", "male"], value="any", label="Gender", elem_id="find-gender")
            min_age = gr.Number(label="Age from", value=None, precision=0, elem_id="find-min-age")
            max_age = gr.Number(label="Age to", value=None, precision=0, elem_id="find-max-age")
        find_button = gr.Button("Find faces", elem_id="find-button")
        gallery = gr.Gallery(label="Faces", columns=10, height=220, fit_columns=False, elem_id="find-gallery")
        table = gr.Dataframe(headers=FACES_TABLE_HEADERS, label="Faces", interactive=False, elem_id="find-table")
        message = gr.Markdown(elem_id="find-message")

    def on_find(who: str | None, emo: str | None, sex: str | None, lo: float | None, hi: float | None,
                request: gr.Request) -> tuple[Any, ...]:
        try:
            auth.require_endpoint(lab, request.username, "find_faces")
            view = views.find_faces(lab, who, emo, sex, lo, hi)
        except FaceLabError as exc:
            raise _user_error(exc) from exc
        return view.gallery, view.rows, view.message

    find_button.click(on_find, inputs=[person, emotion, gender, min_age, max_age], outputs=[gallery, table, message],
                      api_name="find_faces")


def launch(lab: Lab, host: str = "127.0.0.1", port: int = 7860, share: bool = False, **kwargs: Any) -> None:
    # No users: loopback only and no share link (raises auth.LaunchRefused). With users:
    # Gradio asks for a login on every page and API call; callbacks check roles.
    auth.check_bind(host, share, auth.users_configured(lab))
    demo = build_ui(lab)
    demo.queue(default_concurrency_limit=4)
    # show_error=False: gr.Error messages (written for users) still show; any other
    # exception's text (SQL, paths) stays in the server log instead of reaching the client
    # max_file_size: Gradio refuses bigger uploads before writing them to its temp folder
    demo.launch(server_name=host, server_port=port, share=share, show_error=False, footer_links=["api"],
                auth=auth.gradio_auth(lab), auth_message="FaceLab: log in with the account an admin gave you.",
                max_file_size=lab.settings.max_upload_bytes, **kwargs)
