"""The Gradio Blocks UI. Thin by design: every callback calls one ``webapp.views``
function (which tests call without a browser) and only maps its result onto components.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gradio as gr

from pipeline import auth
from pipeline.context import Lab
from webapp import gradio_cache, views
from webapp.data_tab import build_data_tab
from webapp.endpoints import Endpoints, check_declared
from webapp.label_tab import build_label_tab
from webapp.train_tab import build_train_tab

log = logging.getLogger(__name__)

FACE_TABLE_HEADERS = ["face id", "file", "score", "face?", "person", "who (suggestion)", "similarity",
                      *views.ATTRIBUTE_HEADERS]
SEARCH_TABLE_HEADERS = ["rank", "person", "similarity", "same person", "face id", "image id", *views.ATTRIBUTE_HEADERS]
FACES_TABLE_HEADERS = ["face id", "image id", "person", *views.ATTRIBUTE_HEADERS]
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
            refresh_people, people_outputs, merge_choices, merge_into = _people_tab(lab, endpoint)
        # the list is fresh whenever someone opens the tab (names change in other tabs)
        people_tab.select(refresh_people, outputs=people_outputs, api_name=refresh_people.api_name,
                          api_visibility="private").success(
            merge_choices, None, merge_into, api_name=merge_choices.api_name, api_visibility="private", queue=False)
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
            emotion = gr.Dropdown(views.EMOTION_CHOICES, value="any", label="Only faces whose emotion is",
                                  elem_id="search-emotion")
            search_button = gr.Button("Search", variant="primary", elem_id="search-button")
            message = gr.Markdown(elem_id="search-message")
        with gr.Column(scale=2):
            gallery = gr.Gallery(
                label="Most similar faces", columns=5, height=420, fit_columns=False, elem_id="search-gallery"
            )
    table = gr.Dataframe(headers=SEARCH_TABLE_HEADERS, label="Results", interactive=False, elem_id="search-table")
    details = gr.JSON(label="Details (every face: box, quality, decision, ranked people)", elem_id="search-details")

    @endpoint("search")
    def on_search(path: str | None, top_k: float, min_similarity: float, auto: bool, embeddings: bool,
                  only_emotion: str | None = "any") -> tuple[Any, ...]:
        view = views.search(lab, path, int(top_k), None if auto else float(min_similarity), bool(embeddings),
                            only_emotion)
        return view.gallery, view.rows, view.message, view.details

    search_button.click(
        on_search, inputs=[query, k, threshold, automatic, with_embeddings, emotion],
        outputs=[gallery, table, message, details], api_name=on_search.api_name
    )


def _people_tab(lab: Lab, endpoint: Endpoints) -> tuple[Any, list[Any], Any, Any]:
    """People: click a face or a row to select a person; rename, merge and delete act on
    the selection. Delete asks first, saying what goes and that it is final."""
    refresh = gr.Button("Refresh", size="sm", elem_id="people-refresh")
    gallery = gr.Gallery(label="People (click one to select them)", columns=10, height=220, fit_columns=False,
                         allow_preview=False, elem_id="people-gallery")
    table = gr.Dataframe(headers=PEOPLE_TABLE_HEADERS, label="People (click a row to select them)",
                         interactive=False, elem_id="people-table")
    message = gr.Markdown(elem_id="people-message")
    gallery_names = gr.State([])
    selected = gr.Textbox(label="Selected person (click a face or a row above, or type a name)",
                          elem_id="people-selected")
    with gr.Row():
        with gr.Column():
            rename_to = gr.Textbox(label="New name", elem_id="people-rename-to")
            rename_button = gr.Button("Rename", elem_id="people-rename")
        with gr.Column():
            merge_into = gr.Dropdown(label="Merge: move every face of the selected person into",
                                     choices=[], value=None, allow_custom_value=True, elem_id="people-merge-into")
            merge_button = gr.Button("Merge", elem_id="people-merge")
        with gr.Column():
            delete_faces = gr.Checkbox(label="Also delete their faces, embeddings and index entries (privacy delete)",
                                       elem_id="people-delete-faces")
            delete_button = gr.Button("Delete person…", variant="stop", elem_id="people-delete")
    with gr.Group(visible=False, elem_id="people-confirm") as confirm_box:
        confirm_text = gr.Markdown(elem_id="people-confirm-text")
        # what the question was about: the second click deletes exactly that, even if the
        # selection changes in between
        confirm_name = gr.Textbox(visible="hidden", label="Person to delete", elem_id="people-confirm-name")
        confirm_faces = gr.Checkbox(visible="hidden", label="With their faces", elem_id="people-confirm-faces")
        with gr.Row():
            confirm_button = gr.Button("Yes, delete for good", variant="stop", elem_id="people-confirm-yes")
            cancel_button = gr.Button("Cancel", elem_id="people-confirm-no")

    def people_outputs(text: str = "") -> tuple[Any, ...]:
        view = views.people(lab)
        return view.gallery, view.rows, text or view.message, view.gallery_names

    # (gallery_names is a State: the API still answers gallery, table, message)
    outputs = [gallery, table, message, gallery_names]

    def guarded(action, api_name: str):  # noqa: ANN001, ANN202 - small adapter for rename and merge
        @endpoint(api_name)
        def run(first: Any, second: Any, request: gr.Request) -> tuple[Any, ...]:
            user = endpoint.allow(api_name, request)  # the name for the audit log
            return people_outputs(action(lab, first, second, user=user))

        return run

    def merge_choices() -> Any:
        """Everyone's name, as targets to merge into (after every change to the list)."""
        return gr.update(choices=views.person_names(lab), value=None)

    def listed(dependency: Any, after: str) -> Any:
        api_name = f"people_merge_choices_{after}"
        return dependency.success(endpoint(api_name)(merge_choices), None, merge_into, api_name=api_name,
                                  api_visibility="private", queue=False)

    on_refresh = endpoint("list_people")(lambda: people_outputs())
    on_open = endpoint("people_tab_open")(lambda: people_outputs())
    listed(refresh.click(on_refresh, outputs=outputs, api_name=on_refresh.api_name), "refresh")
    _find_faces_panel(lab, endpoint)

    # -- selecting --------------------------------------------------------------------------
    @endpoint("people_pick_face")
    def on_gallery(names: list[str], event: gr.SelectData) -> Any:
        index = event.index if isinstance(event.index, int) else None
        return names[index] if index is not None and 0 <= index < len(names) else gr.skip()

    gallery.select(on_gallery, [gallery_names], selected, api_name=on_gallery.api_name, api_visibility="private",
                   queue=False)

    @endpoint("people_pick_row")
    def on_row(event: gr.SelectData) -> Any:
        row = event.row_value if isinstance(event.row_value, list) else None
        return str(row[1]) if row and len(row) > 1 and row[1] not in (None, "") else gr.skip()

    table.select(on_row, None, selected, api_name=on_row.api_name, api_visibility="private", queue=False)

    # -- acting on the selection ----------------------------------------------------------------
    # afterwards the selection follows the person: their new name, or the one merged into
    follow_rename = endpoint("people_follow_rename")(lambda new: new)
    follow_merge = endpoint("people_follow_merge")(lambda into: into)
    renamed = rename_button.click(guarded(views.rename_person, "rename_person"), [selected, rename_to], outputs,
                                  api_name="rename_person")
    listed(renamed.success(follow_rename, rename_to, selected, api_name=follow_rename.api_name,
                           api_visibility="private", queue=False), "rename")
    merged = merge_button.click(guarded(views.merge_people, "merge_people"), [selected, merge_into], outputs,
                                api_name="merge_people")
    # (the selection first: refreshing the merge list clears merge_into)
    listed(merged.success(follow_merge, merge_into, selected, api_name=follow_merge.api_name,
                          api_visibility="private", queue=False), "merge")

    @endpoint("delete_person_ask")
    def on_delete_asked(name: str, with_faces: bool) -> tuple[Any, ...]:
        text = views.delete_confirmation(lab, name, bool(with_faces))
        return gr.update(visible=True), text, name, bool(with_faces)

    delete_button.click(on_delete_asked, [selected, delete_faces], [confirm_box, confirm_text, confirm_name,
                                                                     confirm_faces],
                        api_name=on_delete_asked.api_name, api_visibility="private")
    on_cancel = endpoint("delete_person_cancel")(lambda: (gr.update(visible=False), "Nothing was deleted."))
    cancel_button.click(on_cancel, None, [confirm_box, message], api_name=on_cancel.api_name,
                        api_visibility="private", queue=False)

    @endpoint("delete_person")
    def on_delete(name: str, with_faces: bool, request: gr.Request) -> tuple[Any, ...]:
        user = endpoint.allow("delete_person", request)  # the name for the audit log
        return people_outputs(views.delete_person(lab, name, bool(with_faces), user=user))

    deleted = confirm_button.click(on_delete, [confirm_name, confirm_faces], outputs, api_name="delete_person")
    listed(deleted, "delete")
    on_deleted = endpoint("delete_person_done")(lambda: ("", gr.update(visible=False)))
    deleted.success(on_deleted, None, [selected, confirm_box], api_name=on_deleted.api_name,
                    api_visibility="private", queue=False)
    return on_open, outputs, endpoint("people_merge_choices_open")(merge_choices), merge_into


#: seconds to wait for the app's own first answer on a busy machine (see _patient_localhost_check)
LOCALHOST_CHECK_S = 120.0


def _patient_localhost_check() -> None:
    """Gradio's launch asks the server it has just started for one page with a 3 s timeout,
    and gives up (ValueError: "When localhost is not accessible ...") at the first timeout.
    On a loaded 2-core machine the first answer can take longer than that, and the app
    then exits at start. Ask again until LOCALHOST_CHECK_S have passed instead."""
    import time

    import httpx
    from gradio import networking

    quick = networking.url_ok

    def url_ok(url: str) -> bool:
        deadline = time.monotonic() + LOCALHOST_CHECK_S
        while True:
            try:
                if httpx.head(url, timeout=10, verify=False).status_code in (200, 301, 302, 303, 307, 308, 401):
                    return True
            except httpx.TimeoutException:
                pass  # slow, not absent: ask again
            except (ConnectionError, httpx.HTTPError):
                return quick(url)  # refused or broken: Gradio's own answer
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)

    networking.url_ok = url_ok


def _find_faces_panel(lab: Lab, endpoint: Endpoints) -> None:
    """People tab: a person's faces (or everyone's) filtered by emotion, gender and age."""
    with gr.Accordion("Find faces by emotion, age and gender", open=False, elem_id="find-faces"):
        with gr.Row():
            person = gr.Textbox(label="Person (empty: everyone)", elem_id="find-person")
            emotion = gr.Dropdown(views.EMOTION_CHOICES, value="any", label="Emotion", elem_id="find-emotion")
            gender = gr.Dropdown(["any", "female", "male"], value="any", label="Gender", elem_id="find-gender")
            min_age = gr.Number(label="Age from", value=None, precision=0, elem_id="find-min-age")
            max_age = gr.Number(label="Age to", value=None, precision=0, elem_id="find-max-age")
        find_button = gr.Button("Find faces", elem_id="find-button")
        gallery = gr.Gallery(label="Faces", columns=10, height=220, fit_columns=False, elem_id="find-gallery")
        table = gr.Dataframe(headers=FACES_TABLE_HEADERS, label="Faces", interactive=False, elem_id="find-table")
        message = gr.Markdown(elem_id="find-message")

    @endpoint("find_faces")
    def on_find(who: str | None, emo: str | None, sex: str | None, lo: float | None,
                hi: float | None) -> tuple[Any, ...]:
        view = views.find_faces(lab, who, emo, sex, lo, hi)
        return view.gallery, view.rows, view.message

    find_button.click(on_find, inputs=[person, emotion, gender, min_age, max_age], outputs=[gallery, table, message],
                      api_name=on_find.api_name)


def launch(lab: Lab, host: str = "127.0.0.1", port: int = 7860, share: bool = False, **kwargs: Any) -> None:
    # No users: loopback only and no share link (raises auth.LaunchRefused). With users:
    # Gradio asks for a login on every page and API call; callbacks check roles, and
    # webapp.http_guard checks every request (removed users, routes Gradio leaves open,
    # login throttling by address, export downloads, security headers).
    from starlette.middleware import Middleware

    from pipeline.datasets import downloads
    from webapp.http_guard import HttpGuard

    with_users = auth.users_configured(lab)
    auth.check_bind(host, share, with_users)
    downloads.purge(lab)  # exports left unsent by an earlier run
    demo = build_ui(lab)
    demo.queue(default_concurrency_limit=4)
    app_kwargs = dict(kwargs.pop("app_kwargs", None) or {})
    app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), Middleware(HttpGuard, lab=lab, with_users=with_users)]
    _patient_localhost_check()
    # show_error=False: gr.Error messages (written for users) still show; any other
    # exception's text (SQL, paths) stays in the server log instead of reaching the client
    # max_file_size: Gradio refuses bigger uploads before writing them to its temp folder
    demo.launch(server_name=host, server_port=port, share=share, show_error=False, footer_links=["api"],
                auth=auth.gradio_auth(lab) if with_users else None,
                auth_message="FaceLab: log in with the account an admin gave you.",
                max_file_size=lab.settings.max_upload_bytes, app_kwargs=app_kwargs, **kwargs)
