"""What the Label tab shows, computed without a browser: one function per UI action.

Each function runs one labeling operation (``pipeline.labeling.edits``) and turns the result
into plain values the box-annotation component and the side panel take as they are.

Boxes travel through the annotator as ``{"label", "color", "xmin", ...}`` dicts; the
component keeps no other keys, so a stored face's id rides in its label: "Eileen
Collins #12" or, unnamed, "#12". A box whose label lost its "#id" (the person re-typed the
label) is matched back to the stored face it overlaps most (IoU >= 0.5) that no other
box claimed; anything else is a new box. The label's text before "#id" is the name;
"face" (or nothing) means unnamed.

Small photos are shown enlarged: the annotator never scales an image up, so a 400-pixel
photo with 20-pixel faces would be edited at 20 pixels. ``display_scale`` (kept in
``current``) enlarges the served copy to about the editor's size; boxes going to the
annotator are multiplied by it and boxes coming back divided by it, so the database,
exports and the side panel stay in the photo's own pixels.

Every action names the photo it was aimed at. ``LabelView.target`` ("image id:version",
e.g. "82:3") is shown in the page next to the photo, and every action sends it back;
``aimed_at`` refuses an action whose target is not the photo and version open in this
session (``StaleAction``), e.g. a key pressed for the previous photo while the next one
was loading, or for a version an earlier action has just replaced. Nothing is changed then.

The side panel (box count, table, picker, suggestions) is computed from the editor's
value, unsaved edits included (``panel``): a box removed with X or Delete leaves it at
once, a drawn box joins it at once (as "new"), a moved box is marked moved.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image as PILImage
from sqlalchemy import func, select

from common.atomic import write_atomically
from common.boxes import iou
from pipeline.context import Lab
from pipeline.errors import Conflict, InvalidRequest
from pipeline.labeling import edits as labeling
from pipeline.labeling.edits import BoxEdit, LabelState, QueueFilter
from pipeline.text import md
from storage.orm import HUMAN_ORIGIN, Face, Identity, ImageStatus

#: the label of an unnamed box, and the first (default) choice in the annotator's pop-up
UNNAMED_LABEL = "face"
_UNNAMED_WORDS = {"", "face", "new face", "unnamed", "unknown", "?"}
_LABEL_RE = re.compile(r"^(?P<name>.*?)\s*#(?P<id>\d+)\s*$", re.S)
#: how many known names the annotator's label pop-up offers (most-used first)
LABEL_CHOICES = 300
SUGGESTION_SLOTS = labeling.SUGGESTIONS
#: rgb(...) strings: the only colour format the annotator accepts back
NAMED_COLOUR = "rgb(46, 160, 67)"
DETECTED_COLOUR = "rgb(255, 190, 0)"
#: the box selected in the side panel ([ ], a table row, the picker), so it can be found in the photo
SELECTED_COLOUR = "rgb(255, 0, 255)"
HUMAN_COLOUR = "rgb(51, 136, 255)"
MATCH_IOU = 0.5
#: the editor's drawing area (webapp.label_tab: 620 px high, about 720 px wide on a laptop)
DISPLAY_BOX = (720, 620)
#: enlarge only when it helps a lot (and at most 4x: beyond that pixels are just blocks)
MIN_DISPLAY_SCALE, MAX_DISPLAY_SCALE = 1.5, 4.0

#: queue filter choices shown in the UI -> statuses
STATUS_CHOICES: dict[str, frozenset[ImageStatus] | None] = {
    "to do (not started + in progress)": frozenset({ImageStatus.UNREVIEWED, ImageStatus.IN_PROGRESS}),
    "not started": frozenset({ImageStatus.UNREVIEWED}),
    "in progress": frozenset({ImageStatus.IN_PROGRESS}),
    "reviewed": frozenset({ImageStatus.REVIEWED}),
    "skipped": frozenset({ImageStatus.SKIPPED}),
    "any": None,
}
DEFAULT_STATUS_CHOICE = next(iter(STATUS_CHOICES))
BOX_TABLE_HEADERS = ["#", "id", "name", "origin", "score", "suggestions"]
HISTORY_HEADERS = ["revision", "when", "who", "action", "changes", "undone"]


@dataclass(frozen=True)
class LabelView:
    #: what the UI keeps between calls (image id, versions, suggestions); None: no image
    current: dict[str, Any] | None
    #: the stored image file (the UI serves a copy of it)
    image_path: Path | None
    boxes: list[dict[str, Any]]
    rows: list[list[Any]]
    #: (label, face id) for the box picker
    box_choices: list[tuple[str, int]]
    selected: int | None
    #: one per suggestion slot; "" when there is none
    suggestion_labels: list[str]
    label_list: list[str]
    info: str
    counts: str
    message: str = ""
    can_undo: bool = False
    #: the served copy is the photo enlarged by this factor (boxes above are in its pixels)
    display_scale: float = 1.0

    @property
    def image_id(self) -> int | None:
        return self.current["image_id"] if self.current else None

    @property
    def target(self) -> str:
        """What every action on this view sends back: the photo and version it is aimed at."""
        return target_of(self.current)


@dataclass(frozen=True)
class Panel:
    """The side panel for the editor's boxes as they are now (unsaved edits included)."""

    info: str
    rows: list[list[Any]]
    #: (label, face id) for the box picker: the stored faces still in the editor
    box_choices: list[tuple[str, int]]
    selected: int | None
    suggestion_labels: list[str]
    #: the face id shown in each table row (None: a box drawn since the last save)
    row_faces: list[int | None]


@dataclass(frozen=True)
class EditorUpdate:
    """A selection or removal: the editor's new boxes (None: leave the editor as it is) and the panel."""

    boxes: list[dict[str, Any]] | None
    panel: Panel


class StaleAction(Conflict):
    """A Label-tab action aimed at another photo, or another version of it, than the one open."""


@dataclass(frozen=True)
class Filters:
    status: str = DEFAULT_STATUS_CHOICE
    unknown_faces: bool = False
    person: str = ""
    max_score: float = 0.0

    def to_queue_filter(self) -> QueueFilter:
        if self.status not in STATUS_CHOICES:
            raise InvalidRequest(f"Unknown status filter {self.status!r}; pick one of {', '.join(STATUS_CHOICES)}.")
        score = float(self.max_score or 0.0)
        return QueueFilter(
            statuses=STATUS_CHOICES[self.status], unknown_faces=bool(self.unknown_faces),
            person=(self.person or "").strip() or None, max_score=score if score > 0 else None,
        )


# -- actions --------------------------------------------------------------------------------
def open_image(lab: Lab, image_id: int | float | None, filters: Filters = Filters(), message: str = "") -> LabelView:
    """Open one image by id, or the first in the queue when no id is given."""
    if image_id is None or (isinstance(image_id, float) and not image_id == image_id) or image_id == 0:
        return next_in_queue(lab, None, filters)
    if isinstance(image_id, float):
        if not image_id.is_integer():
            raise InvalidRequest(f"Image ids are whole numbers, got {image_id}.")
        image_id = int(image_id)
    return _view(lab, labeling.load_for_labeling(lab, image_id, with_pixels=False), message)


def next_in_queue(lab: Lab, after_id: int | None, filters: Filters, message: str = "") -> LabelView:
    found = labeling.next_image(lab, after_id, filters.to_queue_filter())
    if found is None:
        text = "Nothing left to label with these filters."
        return empty_view(lab, f"{message} {text}".strip())
    if message:
        message = f"{message} Now image {found}."
    return _view(lab, labeling.load_for_labeling(lab, found, with_pixels=False), message)


def target_of(current: dict | None) -> str:
    """``"image id:version"`` of the open photo ("" when none is open)."""
    return f"{current['image_id']}:{current['version']}" if current else ""


def aimed_at(current: dict | None, target: str | None) -> dict:
    """``current``, if ``target`` (what the page showed when the action was taken) names
    the photo and version open in this session; else ``StaleAction``, and nothing changes."""
    wanted = _parse_target(target)
    if current is None:
        if wanted is None:
            raise InvalidRequest("Open an image first (Next, or type an image id).")
        raise StaleAction(f"Ignored: that action was meant for image {wanted[0]}, but this session has no image "
                          "open (was the app restarted?). Nothing was changed; reload the page.")
    if wanted is None:
        raise StaleAction("Ignored: that action did not say which photo it was meant for. Nothing was changed; "
                          "reload the page.")
    image_id, version = current["image_id"], current["version"]
    if wanted[0] != image_id:
        raise StaleAction(f"Ignored: that action was meant for image {wanted[0]}, but image {image_id} is open now. "
                          "Nothing was changed.")
    if wanted[1] != version:
        raise StaleAction(f"Ignored: that action was meant for version {wanted[1]} of image {image_id}, which an "
                          f"earlier action has just changed (version {version} now). Nothing was changed; look at "
                          "the photo and try again.")
    return current


def _parse_target(target: str | None) -> tuple[int, int] | None:
    text = str(target or "").strip()
    if not text:
        return None
    match = re.fullmatch(r"(\d{1,12}):(\d{1,12})", text)
    if match is None:
        raise InvalidRequest(f"target must be 'image id:version' as the page shows it, got {text[:40]!r}")
    return int(match[1]), int(match[2])


def save(lab: Lab, current: dict | None, target: str | None, value: dict | None, user: str = "local",
         finished: bool = True) -> LabelView:
    """Save the annotator's boxes (Save button / S): the image becomes reviewed."""
    cur = aimed_at(current, target)
    state = _save_boxes(lab, cur, value, user, finished, override=None)
    if state.revision == cur.get("revision") and state.version == cur["version"]:
        return _view(lab, state, "Nothing changed since the last save.")
    return _view(lab, state, f"Saved image {cur['image_id']} (revision {state.revision}).")


def name_box(lab: Lab, current: dict | None, target: str | None, value: dict | None, face_id: int | None,
             name: str | None, user: str = "local") -> LabelView:
    """Give the selected box a (new or existing) person's name; also saves other pending
    edits. The image does not become reviewed (a reviewed one stays reviewed)."""
    cur = aimed_at(current, target)
    face_id = _selected(cur, face_id)
    if not name or not str(name).strip():
        raise InvalidRequest("Type a name for the selected box.")
    state = _save_boxes(lab, cur, value, user, finished=False, override=(face_id, str(name)))
    return _view(lab, state, f"Face #{face_id} is now {_name_for(state, face_id)}.", after=face_id)


def accept_suggestion(lab: Lab, current: dict | None, target: str | None, value: dict | None,
                      face_id: int | None, rank: int, user: str = "local") -> LabelView:
    """Name the selected box after its ``rank``-th suggestion (1-based; keys 1-5), as the
    panel lists them for the editor's boxes (a named box's own name first)."""
    cur = aimed_at(current, target)
    face_id = _selected(cur, face_id)
    editor = {e.face_id: e for e in parse_boxes(value, cur) if e.face_id is not None}
    if face_id not in editor:
        raise InvalidRequest(f"Box #{face_id} was removed in the editor; reload or pick another box.")
    suggestions = ordered_suggestions(cur["faces"][face_id]["suggestions"], editor[face_id].name)
    if not 1 <= int(rank) <= len(suggestions):
        raise InvalidRequest(f"Face #{face_id} has {len(suggestions)} suggestion(s); there is no number {rank}.")
    name = suggestions[int(rank) - 1][0]
    state = _save_boxes(lab, cur, value, user, finished=False, override=(face_id, name))
    return _view(lab, state, f"Face #{face_id} is now {_name_for(state, face_id)}.", after=face_id)


def save_and_next(lab: Lab, current: dict | None, target: str | None, value: dict | None, filters: Filters,
                  user: str = "local") -> LabelView:
    """Save the open image as reviewed (if one is open) and open the next one in the queue."""
    after = None
    message = ""
    if current is not None or _parse_target(target) is not None:
        cur = aimed_at(current, target)
        state = _save_boxes(lab, cur, value, user, finished=True, override=None)
        after, message = state.image_id, f"Saved image {state.image_id}."
    return next_in_queue(lab, after, filters, message)


def skip(lab: Lab, current: dict | None, target: str | None, filters: Filters, user: str = "local") -> LabelView:
    """Skip the open image (unsaved box edits are dropped) and open the next one. Only a
    not-started image becomes "skipped": skipping never lowers a review state."""
    cur = aimed_at(current, target)
    image_id = cur["image_id"]
    version, status = labeling.skip_image(lab, image_id, user, expected_version=cur["version"])
    if version != cur["version"]:
        text = f"Skipped image {image_id}."
    else:
        text = f"Image {image_id} stays {str(status).replace('_', ' ')} (skipping never lowers it)."
    return next_in_queue(lab, image_id, filters, text)


def undo(lab: Lab, current: dict | None, target: str | None, user: str = "local") -> LabelView:
    cur = aimed_at(current, target)
    state = labeling.undo_last_save(lab, cur["image_id"], user, expected_version=cur["version"])
    return _view(lab, state, f"Undid the last save on image {cur['image_id']}.")


def history_rows(lab: Lab, current: dict | None) -> list[list[Any]]:
    if current is None:
        return []
    return [[r.revision, r.at, r.user, r.action, r.summary, "yes" if r.undone else ""]
            for r in labeling.history(lab, current["image_id"])]


def counts_text(lab: Lab) -> str:
    return labeling.queue_counts(lab).text()


def step_box(current: dict | None, face_id: int | None, step: int, value: dict | None = None) -> int | None:
    """The box before/after ``face_id`` among the stored boxes still in the editor (wraps around)."""
    if not current:
        return None
    order = _present(current, value) if value is not None else current["order"]
    if not order:
        return None
    if face_id is None or int(face_id) not in order:
        return order[0]
    return order[(order.index(int(face_id)) + step) % len(order)]


def editor_boxes(current: dict | None, value: dict | None, face_id: int | None) -> list[dict[str, Any]]:
    """The editor's boxes (with any unsaved edits) with ``face_id``'s box drawn in
    SELECTED_COLOUR and every other stored face in its own colour (no database call)."""
    if not value or not isinstance(value.get("boxes"), list):
        return []
    faces = (current or {}).get("faces") or {}
    out = []
    for box in value["boxes"]:
        box = dict(box)
        fid = _label_face_id(box)
        if fid is not None and fid in faces:
            box["color"] = SELECTED_COLOUR if fid == face_id else faces[fid]["color"]
        out.append(box)
    return out


def select_box(current: dict | None, target: str | None, value: dict | None, face_id: object) -> EditorUpdate:
    """Select ``face_id`` ([ ], a table row, the picker): the picker shows it, the photo
    draws it in magenta (the editor is redrawn only when a colour changes)."""
    cur = aimed_at(current, target)
    face_id = face_arg(face_id)
    boxes = editor_boxes(cur, value, face_id)
    same = boxes == [dict(b) for b in (value or {}).get("boxes") or []]
    return EditorUpdate(None if same else boxes, panel(cur, {**(value or {}), "boxes": boxes}, face_id))


def step(current: dict | None, target: str | None, value: dict | None, face_id: int | None,
         direction: int) -> EditorUpdate:
    """[ and ]: select the stored box before/after the selected one."""
    cur = aimed_at(current, target)
    return select_box(cur, target, value, step_box(cur, face_arg(face_id), direction, value))


def select_row(current: dict | None, target: str | None, value: dict | None, row: int) -> EditorUpdate | None:
    """A click on table row ``row`` (0-based, as the panel lists the editor's boxes); None
    for a box drawn since the last save (it has no face id to select yet)."""
    cur = aimed_at(current, target)
    faces = panel(cur, value, None).row_faces
    if not (isinstance(row, int) and 0 <= row < len(faces)) or faces[row] is None:
        return None
    return select_box(cur, target, value, faces[row])


def remove_box(current: dict | None, target: str | None, value: dict | None, face_id: int | None) -> EditorUpdate:
    """X: the editor's boxes without ``face_id``'s box, the box after it selected, and the
    panel without it. Nothing is saved: Save / Save & next store it, like a box deleted in the photo."""
    cur = aimed_at(current, target)
    face_id = face_arg(face_id)
    if face_id is None:
        raise InvalidRequest("Select a box first: [ ] or a row of the table.")
    boxes = [dict(b) for b in (value or {}).get("boxes") or []]
    kept = [b for b in boxes if _label_face_id(b) != int(face_id)]
    if len(kept) == len(boxes):
        raise InvalidRequest(f"Box #{int(face_id)} is not in the editor any more.")
    still_there = {_label_face_id(b) for b in kept}
    order = cur["order"]
    position = order.index(int(face_id)) if int(face_id) in order else -1
    following = [fid for fid in order[position + 1:] + order[:position + 1] if fid in still_there]
    chosen = following[0] if following else None
    new_boxes = editor_boxes(cur, {"boxes": kept}, chosen)
    return EditorUpdate(new_boxes, panel(cur, {**(value or {}), "boxes": new_boxes}, chosen))


def refresh(current: dict | None, target: str | None, value: dict | None, face_id: int | None) -> Panel | None:
    """The panel after an edit in the photo (a box drawn, moved, deleted or renamed there);
    None when the editor's value belongs to another photo or version than the one open
    (a late event from before a load: the panel then stays as the load left it)."""
    try:
        cur = aimed_at(current, target)
    except (StaleAction, InvalidRequest):
        return None
    try:
        face_id = face_arg(face_id)
    except InvalidRequest:
        face_id = None
    return panel(cur, value, face_id)


def panel(current: dict | None, value: dict | None, selected: int | None) -> Panel:
    """The side panel for the editor's boxes as they are now (no database call)."""
    if not current:
        return Panel("No image open.", [], [], None, [""] * SUGGESTION_SLOTS, [])
    faces = current["faces"]
    problem = ""
    try:
        edits = parse_boxes(value, current)
    except InvalidRequest as exc:  # shown, not raised: the panel must not break the editor
        edits = [BoxEdit(fid, *faces[fid]["box"], name=faces[fid]["name"]) for fid in current["order"]]
        problem = f" · ⚠ {md(str(exc))}"
    by_id = {e.face_id: e for e in edits if e.face_id is not None}
    new = [e for e in edits if e.face_id is None][::-1]  # the editor lists the newest box first
    present = [fid for fid in current["order"] if fid in by_id]
    removed = len(current["order"]) - len(present)
    moved = sum(1 for fid in present if _moved(faces[fid]["box"], by_id[fid].box))
    renamed = sum(1 for fid in present if by_id[fid].name != faces[fid]["name"])

    rows: list[list[Any]] = []
    for n, fid in enumerate(present, start=1):
        face, edit = faces[fid], by_id[fid]
        name = edit.name or ""
        if edit.name != face["name"]:
            name = f"{name or '(unnamed)'} (unsaved)"
        origin = face["origin"]
        if _moved(face["box"], edit.box):
            origin = "human (moved, unsaved)"
        suggestions = ordered_suggestions(face["suggestions"], edit.name)
        rows.append([n, fid, name, origin, face["score"],
                     " · ".join(_suggestion_text(i, s, edit.name) for i, s in enumerate(suggestions, start=1))])
    for n, edit in enumerate(new, start=len(present) + 1):
        rows.append([n, "new", edit.name or "", "drawn (unsaved)", "", "save to get suggestions"])

    chosen = selected if selected in by_id else next(
        (fid for fid in present if by_id[fid].name is None), present[0] if present else None)
    labels = [""] * SUGGESTION_SLOTS
    if chosen is not None:
        suggestions = ordered_suggestions(faces[chosen]["suggestions"], by_id[chosen].name)
        labels = _suggestion_labels(suggestions, by_id[chosen].name)
    unsaved = [f"{k} {word}" for k, word in ((len(new), "new"), (removed, "removed"), (moved, "moved"),
                                               (renamed, "renamed")) if k]
    info = f"{current['info_head']}{len(present) + len(new)} box(es)"
    if unsaved:
        info += f" (**unsaved: {', '.join(unsaved)}**; S saves)"
    info += current["info_tail"] + problem
    choices = [(f"{n}. {box_label(fid, by_id[fid].name)}", fid) for n, fid in enumerate(present, start=1)]
    return Panel(info, rows, choices, chosen, labels, [*present, *[None] * len(new)])


def ordered_suggestions(suggestions: Sequence[Sequence[Any]], name: str | None) -> list[list[Any]]:
    """A box's suggestions as the panel lists them: a named box's own name first (with its
    similarity when that person is among the nearest), then the others."""
    ranked = [list(s) for s in suggestions]
    if not name:
        return ranked[:SUGGESTION_SLOTS]
    own = next((s for s in ranked if s[0].lower() == name.lower()), [name, None, False])
    rest = [s for s in ranked if s[0].lower() != name.lower()]
    return [own, *rest][:SUGGESTION_SLOTS]


def _present(current: dict, value: dict | None) -> list[int]:
    """The stored faces still in the editor, in the panel's order."""
    try:
        in_editor = {e.face_id for e in parse_boxes(value, current)}
    except InvalidRequest:
        in_editor = {_label_face_id(b) for b in (value or {}).get("boxes") or [] if isinstance(b, dict)}
    return [fid for fid in current["order"] if fid in in_editor]


def _label_face_id(box: dict) -> int | None:
    match = _LABEL_RE.match(str(box.get("label") or ""))
    return int(match["id"]) if match else None


def empty_view(lab: Lab, message: str = "") -> LabelView:
    return LabelView(current=None, image_path=None, boxes=[], rows=[], box_choices=[], selected=None,
                     suggestion_labels=[""] * SUGGESTION_SLOTS, label_list=_label_choices(lab),
                     info="No image open.", counts=counts_text(lab), message=message)


# -- annotator boxes <-> box edits ---------------------------------------------------------------
def box_label(face_id: int, name: str | None) -> str:
    # an unnamed box shows just "#12": the annotator draws every label as a 20-px tag over
    # the photo, and in crowds "face #12" tags hid the neighbouring faces
    return f"{name} #{face_id}" if name else f"#{face_id}"


def display_scale(width: int, height: int) -> float:
    """How much to enlarge a ``width`` x ``height`` photo for the editor (1.0: not at all)."""
    fit = min(DISPLAY_BOX[0] / max(width, 1), DISPLAY_BOX[1] / max(height, 1))
    if fit < MIN_DISPLAY_SCALE:
        return 1.0
    return round(min(fit, MAX_DISPLAY_SCALE), 2)


def display_copy(image_path: Path, scale: float, folder: Path) -> Path:
    """The file the editor shows: ``image_path`` itself copied into ``folder`` or, for
    ``scale`` > 1, enlarged (made once per image and scale; written atomically because
    several labelers may open the same image at once). Named after the stored file,
    whose name starts with the content's sha256, so privacy deletes find it."""
    stem, suffix = image_path.stem, image_path.suffix
    target = folder / (image_path.name if scale == 1.0 else f"{stem}-x{scale:g}{suffix}")
    if target.exists():
        return target

    def write(tmp: Path) -> None:
        if scale == 1.0:
            shutil.copyfile(image_path, tmp)
            return
        with PILImage.open(image_path) as img:
            size = (round(img.width * scale), round(img.height * scale))
            enlarged = img.convert("RGB").resize(size, PILImage.Resampling.LANCZOS)
        enlarged.save(tmp, format="PNG" if suffix.lower() == ".png" else "JPEG", quality=95)

    return write_atomically(target, write)


def parse_boxes(value: dict | None, current: dict) -> list[BoxEdit]:
    """The annotator's boxes as BoxEdits for ``labeling.save_labels`` (see the module docstring),
    in the photo's pixels."""
    if not value or not isinstance(value, dict):
        raise InvalidRequest("Open an image first.")
    if int(value.get("orientation") or 0) % 4 != 0:
        raise InvalidRequest("The image is rotated in the editor; rotate it back before saving.")
    raw = value.get("boxes") or []
    if not isinstance(raw, list):
        raise InvalidRequest("boxes must be a list")
    known = current["faces"]
    scale = float(current.get("display_scale") or 1.0)
    if not 1.0 <= scale <= MAX_DISPLAY_SCALE:
        raise InvalidRequest(f"display scale {scale!r} is out of range; reload the image")
    parsed: list[tuple[int | None, tuple[float, float, float, float], str | None]] = []
    claimed: set[int] = set()
    for box in raw:
        try:
            coords = tuple(float(box[k]) / scale for k in ("xmin", "ymin", "xmax", "ymax"))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequest(f"Each box needs numeric xmin, ymin, xmax, ymax; got {box!r}.") from exc
        label = str(box.get("label") or "").strip()
        face_id, name = None, label
        match = _LABEL_RE.match(label)
        if match:
            face_id, name = int(match["id"]), match["name"].strip()
            if face_id not in known:
                raise InvalidRequest(f"A box is labelled #{face_id}, which is not a face on this image; "
                                     "remove the number from its label.")
            if face_id in claimed:
                raise InvalidRequest(f"Two boxes are labelled #{face_id}; remove the number from one of them.")
            claimed.add(face_id)
        parsed.append((face_id, coords, None if name.lower() in _UNNAMED_WORDS else name))
    # boxes whose label lost its "#id": the stored face they overlap most, if unclaimed
    out: list[BoxEdit] = []
    for face_id, coords, name in parsed:
        if face_id is None:
            best, best_iou = None, MATCH_IOU
            for fid, info in known.items():
                if fid in claimed:
                    continue
                overlap = iou(coords, info["box"])
                if overlap >= best_iou:
                    best, best_iou = fid, overlap
            if best is not None:
                face_id = best
                claimed.add(best)
        out.append(BoxEdit(face_id, *coords, name=name))
    return out


# -- internals ---------------------------------------------------------------------------------
def _save_boxes(lab: Lab, current: dict, value: dict | None, user: str, finished: bool,
                override: tuple[int, str] | None) -> LabelState:
    edits = parse_boxes(value, current)
    if override is not None:
        face_id, name = override
        if not any(e.face_id == face_id for e in edits):
            raise InvalidRequest(f"Box #{face_id} was removed in the editor; reload or pick another box.")
        edits = [BoxEdit(e.face_id, e.x1, e.y1, e.x2, e.y2, name) if e.face_id == face_id else e for e in edits]
    return labeling.save_labels(lab, current["image_id"], current["version"], edits, user,
                                finished=finished, face_versions=current["face_versions"])


def _view(lab: Lab, state: LabelState, message: str = "", after: int | None = None) -> LabelView:
    faces = {
        b.face_id: {"box": list(b.box), "name": b.name, "color": _colour(b),
                    "origin": "human" if b.is_human else b.origin.split("-")[0], "score": round(b.score, 2),
                    "suggestions": [[p.name, round(p.similarity, 3), p.is_match] for p in b.suggestions]}
        for b in state.boxes
    }
    scale = display_scale(state.width, state.height)
    head = (f"**Image {state.image_id}** · {md(state.name)} · {state.width}×{state.height} · "
            f"status **{state.status}** · ")
    tail = f" · version {state.version}"
    if scale != 1.0:
        tail += f" · shown at {scale:g}×"
    if state.last_change:
        tail += f" · last labelled by {md(state.last_change)}"
    current = {"image_id": state.image_id, "version": state.version, "revision": state.revision,
               "face_versions": state.face_versions, "display_scale": scale,
               "image_file": str(lab.images.path(state.sha256)),
               "faces": faces, "order": [b.face_id for b in state.boxes], "info_head": head, "info_tail": tail}
    boxes = [{"label": box_label(b.face_id, b.name), "color": _colour(b),
              "xmin": b.box[0] * scale, "ymin": b.box[1] * scale, "xmax": b.box[2] * scale, "ymax": b.box[3] * scale}
             for b in state.boxes]
    selected = _pick_box(state, after)
    boxes = editor_boxes(current, {"boxes": boxes}, selected)
    shown = panel(current, {"boxes": boxes}, selected)
    return LabelView(
        current=current, image_path=lab.images.path(state.sha256), boxes=boxes, rows=shown.rows,
        box_choices=shown.box_choices, selected=shown.selected, suggestion_labels=shown.suggestion_labels,
        label_list=_label_choices(lab), info=shown.info, counts=counts_text(lab), message=message,
        can_undo=state.can_undo, display_scale=scale,
    )


def _pick_box(state: LabelState, after: int | None) -> int | None:
    """The box to work on next: the first unnamed one after ``after`` (wrapping), else the first."""
    if not state.boxes:
        return None
    ids = [b.face_id for b in state.boxes]
    start = ids.index(after) + 1 if after in ids else 0
    ordered = state.boxes[start:] + state.boxes[:start]
    for b in ordered:
        if b.name is None:
            return b.face_id
    return after if after in ids else ids[0]


def _suggestion_text(rank: int, suggestion: Sequence[Any], name: str | None) -> str:
    person, similarity, match = suggestion
    text = f"{rank}. {person}"
    if similarity is not None:
        text += f" {similarity:.2f}{' ✓' if match else ''}"
    if name and person.lower() == name.lower():
        text += " (its name)"
    return text


def _suggestion_labels(suggestions: Sequence[Sequence[Any]], name: str | None = None) -> list[str]:
    labels = [_suggestion_text(i, s, name) for i, s in enumerate(suggestions, start=1)]
    return (labels + [""] * SUGGESTION_SLOTS)[:SUGGESTION_SLOTS]


def _label_choices(lab: Lab) -> list[str]:
    with lab.sessions() as session:
        names = session.scalars(
            select(Identity.name).outerjoin(Face, Face.identity_id == Identity.id).group_by(Identity.id)
            .order_by(func.count(Face.id).desc(), func.lower(Identity.name)).limit(LABEL_CHOICES)
        ).all()
    return [UNNAMED_LABEL, *sorted(names, key=str.lower)]


def _colour(box: labeling.LabelBox) -> str:
    if box.name:
        return NAMED_COLOUR
    return HUMAN_COLOUR if box.origin == HUMAN_ORIGIN else DETECTED_COLOUR


def _name_for(state: LabelState, face_id: int) -> str:
    for b in state.boxes:
        if b.face_id == face_id:
            return f"**{md(b.name)}**" if b.name else "unnamed"
    return "gone"


def _selected(current: dict, face_id: object) -> int:
    face_id = face_arg(face_id)
    if face_id is None:
        raise InvalidRequest("Pick a box first (click its row, or press [ and ]).")
    if face_id not in current["faces"]:
        raise InvalidRequest(f"Face #{face_id} is not on this image (save new boxes before naming them here).")
    return face_id


def face_arg(value: object) -> int | None:
    """The box picker's value as a face id (None: nothing picked). The picker takes any
    value (a stale one from a photo just left included); whether the face is on the open
    photo is checked by the action."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise InvalidRequest(f"Pick a box from the list, not {value!r}.")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise InvalidRequest(f"Pick a box from the list, not {str(value)[:40]!r}.")


def _moved(old: Sequence[float], new: Sequence[float]) -> bool:
    """Moved as a save would count it (labeling.MOVE_TOLERANCE pixels on any side)."""
    return any(abs(a - b) > labeling.MOVE_TOLERANCE for a, b in zip(old, new, strict=True))


__all__ = [
    "BOX_TABLE_HEADERS", "DEFAULT_STATUS_CHOICE", "EditorUpdate", "Filters", "HISTORY_HEADERS", "LabelView", "Panel",
    "STATUS_CHOICES", "StaleAction", "UNNAMED_LABEL", "accept_suggestion", "aimed_at", "box_label", "counts_text",
    "empty_view", "history_rows", "name_box", "next_in_queue", "open_image", "ordered_suggestions", "panel",
    "parse_boxes", "refresh", "remove_box", "save", "save_and_next", "select_box", "select_row", "skip", "step",
    "step_box", "target_of", "undo",
]
