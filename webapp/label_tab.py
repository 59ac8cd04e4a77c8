"""The Label tab: check and correct face boxes and names, image after image, from the keyboard.

Thin by design, like ``webapp.ui``: every callback calls one ``pipeline.review`` function
(which tests call without a browser) and maps the returned ``LabelView`` onto components.

Why it is built this way (see ../shared/notes/measurements.md on the annotator):
- the annotator's ``.change`` fires on load and on half-drawn boxes, so nothing saves
  on change: Save / Save & next / naming are explicit actions;
- the annotator hands back a re-encoded image, so the open image's id and versions live
  in ``gr.State`` (and the last image id in the browser, to resume after a reload);
- a box's face id rides in its label ("Eileen Collins #12"), the only free-text field
  the component keeps;
- Gradio buttons have no keyboard shortcuts, so a small page script clicks them by
  ``elem_id``; it ignores keys typed into text fields.
"""

from __future__ import annotations

import html
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr
from gradio_image_annotation import image_annotator

from pipeline import auth, privacy, review
from pipeline.context import Lab
from pipeline.errors import FaceLabError
from webapp.endpoints import Endpoints

SHORTCUTS = (
    "**Keys** (outside text fields): **S** save · **N** save & next · **K** skip · **U** undo · "
    "**1-5** accept a suggestion for the selected box · **[ ]** previous/next box (drawn in magenta) · "
    "**X** remove the selected box. "
    "In the image: **C** draw boxes, **D** move/resize, **Delete** remove the selected box; "
    "after drawing, type the person's name (or keep *face*) and press Enter."
)

#: keyboard shortcuts and pop-up focus; runs once per page (gr.HTML's js_on_load)
KEYS_JS = r"""
if (!window.__facelabLabelKeys) {
  window.__facelabLabelKeys = true;
  const ids = {s: "label-save", n: "label-next", k: "label-skip", u: "label-undo", x: "label-remove-box",
               "[": "label-prev-box", "]": "label-next-box"};
  const shown = (el) => !!el && el.offsetParent !== null;
  const typing = (t) => !!t && (t.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(t.tagName));
  const popupInput = () => {
    const input = document.querySelector("#label-annotator #model-box-edit input[aria-label='Label']");
    return shown(input) ? input : null;
  };
  const setName = (input, text) => {
    input.value = text;
    input.dispatchEvent(new Event("input", {bubbles: true}));
  };
  // true from the moment the pop-up opens until the first key: that key replaces "face"
  let freshPopup = false;
  document.addEventListener("keydown", (e) => {
    const input = popupInput();
    if (input) {
      // The label pop-up is open: every key belongs to the name, even if the focus has
      // not reached the field yet (keys typed right after drawing would otherwise reach
      // the annotator's own shortcuts, or ours).
      const printable = e.key.length === 1 && !e.ctrlKey && !e.metaKey && !e.altKey;
      if (e.target === input) {
        if (freshPopup && printable) setName(input, "");
        freshPopup = false;
        return;
      }
      if (typing(e.target)) return;  // e.g. the pop-up's colour field
      if (printable) {
        e.preventDefault();
        e.stopPropagation();
        input.focus();
        setName(input, (freshPopup ? "" : input.value) + e.key);
        freshPopup = false;
      } else if (e.key === "Enter" || e.key === "Escape") {
        e.preventDefault();
        e.stopPropagation();
        input.focus();
        input.dispatchEvent(new KeyboardEvent("keydown", {key: e.key, code: e.code, bubbles: true, cancelable: true}));
      }
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat || typing(e.target)) return;
    const key = (e.key || "").toLowerCase();
    // C (draw) and D (move) belong to the photo editor, which only hears keys while it has
    // the focus; after X, [ ] or a button click it does not: hand those keys over to it
    // (the annotator acts on keys whose target is its focusable container)
    const editor = document.querySelector("#label-annotator .annotator-container");
    if ((key === "c" || key === "d") && shown(editor) && !e.target.closest?.("#label-annotator")) {
      e.preventDefault();
      e.stopPropagation();
      editor.focus();
      editor.dispatchEvent(new KeyboardEvent("keydown", {key: e.key, code: e.code, bubbles: true, cancelable: true}));
      return;
    }
    const id = ids[key] || (/^[1-5]$/.test(key) ? "label-suggest-" + key : null);
    if (!id) return;
    const button = document.getElementById(id);
    if (!shown(button) || button.disabled) return;
    e.preventDefault();
    e.stopPropagation();
    button.click();
  }, true);
  // The annotator opens its label pop-up after a box is drawn but leaves the focus on
  // the canvas: move it to the name field (again shortly after, once the annotator's
  // own mouse-up handling has run).
  let popupWasOpen = false;
  new MutationObserver(() => {
    const input = popupInput();
    if (input && !popupWasOpen) {
      freshPopup = true;
      input.focus();
      setTimeout(() => { if (popupInput() === input && document.activeElement !== input) input.focus(); }, 60);
    }
    popupWasOpen = !!input;
  }).observe(document.body, {childList: true, subtree: true, attributes: true, attributeFilter: ["style", "class"]});
  // rotating in the editor would change the coordinates' frame; saving refuses it anyway
  const style = document.createElement("style");
  style.textContent = "#label-annotator button[aria-label^='Rotate'] { display: none !important; }";
  document.head.appendChild(style);
}
"""

#: the editor's copies of stored images, inside Gradio's upload folder
SERVE_DIR = "facelab-label"


def _user_error(exc: FaceLabError) -> gr.Error:
    return gr.Error(html.escape(str(exc)), print_exception=False)


def _serve_folder() -> Path:
    """Where the editor's copies of stored images go: inside Gradio's upload folder (Gradio
    serves only files it made or was told about), registered for privacy deletes."""
    from gradio.utils import get_upload_folder

    folder = Path(get_upload_folder()) / SERVE_DIR
    privacy.register_cache_dir(folder)
    return folder


def build_label_tab(lab: Lab, endpoint: Endpoints) -> None:
    """Create the Label tab's components inside the caller's ``gr.Tab("Label")``. Every
    callback is declared with ``endpoint`` (webapp/endpoints.py), which checks the role first."""
    tab = gr.context.Context.block  # the enclosing Tab, to load an image when it is opened
    current = gr.State(None)
    last_image = gr.BrowserState(None, storage_key="facelab-label-last-image")
    gr.HTML("", js_on_load=KEYS_JS, elem_id="label-keys", padding=False)

    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=480):
            info = gr.Markdown("No image open.", elem_id="label-info")
            gr.Markdown("In the photo: **C** draw · **D** move/resize · **Delete** remove the selected box · "
                        "mouse wheel zooms", elem_id="label-editor-keys")
            # no label on the component: it is drawn over the photo's top-left corner and hid faces there
            annotator = image_annotator(
                value=None, label="Faces", show_label=False,
                label_list=[review.UNNAMED_LABEL], image_type="pil", sources=[],
                show_clear_button=False, show_remove_button=True, show_download_button=False,
                use_default_label=False, boxes_alpha=0.1, box_min_size=6, handle_size=4,
                height=620, elem_id="label-annotator",
            )
            with gr.Row():
                save_btn = gr.Button("Save (S)", variant="primary", elem_id="label-save")
                next_btn = gr.Button("Save & next (N)", variant="primary", elem_id="label-next")
                skip_btn = gr.Button("Skip (K)", elem_id="label-skip")
                undo_btn = gr.Button("Undo last save (U)", elem_id="label-undo")
            message = gr.Markdown(elem_id="label-message")
        with gr.Column(scale=2, min_width=360):
            with gr.Row():
                counts = gr.Markdown(elem_id="label-counts")
                counts_btn = gr.Button("↻", size="sm", scale=0, min_width=40, elem_id="label-counts-refresh")
            with gr.Row():
                image_id = gr.Number(label="Image id (Enter opens it)", precision=0, minimum=0,
                                     elem_id="label-image-id", scale=2)
                open_btn = gr.Button("Open", size="sm", scale=1, elem_id="label-open")
            with gr.Row():
                prev_box_btn = gr.Button("[", size="sm", scale=0, min_width=40, elem_id="label-prev-box")
                picker = gr.Dropdown(label="Selected box", choices=[], value=None, interactive=True,
                                     elem_id="label-box", scale=4)
                next_box_btn = gr.Button("]", size="sm", scale=0, min_width=40, elem_id="label-next-box")
                remove_box_btn = gr.Button("Remove (X)", size="sm", scale=1, elem_id="label-remove-box")
            gr.Markdown("Suggestions for the selected box (nearest enrolled people; ✓ = above the match threshold):")
            suggest_btns = [
                gr.Button("", visible=False, size="sm", elem_id=f"label-suggest-{n}")
                for n in range(1, review.SUGGESTION_SLOTS + 1)
            ]
            with gr.Row():
                name = gr.Textbox(label="…or type a name for the selected box (Enter)", scale=4,
                                  placeholder="e.g. Eileen Collins", elem_id="label-name")
                name_btn = gr.Button("Name it", size="sm", scale=1, elem_id="label-name-button")
            table = gr.Dataframe(headers=review.BOX_TABLE_HEADERS, label="Boxes (click a row to select it)",
                                 interactive=False, wrap=True, elem_id="label-table",
                                 column_widths=["5%", "7%", "24%", "16%", "11%", "37%"])
            with gr.Accordion("Queue filters (Next / Skip)", open=False):
                status = gr.Dropdown(list(review.STATUS_CHOICES), value=review.DEFAULT_STATUS_CHOICE,
                                     label="Status", elem_id="label-filter-status")
                unknown = gr.Checkbox(label="Only images with unnamed faces", elem_id="label-filter-unknown")
                person = gr.Textbox(label="Only images with this person", elem_id="label-filter-person")
                max_score = gr.Slider(0.0, 1.0, value=0.0, step=0.05, elem_id="label-filter-score",
                                      label="Only images with a detector score below (0 = off)")
            with gr.Accordion("History of this image", open=False) as history_box:
                history_btn = gr.Button("Refresh history", size="sm", elem_id="label-history-refresh")
                history = gr.Dataframe(headers=review.HISTORY_HEADERS, interactive=False, elem_id="label-history")
            gr.Markdown(SHORTCUTS, elem_id="label-shortcuts")

    filters = [status, unknown, person, max_score]
    view_outputs = [annotator, current, image_id, info, counts, table, picker, *suggest_btns, message, last_image]

    def render(view: review.LabelView) -> tuple[Any, ...]:
        value = None
        if view.image_path is not None:
            shown_file = review.display_copy(view.image_path, view.display_scale, _serve_folder())
            value = {"image": str(shown_file), "boxes": view.boxes}
        annotated = image_annotator(value=value, label_list=view.label_list)
        buttons = [gr.update(value=text or " ", visible=bool(text)) for text in view.suggestion_labels]
        return (
            annotated, view.current, view.image_id, view.info, view.counts, view.rows,
            gr.update(choices=view.box_choices, value=view.selected), *buttons, view.message,
            view.image_id,
        )

    def allowed(request: gr.Request | None, api_name: str) -> str:
        """The role check every Label callback makes (pipeline.auth); the name to record."""
        return auth.require_endpoint(lab, getattr(request, "username", None), api_name)

    def shown(action: Any) -> tuple[Any, ...]:
        """Run one review action and render its view; user errors become a toast."""
        try:
            return render(action())
        except FaceLabError as exc:
            raise _user_error(exc) from exc

    def _filters(status_choice: str, only_unknown: bool, who: str | None, score: float | None) -> review.Filters:
        return review.Filters(status_choice, bool(only_unknown), who or "", float(score or 0.0))

    # Callbacks spell out their parameters: Gradio injects gr.Request only into positional ones.
    # -- loading ------------------------------------------------------------------------
    def on_open(wanted: float | None, st: str, unk: bool, who: str, score: float,
                request: gr.Request) -> tuple[Any, ...]:
        def run() -> review.LabelView:
            allowed(request, "label_load")
            return review.open_image(lab, wanted, _filters(st, unk, who, score))

        return shown(run)

    open_btn.click(endpoint("label_load")(on_open), [image_id, *filters], view_outputs, api_name="label_load")
    image_id.submit(endpoint("label_load_typed")(on_open), [image_id, *filters], view_outputs,
                    api_name="label_load_typed", api_visibility="private")

    def on_tab(cur: dict | None, remembered: int | None, st: str, unk: bool, who: str, score: float,
               request: gr.Request) -> tuple[Any, ...]:
        if cur is not None:  # keep the open image and any unsaved edits
            return tuple(gr.skip() for _ in view_outputs)
        chosen = _filters(st, unk, who, score)

        def first() -> review.LabelView:
            allowed(request, "label_load")
            try:
                return review.open_image(lab, remembered, chosen)
            except FaceLabError:  # the remembered image is gone: start at the queue
                return review.open_image(lab, None, chosen)

        return shown(first)

    if isinstance(tab, gr.Tab):
        tab.select(endpoint("label_tab_open")(on_tab), [current, last_image, *filters], view_outputs,
                   api_name="label_tab_open", api_visibility="private")

    # -- saving -------------------------------------------------------------------------
    def on_save(cur: dict | None, value: dict | None, request: gr.Request) -> tuple[Any, ...]:
        return shown(lambda: review.save(lab, cur, value, allowed(request, "label_save")))

    save_btn.click(endpoint("label_save")(on_save), [current, annotator], view_outputs, api_name="label_save")

    def on_next(cur: dict | None, value: dict | None, st: str, unk: bool, who: str, score: float,
                request: gr.Request) -> tuple[Any, ...]:
        return shown(lambda: review.save_and_next(lab, cur, value, _filters(st, unk, who, score), allowed(request, "label_next")))

    next_btn.click(endpoint("label_next")(on_next), [current, annotator, *filters], view_outputs, api_name="label_next")

    def on_skip(cur: dict | None, st: str, unk: bool, who: str, score: float, request: gr.Request) -> tuple[Any, ...]:
        return shown(lambda: review.skip(lab, cur, _filters(st, unk, who, score), allowed(request, "label_skip")))

    skip_btn.click(endpoint("label_skip")(on_skip), [current, *filters], view_outputs, api_name="label_skip")

    def on_undo(cur: dict | None, request: gr.Request) -> tuple[Any, ...]:
        return shown(lambda: review.undo(lab, cur, allowed(request, "label_undo")))

    undo_btn.click(endpoint("label_undo")(on_undo), [current], view_outputs, api_name="label_undo")

    def on_name(cur: dict | None, value: dict | None, face: int | None, typed: str,
                request: gr.Request) -> tuple[Any, ...]:
        return shown(lambda: review.name_box(lab, cur, value, face, typed, allowed(request, "label_name")))

    name_inputs = [current, annotator, picker, name]
    name_btn.click(endpoint("label_name")(on_name), name_inputs, view_outputs, api_name="label_name").success(
        endpoint("label_name_clear")(lambda: ""), None, name, api_name="label_name_clear", api_visibility="private",
        queue=False)
    name.submit(endpoint("label_name_typed")(on_name), name_inputs, view_outputs, api_name="label_name_typed",
                api_visibility="private").success(
        endpoint("label_name_typed_clear")(lambda: ""), None, name, api_name="label_name_typed_clear",
        api_visibility="private", queue=False)

    def accept(rank: int) -> Any:
        def on_accept(cur: dict | None, value: dict | None, face: int | None, request: gr.Request) -> tuple[Any, ...]:
            return shown(lambda: review.accept_suggestion(lab, cur, value, face, rank, allowed(request, f"label_accept_{rank}")))

        return on_accept

    for rank, button in enumerate(suggest_btns, start=1):
        button.click(endpoint(f"label_accept_{rank}")(accept(rank)), [current, annotator, picker], view_outputs,
                     api_name=f"label_accept_{rank}", api_visibility="private")

    # -- box selection (no database calls) -------------------------------------------------
    def editor_update(cur: dict, boxes: list[dict]) -> Any:
        shown_file = review.display_copy(Path(cur["image_file"]), cur["display_scale"], _serve_folder())
        return gr.update(value={"image": str(shown_file), "boxes": boxes})

    # The picker's .change (also fired by loads and by X) only refreshes the suggestions.
    # The photo is redrawn only by the actions that select a box ([ ], a table row, the
    # dropdown), from the editor's value as it is at that moment: redrawing on .change used
    # the value from before an X and brought the removed box back (and reset the draw mode).
    def on_pick(cur: dict | None, face: int | None) -> list[Any]:
        return [gr.update(value=t or " ", visible=bool(t)) for t in review.select_box(cur, face)]

    picker.change(endpoint("label_pick_box")(on_pick), [current, picker], suggest_btns, api_name="label_pick_box",
                  api_visibility="private", queue=False)

    def select(cur: dict | None, value: dict | None, face: int | None) -> tuple[Any, Any]:
        """Select ``face``: the picker shows it and the photo draws it in magenta."""
        if cur is None or face is None:
            return gr.skip(), gr.skip()
        boxes = review.editor_boxes(cur, value, face)
        same = boxes == [dict(b) for b in (value or {}).get("boxes") or []]
        return face, gr.skip() if same else editor_update(cur, boxes)

    def on_step(cur: dict | None, face: int | None, value: dict | None, step: int) -> tuple[Any, Any]:
        return select(cur, value, review.step_box(cur, face, step))

    for button, step, api_name in ((prev_box_btn, -1, "label_prev_box"), (next_box_btn, 1, "label_next_box")):
        button.click(endpoint(api_name)(partial(on_step, step=step)), [current, picker, annotator],
                     [picker, annotator], api_name=api_name, api_visibility="private", queue=False)
    picker.input(endpoint("label_select_box")(lambda cur, face, value: select(cur, value, face)),
                 [current, picker, annotator], [picker, annotator], api_name="label_select_box",
                 api_visibility="private", queue=False)

    def on_remove(cur: dict | None, value: dict | None, face: int | None) -> tuple[Any, Any]:
        try:
            boxes, chosen = review.remove_box(cur, value, face)
        except FaceLabError as exc:
            raise _user_error(exc) from exc
        return editor_update(cur, boxes), chosen

    remove_box_btn.click(endpoint("label_remove_box")(on_remove), [current, annotator, picker], [annotator, picker],
                         api_name="label_remove_box", api_visibility="private", queue=False)

    def on_row(cur: dict | None, value: dict | None, event: gr.SelectData) -> tuple[Any, Any]:
        row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
        order = (cur or {}).get("order") or []
        if not (isinstance(row, int) and 0 <= row < len(order)):
            return gr.skip(), gr.skip()
        return select(cur, value, order[row])

    table.select(endpoint("label_table_select")(on_row), [current, annotator], [picker, annotator],
                 api_name="label_table_select", api_visibility="private", queue=False)

    # -- side information -------------------------------------------------------------------
    def on_history(cur: dict | None, request: gr.Request) -> list[list[Any]]:
        try:
            allowed(request, "label_history")
            return review.history_rows(lab, cur)
        except FaceLabError as exc:
            raise _user_error(exc) from exc

    history_btn.click(endpoint("label_history")(on_history), [current], history, api_name="label_history")
    history_box.expand(endpoint("label_history_open")(on_history), [current], history, api_name="label_history_open",
                       api_visibility="private")

    def on_counts(request: gr.Request) -> str:
        try:
            allowed(request, "label_counts")
            return review.counts_text(lab)
        except FaceLabError as exc:
            raise _user_error(exc) from exc

    counts_btn.click(endpoint("label_counts")(on_counts), None, counts, api_name="label_counts")
