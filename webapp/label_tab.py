"""The Label tab: check and correct face boxes and names, image after image, from the keyboard.

Thin by design, like ``webapp.ui``: every callback calls one ``pipeline.labeling.review`` function
(which tests call without a browser) and maps the returned ``LabelView`` onto components.

Why it is built this way (see ../shared/notes/measurements.md on the annotator):
- the annotator's ``.change`` fires on load and on half-drawn boxes, so nothing saves
  on change: Save / Save & next / naming are explicit actions;
- the annotator hands back a re-encoded image, so the open image's id and versions live
  in ``gr.State`` (and the last image id in the browser, to resume after a reload);
- a box's face id rides in its label ("Eileen Collins #12"), the only free-text field
  the component keeps;
- Gradio buttons have no keyboard shortcuts, so a small page script clicks them by
  ``elem_id``; it ignores keys typed into text fields;
- every action lands on the photo it was meant for: each sends the photo id and version
  the page shows (the hidden ``label-target`` field) and ``pipeline.labeling.review`` refuses
  it when another photo or version is open; the page script lets one Label request run
  at a time and holds keys (and clicks) typed meanwhile, playing them in order once the
  answer is on screen, so a key typed right after N lands on the photo N opens;
- a refused action marks only the message line (``show_progress_on``): the photo and the
  side panel stay usable.
"""

from __future__ import annotations

import html
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr
from gradio_image_annotation import image_annotator

from pipeline import auth
from pipeline.context import Lab
from pipeline.errors import FaceLabError
from pipeline.labeling import review
from pipeline.library import privacy
from webapp.endpoints import Endpoints

SHORTCUTS = (
    "**Keys** (outside text fields): **S** save · **N** save & next · **K** skip (a started or reviewed "
    "photo keeps its status) · **U** undo · **1-5** accept a suggestion for the selected box · **[ ]** "
    "previous/next box (drawn in magenta) · **X** remove the selected box. "
    "In the image: **C** draw boxes, **D** move/resize, **Delete** remove the selected box; "
    "after drawing, type the person's name (or keep *face*) and press Enter. "
    "Keys typed while the app is still answering are held (bottom left) and played in order once "
    "the answer is on screen; each action names the photo and version it was meant for, and the "
    "app refuses one meant for another."
)

#: keyboard shortcuts, the one-request-at-a-time gate and pop-up focus; runs once per page
#: (gr.HTML's js_on_load). The gate: a click on any Label button that talks to the server
#: (from a key or the mouse) is let through only while no other Label request is in flight;
#: otherwise it is held, and held clicks are played in order once the answer is on screen
#: (the open photo's id shown in the info line), each then carrying the photo id and
#: version the page shows at that moment. A refused action drops the held keys.
KEYS_JS = r"""
if (!window.__facelabLabel) {
  const L = window.__facelabLabel = {busy: 0, refreshing: 0, waiting: false, stale: false, held: [], since: 0};
  const keyButtons = {s: "label-save", n: "label-next", k: "label-skip", u: "label-undo", x: "label-remove-box",
                      "[": "label-prev-box", "]": "label-next-box"};
  const gatedIds = [...Object.values(keyButtons), "label-open", "label-name-button", "label-refresh-panel",
                    ...[1, 2, 3, 4, 5].map(n => "label-suggest-" + n)];
  const gatedSelector = gatedIds.map(id => "#" + id).join(",");
  const shown = (el) => !!el && el.offsetParent !== null;
  const typing = (t) => !!t && (t.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(t.tagName));
  const keyName = (id) => (Object.entries(keyButtons).find(([, v]) => v === id) || [id.replace("label-suggest-", "")])[0]
    .toUpperCase().replace("LABEL-OPEN", "Open").replace("LABEL-NAME-BUTTON", "Name");

  // a small status line, bottom left: held keys and why a key was ignored
  let notice = "", noticeTimer = null;
  const show = () => {
    let el = document.getElementById("label-hold");
    if (!el) {
      el = document.createElement("div");
      el.id = "label-hold";
      el.setAttribute("role", "status");
      el.style.cssText = "position:fixed;left:12px;bottom:12px;z-index:1000;padding:4px 10px;border-radius:6px;" +
                         "background:#333;color:#fff;font:13px sans-serif;display:none";
      document.body.appendChild(el);
    }
    const parts = [];
    if (L.held.length) parts.push("Waiting for the photo: " + L.held.length + " key(s) held (" +
                                  L.held.map(h => h.key).join(" ") + ")");
    if (notice) parts.push(notice);
    el.textContent = parts.join(" · ");
    el.style.display = parts.length ? "block" : "none";
  };
  const tell = (text) => {
    notice = text;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => { notice = ""; show(); }, 8000);
    show();
  };

  const closed = () => L.busy > 0 || L.refreshing > 0 || L.waiting;
  const begin = () => { L.busy += 1; L.since = Date.now(); show(); };
  const press = (id, key) => {
    if (closed()) { L.held.push({id, key}); show(); return; }
    const button = document.getElementById(id);
    if (!shown(button) || button.disabled) { tell(key + " ignored: nothing to apply it to on this photo"); return; }
    button.click();  // through the click gate below
  };
  // the photo the server answered with is on screen: its id (in the hidden target field) is in the info line
  const onScreen = () => {
    const field = document.querySelector("#label-target textarea, #label-target input");
    const id = ((field && field.value) || "").split(":")[0];
    const info = (document.querySelector("#label-info") || {}).innerText || "";
    return id ? info.startsWith("Image " + id + " ") : !info.startsWith("Image ");
  };
  const settle = () => {
    show();
    if (closed()) return;
    if (L.stale) {  // an edit in the photo happened while a request was in flight: bring the panel up to date
      L.stale = false;
      const refresh = document.getElementById("label-refresh-panel");
      if (refresh) { refresh.click(); return; }  // its end settles again
    }
    if (!L.held.length) return;
    L.waiting = true;
    let frames = 0;
    const check = () => {
      if (L.busy || L.refreshing) { L.waiting = false; return; }  // another request began; its end settles again
      if (!onScreen() && frames++ < 600) { requestAnimationFrame(check); return; }
      L.waiting = false;
      const next = L.held.shift();
      show();
      if (next) press(next.id, next.key);
      if (!closed()) settle();  // the key was ignored: play the next one
    };
    requestAnimationFrame(check);
  };
  // called by the events themselves (webapp/label_tab.py attaches these as js hooks)
  L.start = () => begin();
  L.done = (failed) => {
    L.busy = Math.max(0, L.busy - 1);
    if (failed && L.held.length) {
      tell("The last action was refused: " + L.held.length + " held key(s) dropped");
      L.held = [];
    }
    settle();
  };
  L.refreshStart = (args, targetIndex) => {
    L.refreshing += 1;
    L.since = Date.now();
    if (L.busy > 0) {  // a request is in flight: this refresh could answer after it, with a stale panel
      args = [...args];
      args[targetIndex] = "";
      L.stale = true;  // refresh again once it has ended
    }
    return args;
  };
  L.refreshDone = () => { L.refreshing = Math.max(0, L.refreshing - 1); settle(); };
  setInterval(() => {  // never stay shut: an answer lost with the connection must not hold keys forever
    if ((L.busy || L.refreshing) && Date.now() - L.since > 60000) {
      L.busy = 0;
      L.refreshing = 0;
      if (L.held.length) tell("No answer from the app for a minute: " + L.held.length + " held key(s) dropped");
      L.held = [];
      show();
    }
  }, 5000);

  // clicks on the gated buttons, from our keys or the mouse: one request at a time
  document.addEventListener("click", (e) => {
    const button = e.target && e.target.closest ? e.target.closest(gatedSelector) : null;
    if (!button) return;
    if (closed()) {
      e.preventDefault();
      e.stopImmediatePropagation();
      L.held.push({id: button.id, key: keyName(button.id)});
      show();
      return;
    }
    begin();
  }, true);

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
    // Enter in the name field or the image-id field goes through the gate like a button
    const field = e.target && e.target.closest ? e.target.closest("#label-name, #label-image-id") : null;
    if (field && e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      e.stopPropagation();
      press(field.id === "label-name" ? "label-name-button" : "label-open", "Enter");
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
    const id = keyButtons[key] || (/^[1-5]$/.test(key) ? "label-suggest-" + key : null);
    if (!id) return;
    if (!shown(document.getElementById("label-annotator"))) return;  // another tab is open
    e.preventDefault();
    e.stopPropagation();
    press(id, key.toUpperCase());
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

#: js hooks of the Label events (see KEYS_JS): a request begins / ended well / was refused
START_JS = "(...args) => { if (window.__facelabLabel) window.__facelabLabel.start(); return args; }"
DONE_JS = "() => { if (window.__facelabLabel) window.__facelabLabel.done(false); }"
FAILED_JS = "() => { if (window.__facelabLabel) window.__facelabLabel.done(true); }"
REFRESH_DONE_JS = "() => { if (window.__facelabLabel) window.__facelabLabel.refreshDone(); }"


def _refresh_js(target_index: int) -> str:
    return (f"(...args) => window.__facelabLabel ? window.__facelabLabel.refreshStart(args, {target_index}) "
            ": args")


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
            # the photo and version every action is aimed at ("image id:version"); in the page, not shown
            target = gr.Textbox("", visible="hidden", elem_id="label-target", label="Aimed at (image id:version)")
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
                # allow_custom_value: the server checks the box against the open photo itself; a
                # choices check would fail with Gradio's own error for a value from a photo just left
                picker = gr.Dropdown(label="Selected box", choices=[], value=None, interactive=True,
                                     allow_custom_value=True, elem_id="label-box", scale=4)
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
            # clicked by KEYS_JS when an edit in the photo happened while a request was in flight
            refresh_btn = gr.Button("Refresh the side panel", visible="hidden", elem_id="label-refresh-panel")

    filters = [status, unknown, person, max_score]
    view_outputs = [annotator, current, target, image_id, info, counts, table, picker, *suggest_btns, message,
                    last_image]
    panel_outputs = [info, table, picker, *suggest_btns]
    # pending and error marks go on the message line only: a refused action must leave the
    # photo and the side panel as they are (Gradio marks every output of a failed event)
    quiet = {"show_progress_on": [message]}

    def render(view: review.LabelView) -> tuple[Any, ...]:
        value = None
        if view.image_path is not None:
            shown_file = review.display_copy(view.image_path, view.display_scale, _serve_folder())
            value = {"image": str(shown_file), "boxes": view.boxes}
        annotated = image_annotator(value=value, label_list=view.label_list)
        buttons = [gr.update(value=text or " ", visible=bool(text)) for text in view.suggestion_labels]
        return (
            annotated, view.current, view.target, view.image_id, view.info, view.counts, view.rows,
            gr.update(choices=view.box_choices, value=view.selected), *buttons, view.message,
            view.image_id,
        )

    def render_panel(panel: review.Panel) -> tuple[Any, ...]:
        buttons = [gr.update(value=text or " ", visible=bool(text)) for text in panel.suggestion_labels]
        return (panel.info, panel.rows, gr.update(choices=panel.box_choices, value=panel.selected), *buttons)

    def allowed(request: gr.Request | None, api_name: str) -> str:
        """The role check every Label callback makes (pipeline.auth); the name to record."""
        return auth.require_endpoint(lab, getattr(request, "username", None), api_name)

    def shown(action: Any) -> tuple[Any, ...]:
        """Run one review action and render its view; user errors become a toast (the
        editor keeps what it shows: see ``quiet``)."""
        try:
            return render(action())
        except FaceLabError as exc:
            raise _user_error(exc) from exc

    def gated(dependency: Any) -> None:
        """Tell the page's key gate (KEYS_JS) when this request has ended, well or not."""
        dependency.success(None, None, None, js=DONE_JS, queue=False)
        dependency.failure(None, None, None, js=FAILED_JS, queue=False)

    def _filters(status_choice: str, only_unknown: bool, who: str | None, score: float | None) -> review.Filters:
        return review.Filters(status_choice, bool(only_unknown), who or "", float(score or 0.0))

    # Callbacks spell out their parameters: Gradio injects gr.Request only into positional ones.
    # Every action takes ``target`` (the photo and version the page showed, see pipeline.labeling.review).
    # -- loading ------------------------------------------------------------------------
    def on_open(wanted: float | None, st: str, unk: bool, who: str, score: float,
                request: gr.Request) -> tuple[Any, ...]:
        def run() -> review.LabelView:
            allowed(request, "label_load")
            return review.open_image(lab, wanted, _filters(st, unk, who, score))

        return shown(run)

    # Enter in the image-id field clicks Open (KEYS_JS), so both pass the key gate
    gated(open_btn.click(endpoint("label_load")(on_open), [image_id, *filters], view_outputs, api_name="label_load", **quiet))

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
        gated(tab.select(endpoint("label_tab_open")(on_tab), [current, last_image, *filters], view_outputs,
                         api_name="label_tab_open", api_visibility="private",
                         js=START_JS, **quiet))

    # -- saving -------------------------------------------------------------------------
    def on_save(cur: dict | None, aimed: str, value: dict | None, request: gr.Request) -> tuple[Any, ...]:
        return shown(lambda: review.save(lab, cur, aimed, value, allowed(request, "label_save")))

    gated(save_btn.click(endpoint("label_save")(on_save), [current, target, annotator], view_outputs, api_name="label_save", **quiet))

    def on_next(cur: dict | None, aimed: str, value: dict | None, st: str, unk: bool, who: str, score: float,
                request: gr.Request) -> tuple[Any, ...]:
        return shown(lambda: review.save_and_next(lab, cur, aimed, value, _filters(st, unk, who, score),
                                                  allowed(request, "label_next")))

    gated(next_btn.click(endpoint("label_next")(on_next), [current, target, annotator, *filters], view_outputs, api_name="label_next",
                         **quiet))

    def on_skip(cur: dict | None, aimed: str, st: str, unk: bool, who: str, score: float,
                request: gr.Request) -> tuple[Any, ...]:
        return shown(lambda: review.skip(lab, cur, aimed, _filters(st, unk, who, score),
                                         allowed(request, "label_skip")))

    gated(skip_btn.click(endpoint("label_skip")(on_skip), [current, target, *filters], view_outputs, api_name="label_skip", **quiet))

    def on_undo(cur: dict | None, aimed: str, request: gr.Request) -> tuple[Any, ...]:
        return shown(lambda: review.undo(lab, cur, aimed, allowed(request, "label_undo")))

    gated(undo_btn.click(endpoint("label_undo")(on_undo), [current, target], view_outputs, api_name="label_undo", **quiet))

    def on_name(cur: dict | None, aimed: str, value: dict | None, face: int | None, typed: str,
                request: gr.Request) -> tuple[Any, ...]:
        return shown(lambda: review.name_box(lab, cur, aimed, value, face, typed, allowed(request, "label_name")))

    # Enter in the name field clicks "Name it" (KEYS_JS), so both pass the key gate
    naming = name_btn.click(endpoint("label_name")(on_name), [current, target, annotator, picker, name], view_outputs,
                            api_name="label_name", **quiet)
    gated(naming)
    naming.success(None, None, name, js="() => ''", queue=False)

    def accept(rank: int) -> Any:
        def on_accept(cur: dict | None, aimed: str, value: dict | None, face: int | None,
                      request: gr.Request) -> tuple[Any, ...]:
            return shown(lambda: review.accept_suggestion(lab, cur, aimed, value, face, rank,
                                                          allowed(request, f"label_accept_{rank}")))

        return on_accept

    for rank, button in enumerate(suggest_btns, start=1):
        gated(button.click(endpoint(f"label_accept_{rank}")(accept(rank)), [current, target, annotator, picker],
                           view_outputs, api_name=f"label_accept_{rank}", api_visibility="private", **quiet))

    # -- box selection and removal (no database calls) -------------------------------------
    def editor_update(cur: dict, boxes: list[dict] | None) -> Any:
        if boxes is None:
            return gr.skip()
        shown_file = review.display_copy(Path(cur["image_file"]), cur["display_scale"], _serve_folder())
        return gr.update(value={"image": str(shown_file), "boxes": boxes})

    def edited(cur: dict | None, change: review.EditorUpdate | None) -> tuple[Any, ...]:
        if change is None:
            return tuple(gr.skip() for _ in [annotator, *panel_outputs])
        return (editor_update(cur, change.boxes), *render_panel(change.panel))

    edit_outputs = [annotator, *panel_outputs]

    def on_step(cur: dict | None, aimed: str, face: int | None, value: dict | None, step: int) -> tuple[Any, ...]:
        try:
            return edited(cur, review.step(cur, aimed, value, face, step))
        except FaceLabError as exc:
            raise _user_error(exc) from exc

    for button, step, api_name in ((prev_box_btn, -1, "label_prev_box"), (next_box_btn, 1, "label_next_box")):
        gated(button.click(endpoint(api_name)(partial(on_step, step=step)), [current, target, picker, annotator],
                           edit_outputs, api_name=api_name, api_visibility="private", queue=False, **quiet))

    def on_pick(cur: dict | None, aimed: str, face: int | None, value: dict | None) -> tuple[Any, ...]:
        try:
            return edited(cur, review.select_box(cur, aimed, value, face))
        except FaceLabError as exc:
            raise _user_error(exc) from exc

    gated(picker.input(endpoint("label_select_box")(on_pick), [current, target, picker, annotator], edit_outputs,
                       api_name="label_select_box", api_visibility="private",
                       queue=False, js=START_JS, **quiet))

    def on_remove(cur: dict | None, aimed: str, value: dict | None, face: int | None) -> tuple[Any, ...]:
        try:
            return edited(cur, review.remove_box(cur, aimed, value, face))
        except FaceLabError as exc:
            raise _user_error(exc) from exc

    gated(remove_box_btn.click(endpoint("label_remove_box")(on_remove), [current, target, annotator, picker],
                               edit_outputs, api_name="label_remove_box", api_visibility="private", queue=False, **quiet))

    def on_row(cur: dict | None, aimed: str, value: dict | None, event: gr.SelectData) -> tuple[Any, ...]:
        row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
        try:
            return edited(cur, review.select_row(cur, aimed, value, row))
        except FaceLabError as exc:
            raise _user_error(exc) from exc

    gated(table.select(endpoint("label_table_select")(on_row), [current, target, annotator], edit_outputs,
                       api_name="label_table_select", api_visibility="private",
                       queue=False, js=START_JS, **quiet))

    # An edit in the photo itself (a box drawn, moved, deleted, or renamed in the pop-up)
    # updates the side panel at once. The editor's .change also fires when a load sets its
    # value; a refresh that started while an action was in flight is sent without a target
    # (KEYS_JS) and leaves the panel to that action's answer.
    def on_edit(cur: dict | None, aimed: str, value: dict | None, face: int | None) -> tuple[Any, ...]:
        panel = review.refresh(cur, aimed, value, face)
        if panel is None:
            return tuple(gr.skip() for _ in panel_outputs)
        return render_panel(panel)

    refreshing = annotator.change(endpoint("label_edit_refresh")(on_edit), [current, target, annotator, picker],
                                  panel_outputs, api_name="label_edit_refresh", api_visibility="private", queue=False, show_progress="hidden",
                                  js=_refresh_js(1))
    refreshing.success(None, None, None, js=REFRESH_DONE_JS, queue=False)
    refreshing.failure(None, None, None, js=REFRESH_DONE_JS, queue=False)
    gated(refresh_btn.click(endpoint("label_refresh_panel")(on_edit), [current, target, annotator, picker], panel_outputs,
                            api_name="label_refresh_panel", api_visibility="private",
                            queue=False, show_progress="hidden"))

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
