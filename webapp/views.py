"""What the UI shows, computed without a browser: one function per UI action.

Each function calls one pipeline operation and turns its result into plain values
(images as numpy arrays, table rows, a message) that Gradio components take as is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from pipeline.context import Lab
from pipeline.errors import InvalidRequest
from pipeline.library import attributes as face_attributes
from pipeline.library import identities
from pipeline.library.attributes import EMOTIONS, UNSURE, FaceAttributes
from pipeline.library.ingest import ImageRejected, Upload, ingest, read_regular_file
from pipeline.library.search import search_image
from pipeline.results import FaceInfo, IngestReport, SearchResult
from pipeline.served import picture_file
from pipeline.text import md

#: (file to show, caption): pictures are files named after their photo (see pipeline.served)
Caption = tuple[str, str]
DISPLAY_MAX_SIDE = 1280
CROP_SIZE = 112
MATCH_COLOUR = (46, 160, 67)
FACE_COLOUR = (255, 200, 0)


@dataclass(frozen=True)
class DetectView:
    report: IngestReport
    annotated: list[Caption]
    crops: list[Caption]
    rows: list[list[object]]
    face_ids: list[int]
    message: str


@dataclass(frozen=True)
class SearchView:
    result: SearchResult
    gallery: list[Caption]
    rows: list[list[object]]
    message: str
    #: the whole result as JSON (``search_details``)
    details: dict


@dataclass(frozen=True)
class PeopleView:
    gallery: list[Caption]
    rows: list[list[object]]
    message: str
    #: the person of each gallery picture, in order (a click on picture i selects gallery_names[i])
    gallery_names: list[str]


def status_line(lab: Lab) -> str:
    return (
        f"Detector: **{lab.settings.detector}** · Embedder: **{lab.settings.embedder}** · "
        f"Data: `{lab.settings.data_dir}`"
    )


# -- drawing ----------------------------------------------------------------------------
def face_crop(image: np.ndarray, box: Sequence[float], size: int = CROP_SIZE, margin: float = 0.2) -> np.ndarray:
    """A square thumbnail around a box, with some context."""
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    h, w = image.shape[:2]
    left, top = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    right, bottom = int(min(w, cx + side / 2)), int(min(h, cy + side / 2))
    crop = image[top:max(bottom, top + 1), left:max(right, left + 1)]
    return np.asarray(PILImage.fromarray(crop).resize((size, size), PILImage.BILINEAR))


def draw_faces(image: np.ndarray, faces: Sequence[tuple[Sequence[float], str, bool]]) -> np.ndarray:
    """The image (scaled to fit the screen) with each box and its label drawn on it."""
    pil = PILImage.fromarray(image)
    scale = min(1.0, DISPLAY_MAX_SIDE / max(pil.size))
    if scale < 1.0:
        pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), PILImage.BILINEAR)
    draw = ImageDraw.Draw(pil)
    thickness = max(2, round(max(pil.size) / 400))
    for box, label, matched in faces:
        x1, y1, x2, y2 = (v * scale for v in box)
        colour = MATCH_COLOUR if matched else FACE_COLOUR
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=thickness)
        if label:
            text_box = draw.textbbox((x1, y1), label)
            top = y1 - (text_box[3] - text_box[1]) - 4
            top = top if top >= 0 else y2 + 2
            bg = draw.textbbox((x1, top), label)
            draw.rectangle((bg[0] - 2, bg[1] - 2, bg[2] + 2, bg[3] + 2), fill=colour)
            draw.text((x1, top), label, fill=(0, 0, 0))
    return np.asarray(pil)


def _face_label(face: FaceInfo) -> str:
    if face.identity:
        return f"#{face.face_id} {face.identity}"
    if not face.searchable:
        return f"#{face.face_id} not a face?"
    if face.suggestion and face.suggestion.is_match:
        return f"#{face.face_id} {face.suggestion.name}?"
    return f"#{face.face_id}"


def is_it_a_face(face: FaceInfo) -> str:
    """The table's "face?" column: how sure the quality gate is that the box is a face."""
    if face.quality is None:
        return ""
    return f"yes ({face.quality:.2f})" if face.searchable else f"unsure ({face.quality:.2f})"


# -- face attributes -----------------------------------------------------------------
#: table columns for a face's attributes (Detect, Search and People tables end with them)
ATTRIBUTE_HEADERS = ["emotion", "emotion p", "age", "gender", "gender p"]
#: the emotion filter's choices (Search, People)
EMOTION_CHOICES = ["any", *EMOTIONS, UNSURE]  # unsure: the model names no emotion (below its confidence floor)


def attribute_cells(a: FaceAttributes | None) -> list[object]:
    """The ``ATTRIBUTE_HEADERS`` cells of one face ("" / None where a part is absent)."""
    if a is None:
        return ["", None, None, "", None]
    return [a.emotion or ("too small" if a.too_small else ""),
            round(a.emotion_confidence, 3) if a.emotion_confidence is not None else None,
            round(a.age, 1) if a.age is not None else None, a.gender or ("too small" if a.too_small else ""),
            round(a.gender_confidence, 3) if a.gender_confidence is not None else None]


# -- Detect tab -------------------------------------------------------------------------
def detect(lab: Lab, files: Sequence[str | Path], progress: Callable[[float, str], None] | None = None) -> DetectView:
    if not files:
        raise InvalidRequest("Choose one or more photos first.")
    uploads = [Upload(name=Path(f).name, path=Path(f)) for f in files]
    report = ingest(lab, uploads, progress=progress)
    annotated: list[Caption] = []
    crops: list[Caption] = []
    rows: list[list[object]] = []
    face_ids: list[int] = []
    attrs = face_attributes.stored_attributes(lab, [f.face_id for r in report.files for f in r.faces])
    for result in report.files:
        if not result.ok or result.sha256 is None:
            continue
        image = lab.images.open(result.sha256)
        drawn = draw_faces(image, [(f.box, _face_label(f), f.identity is not None) for f in result.faces])
        annotated.append((picture_file(lab, drawn, result.sha256), f"{result.name}: {len(result.faces)} face(s)"))
        for face in result.faces:
            s = face.suggestion
            caption = f"#{face.face_id} · {face.score:.2f}"
            if face.identity:
                caption += f" · {face.identity}"
            elif not face.searchable:
                caption += " · may not be a face"
            elif s is not None:
                caption += f" · {s.name} {s.similarity:.2f}" if s.is_match else f" · nobody (closest {s.name} {s.similarity:.2f})"
            a = attrs.get(face.face_id)
            if a is not None and a.summary():
                caption += f" · {a.summary()}"
            crops.append((picture_file(lab, face_crop(image, face.box), result.sha256), caption))
            face_ids.append(face.face_id)
            rows.append([
                face.face_id, result.name, round(face.score, 3), is_it_a_face(face), face.identity or "",
                (s.name if s.is_match else f"nobody (closest: {s.name})") if s else "",
                round(s.similarity, 3) if s else None, *attribute_cells(a),
            ])
    lines = [report.summary() + "."]
    lines += [f"- **{md(r.name)}**: {md(r.error)}" for r in report.files if r.error]
    lines += [f"- {md(r.name)}: {md(r.note)}" for r in report.files if r.ok and r.note]
    if report.face_count and (note := face_attributes.missing_note(lab)):
        lines.append(f"- {md(note)}")
    return DetectView(report, annotated, crops, rows, face_ids, "\n".join(lines))


def forget_uploads(lab: Lab, files: Sequence[str | Path]) -> int:
    """Delete the UI's temporary copies of uploaded photos once ingest has stored them (or
    refused them): otherwise a photo would outlive a privacy delete in the upload folder.
    Only files inside ``Settings.ui_cache_dir`` are touched."""
    root = lab.settings.ui_cache_dir.resolve()
    removed = 0
    for name in files:
        path = Path(name).resolve()
        if path.is_relative_to(root) and path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def enroll(lab: Lab, face_id: float | int | None, name: str, user: str = "local", confirm_face: bool = False) -> str:
    if face_id is None or (isinstance(face_id, float) and (np.isnan(face_id) or not face_id.is_integer())):
        raise InvalidRequest("Pick a face first: click its crop, or type its id.")
    person = identities.enroll(lab, int(face_id), name, user=user, confirm_face=bool(confirm_face))
    return f"Face #{int(face_id)} is now **{md(person.name)}** ({person.face_count} face(s))."


# -- Search tab -------------------------------------------------------------------------
def search(lab: Lab, path: str | Path | None, k: int, threshold: float | None,
           with_embeddings: bool = False, emotion: str | None = None) -> SearchView:
    """``threshold`` None: the calibrated 1:N threshold for the current gallery size.
    ``emotion`` ("any"/None = all) keeps only results whose stored emotion is that one,
    e.g. only smiling ("happy") photos of the person in the query photo."""
    if not path:
        raise InvalidRequest("Choose a photo of the person to find.")
    wanted, _ = face_attributes.check_filter(emotion)
    file = Path(path)
    try:  # a plain file only, and never more than the upload limit read into memory
        data = read_regular_file(file, lab.settings.max_upload_bytes)
    except ImageRejected as exc:
        raise InvalidRequest(f"{file.name}: {exc}") from exc
    except FileNotFoundError as exc:
        raise InvalidRequest("The photo is no longer on the server; choose it again.") from exc
    # with a filter, look deeper so k results can remain after it
    depth = lab.settings.max_k if wanted else k
    # search_image checks the header (format, width x height) before decoding any pixel
    result = search_image(lab, data, file.name, k=depth, threshold=threshold, with_embeddings=with_embeddings)
    gallery: list[Caption] = []
    rows: list[list[object]] = []
    if not result.faces:
        return SearchView(result, [], [], "No face found in this photo. Try a larger, sharper or more frontal photo.",
                          search_details(result))
    query = result.primary_face
    if query is None:
        message = (f"The photo has {len(result.faces)} box(es), but none surely is a face (a hand, a torso, a "
                   "pattern?), so nothing was searched. Try a clearer photo of the face.")
        return SearchView(result, [], [], message, search_details(result))
    cache: dict[int, tuple[str, np.ndarray]] = {}
    attrs = face_attributes.stored_attributes(lab, [m.face_id for m in query.matches])
    matches = [m for m in query.matches if wanted is None or (attrs.get(m.face_id) is not None
                                                               and attrs[m.face_id].emotion == wanted)][:k]
    for rank, match in enumerate(matches, start=1):
        if match.image_id not in cache:
            sha = identities.image_sha256(lab, match.image_id)
            cache[match.image_id] = sha, lab.images.open(sha)
        sha, image = cache[match.image_id]
        name = match.name or "unnamed"
        a = attrs.get(match.face_id)
        caption = f"{rank}. {name} · {match.similarity:.3f}" + (f" · {a.summary()}" if a is not None and a.summary() else "")
        gallery.append((picture_file(lab, face_crop(image, match.box), sha), caption))
        same = ("yes" if match.is_match else "no") if match.identity_id is not None else "—"
        rows.append([rank, name, round(match.similarity, 4), same, match.face_id, match.image_id, *attribute_cells(a)])
    decided, closest = query.decision, (query.people[0] if query.people else None)
    if closest is None:
        message = "Nobody is enrolled yet: name faces in the Detect tab first."
    elif decided is not None:
        message = f"This is **{md(decided.name)}** (similarity {decided.similarity:.3f} ≥ {result.threshold:.3f})."
    else:
        message = (f"**No match**: nobody enrolled reaches the threshold {result.threshold:.3f}; "
                   f"the closest is {md(closest.name)} ({closest.similarity:.3f}), not close enough to say.")
    message += f"  \n<small>{md(result.rule)}.</small>"
    if len(result.faces) > 1:
        message += f"  \nThe photo has {len(result.faces)} faces; results are for its main face (the biggest, nearest the centre)."
    if wanted:
        message += (f"  \nShowing only faces whose emotion is {wanted}: {len(matches)} of the "
                    f"{len(query.matches)} most similar.")
    return SearchView(result, gallery, rows, message, search_details(result))


def search_details(result: SearchResult) -> dict:
    """The whole result as plain JSON for the API: every face with its box, quality,
    decision and ranked people (and its embedding when asked for)."""
    faces = []
    for i, face in enumerate(result.faces):
        entry: dict[str, object] = {
            "box": [round(v, 1) for v in face.box], "detector_score": round(face.score, 4),
            "quality": None if face.quality is None else round(face.quality, 4), "searchable": face.searchable,
            "primary": i == result.primary,
            "person": face.decision.name if face.decision else None,
            "people": [{"name": p.name, "similarity": round(p.similarity, 4), "match": p.is_match} for p in face.people],
            "faces": [{"face_id": m.face_id, "image_id": m.image_id, "similarity": round(m.similarity, 4),
                       "name": m.name, "match": m.is_match} for m in face.matches],
        }
        if face.embedding is not None:
            entry["embedding"] = face.embedding
        faces.append(entry)
    best = result.best_person
    return {"person": best.name if best else None, "threshold": round(result.threshold, 4),
            "gallery_faces": result.gallery_faces, "rule": result.rule, "model_version": result.model_version,
            "primary": result.primary, "faces_found_by": result.faces_found_by, "faces": faces}


# -- People tab -------------------------------------------------------------------------
def people(lab: Lab) -> PeopleView:
    everyone = identities.list_people(lab)
    gallery: list[Caption] = []
    gallery_names: list[str] = []
    for person in everyone:
        cover = identities.cover_face(lab, person.cover_face_id) if person.cover_face_id is not None else None
        if cover is None:
            continue
        sha, box = cover
        gallery.append((picture_file(lab, face_crop(lab.images.open(sha), box), sha),
                        f"{person.name} ({person.face_count})"))
        gallery_names.append(person.name)
    rows = [[p.identity_id, p.name, p.face_count] for p in everyone]
    message = f"{len(everyone)} people enrolled."
    empty = sum(1 for p in everyone if p.face_count == 0)
    if empty:
        message += f" {empty} of them have no face left (listed with 0 faces; select one to rename or delete it)."
    return PeopleView(gallery, rows, message, gallery_names)


def person_names(lab: Lab) -> list[str]:
    return [p.name for p in identities.list_people(lab)]


def find_faces(lab: Lab, person: str | None, emotion: str | None, gender: str | None,
               min_age: float | None, max_age: float | None, limit: int = 60) -> PeopleView:
    """Faces (one person's when ``person`` is given) filtered by emotion, gender and age:
    e.g. only the smiling ("happy") photos of a person. Newest first."""
    min_age = None if min_age is None or (isinstance(min_age, float) and np.isnan(min_age)) else float(min_age)
    max_age = None if max_age is None or (isinstance(max_age, float) and np.isnan(max_age)) else float(max_age)
    found = face_attributes.find_faces(lab, (person or "").strip() or None, emotion, gender, min_age, max_age,
                                       limit=limit)
    gallery: list[Caption] = []
    rows: list[list[object]] = []
    photos: dict[int, tuple[str, np.ndarray]] = {}  # each photo looked up and decoded once
    for face_id, image_id, box, name, a in found:
        if image_id not in photos:
            sha = identities.image_sha256(lab, image_id)
            photos[image_id] = sha, lab.images.open(sha)
        sha, image = photos[image_id]
        caption = f"#{face_id}" + (f" · {name}" if name else "") + (f" · {a.summary()}" if a and a.summary() else "")
        gallery.append((picture_file(lab, face_crop(image, box), sha), caption))
        rows.append([face_id, image_id, name or "", *attribute_cells(a)])
    who = f"of **{md(person.strip())}** " if person and person.strip() else ""
    message = f"{len(found)} face(s) {who}match" + (f" (the newest {limit} shown)" if len(found) >= limit else "") + "."
    if note := face_attributes.missing_note(lab):
        message += f" {md(note)}"
    return PeopleView(gallery, rows, message, [])


def rename_person(lab: Lab, old: str, new: str, user: str = "local") -> str:
    person = identities.rename_person(lab, old, new, user=user)
    return f"Renamed to **{md(person.name)}**."


def merge_people(lab: Lab, source: str, target: str, user: str = "local") -> str:
    person = identities.merge_people(lab, source, target, user=user)
    return f"Merged into **{md(person.name)}** ({person.face_count} face(s))."


def delete_confirmation(lab: Lab, name: str, delete_faces: bool) -> str:
    """What deleting ``name`` will do, said before it is done: the People tab shows this and
    asks for a second click. Deletes are final (nothing is kept to restore from: a privacy
    delete must not leave a copy), and the text says so."""
    person = identities.get_person(lab, name)
    who, faces = md(person.name), person.face_count
    if delete_faces:
        return (f"**Delete {who} and their {faces} face(s) for good?** The faces, every embedding and "
                "search-index entry of them, and the name everywhere in the label history and audit log "
                "are deleted now. **This is final**: FaceLab keeps no copy to restore them from.")
    return (f"**Delete the name {who}?** Their {faces} face(s) stay in the library, unnamed (the Label "
            "tab's \"only images with unnamed faces\" filter finds them). **This is final**: to get the "
            "name back, name those faces again.")


def delete_person(lab: Lab, name: str, delete_faces: bool, user: str = "local") -> str:
    """With ``delete_faces`` this is the privacy delete: faces, every embedding version,
    index entries and the name in label history and audit details all go."""
    if delete_faces:
        from pipeline.library.privacy import forget_person

        return md(forget_person(lab, name, user=user).message)
    return md(identities.delete_person(lab, name, False, user=user))
