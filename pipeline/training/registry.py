"""The model registry: trained runs, which model is in use, promotion and rollback.

Every model the app can use is a ``ModelVersion`` row. Its ``metrics`` JSON holds what
is needed to build it again and to judge it::

    {"spec": "yolo:runs/<run>/weights/detector.pt",   # create_detector/create_embedder spec;
     "options": {"imgsz": 416, "conf": 0.31},          #  relative paths are inside data_dir
     "run_id": "<run>", "summary": {metric: value,     # the evaluation on the run's test
                                    "measured on": "test split: ..."},  # split, for the table
     "match_threshold": 0.61}                          # embedders: fitted on the select split

The row's ``sha256`` column holds the full digest of its weights file; ``build_detector``
and ``build_embedder`` hand it to the model, which compares it with the file before
loading it (a YOLO ``.pt`` is a pickle: only the registered bytes are ever unpickled,
see ``models.model_files``). A yolo/resnet50 row without a full digest is not loaded.

The active row of a kind (at most one, enforced by the database) is the model in use;
with no active row the settings' default is in use. The first promotion of a kind also
records the model in use as a row, so a rollback can always return to it.

Safety rules (each tested):

* Training never touches these rows except to add an inactive one at its very end.
* Promotion of an embedder embeds every face with the candidate and builds its FAISS
  index completely (both stored under the candidate's version, beside the old ones)
  before anything switches; the switch itself (database row, ``lab.embedder``, index)
  happens under ``lab.write_lock``. A crash or cancel before it leaves the old model
  in use; afterwards the old vectors are still there, so a rollback needs no
  re-embedding (only faces added since are embedded).
* ``apply_active_models(lab)`` makes the active rows win over the settings' defaults
  at start-up, so the choice survives restarts.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from common.atomic import write_atomically
from models.detectors.base import FaceDetector
from models.detectors.factory import create_detector
from models.embedders.base import FaceEmbedder
from models.embedders.factory import create_embedder
from models.model_files import UntrustedModelFile
from models.weights_locator import file_sha256
from pipeline.context import Lab
from pipeline.errors import FaceLabError, InvalidRequest, NotFound
from pipeline.library.embed import faces_without, stored_faces_by_photo
from pipeline.training.evaluate import cpu_threads
from storage.faiss_index import FaceIndex
from storage.orm import (
    AuditLog,
    Embedding,
    Face,
    ModelKind,
    ModelVersion,
    active_model_version,
    record_audit,
    set_active_model_version,
    utcnow,
)

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
KINDS = ("detector", "embedder")

#: one promotion/rollback at a time per process (they re-embed and swap models)
_SWITCH_LOCK = threading.Lock()


class PromotionStopped(FaceLabError):
    """A promotion was cancelled (or failed) before the switch: nothing changed."""


# ----------------------------------------------------------------------------- files


def runs_root(lab: Lab) -> Path:
    return lab.settings.data_dir / "runs"


def write_json(path: Path | str, obj: Any) -> Path:
    """Write JSON atomically (temp file + fsync + rename): readers see old or new, never half."""
    text = json.dumps(obj, indent=1, default=_json_default).encode()
    return write_atomically(Path(path), text, durable=True)


def read_json(path: Path | str) -> Any | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (Path, datetime)):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def relative_to_data(lab: Lab, path: Path | str) -> str:
    """``path`` relative to the data folder when inside it (a moved data folder keeps working)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(lab.settings.data_dir.resolve()))
    except ValueError:
        return str(p)


def resolve_spec(lab: Lab, spec: str) -> str:
    """A spec with its path made absolute (relative paths are inside the data folder)."""
    name, sep, arg = spec.partition(":")
    if not sep or not arg:
        return spec
    path = Path(arg)
    if not path.is_absolute():
        path = lab.settings.data_dir / path
    return f"{name}:{path.resolve()}"


# ----------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class VersionInfo:
    id: int
    kind: str
    name: str
    version: str
    spec: str
    options: dict[str, Any]
    active: bool
    created_at: datetime
    run_id: str | None
    summary: dict[str, Any]
    match_threshold: float | None
    file_path: str | None
    sha256: str | None = None  #: of the weights file, recorded at registration; checked before loading

    def label(self) -> str:
        return f"#{self.id} {self.kind} {self.name} {self.version}" + (" (in use)" if self.active else "")


def _info(row: ModelVersion) -> VersionInfo:
    extra = dict(row.metrics or {})
    return VersionInfo(
        id=row.id, kind=str(row.kind.value if hasattr(row.kind, "value") else row.kind), name=row.name,
        version=row.version, spec=str(extra.get("spec") or row.name), options=dict(extra.get("options") or {}),
        active=bool(row.active), created_at=row.created_at, run_id=extra.get("run_id"),
        summary=dict(extra.get("summary") or {}), match_threshold=extra.get("match_threshold"),
        file_path=row.file_path, sha256=row.sha256,
    )


def _kind(kind: str) -> ModelKind:
    try:
        return ModelKind(kind)
    except ValueError as exc:
        raise InvalidRequest(f"Unknown model kind {kind!r}; use detector or embedder.") from exc


def register_version(
    lab: Lab,
    kind: str,
    name: str,
    version: str,
    spec: str,
    *,
    file_path: str | None = None,
    sha256: str | None = None,
    options: dict[str, Any] | None = None,
    run_id: str | None = None,
    summary: dict[str, Any] | None = None,
    match_threshold: float | None = None,
) -> VersionInfo:
    """Add an inactive row (or return the existing one for the same kind/name/version)."""
    mk = _kind(kind)
    with lab.session() as session:
        row = session.scalars(select(ModelVersion).where(
            ModelVersion.kind == mk, ModelVersion.name == name, ModelVersion.version == version)).one_or_none()
        if row is None:
            row = ModelVersion(kind=mk, name=name, version=version, file_path=file_path, sha256=sha256, active=False,
                               metrics={"spec": spec, "options": options or {}, "run_id": run_id,
                                        "summary": summary or {}, "match_threshold": match_threshold})
            session.add(row)
            session.flush()
        return _info(row)


def list_versions(lab: Lab, kind: str | None = None) -> list[VersionInfo]:
    with lab.sessions() as session:
        q = select(ModelVersion).order_by(ModelVersion.id.desc())
        if kind is not None:
            q = q.where(ModelVersion.kind == _kind(kind))
        return [_info(r) for r in session.scalars(q).all()]


def get_version(lab: Lab, version_id: int) -> VersionInfo:
    with lab.sessions() as session:
        row = session.get(ModelVersion, int(version_id))
        if row is None:
            raise NotFound(f"Model version {version_id} does not exist; see `python app.py models list`.")
        return _info(row)


def active_version(lab: Lab, kind: str) -> VersionInfo | None:
    with lab.sessions() as session:
        row = active_model_version(session, _kind(kind))
        return _info(row) if row is not None else None


def in_use_spec(lab: Lab, kind: str) -> str:
    return lab.settings.detector if kind == "detector" else lab.settings.embedder


def _weights_file(model: object) -> Path | None:
    """The weights file a model loads (a YOLO checkpoint, our ResNet50), if any."""
    if getattr(model, "name", None) not in FILE_MODELS:
        return None
    path = getattr(model, "weights", None) or getattr(model, "checkpoint", None)
    return Path(path) if isinstance(path, (str, Path)) and Path(path).is_file() else None


def ensure_in_use_registered(lab: Lab, kind: str) -> VersionInfo:
    """The model in use as a row (created inactive if missing), so rollback can reach it.
    Its weights file (the owner's choice at start-up) is pinned by its sha256 now."""
    active = active_version(lab, kind)
    if active is not None:
        return active
    spec = in_use_spec(lab, kind)
    name = spec.partition(":")[0].strip().lower()
    path = spec.partition(":")[2] or None
    model = lab.detector if kind == "detector" else lab.embedder
    model.load()
    weights = _weights_file(model)
    sha = file_sha256(weights) if weights is not None else None
    if kind == "detector":
        return register_version(lab, kind, name, lab.detector.version, spec, file_path=path, sha256=sha,
                                summary={"note": "the model in use before the first promotion"})
    threshold = None
    try:
        threshold = lab.match_threshold
    except RuntimeError:
        pass
    return register_version(lab, kind, name, lab.model_version, spec, file_path=path, sha256=sha,
                            match_threshold=threshold, summary={"note": "the model in use before the first promotion"})


# ----------------------------------------------------------------------------- building models


#: model names whose weights are a file FaceLab must pin (the others ship in packages)
FILE_MODELS = ("yolo", "resnet50")


def _pinned(info: VersionInfo) -> dict[str, Any]:
    """The ``sha256`` option of a file-based version: its file is hashed and compared
    before anything reads it (a YOLO .pt is unpickled, see models.model_files). A
    file-based row without a full digest cannot be verified and is refused."""
    if info.name not in FILE_MODELS:
        return {}
    if not info.sha256 or len(info.sha256) != 64:
        raise UntrustedModelFile(
            f"{info.label()} ({info.spec}) has no full sha256 on record (registered by an older FaceLab), so its file cannot be "
            "verified and was not loaded; train it again, or start the app with it yourself (--detector/--embedder).")
    return {"sha256": info.sha256}


def build_detector(lab: Lab, info: VersionInfo) -> FaceDetector:
    return create_detector(resolve_spec(lab, info.spec), **info.options, **_pinned(info))


def build_embedder(lab: Lab, info: VersionInfo) -> FaceEmbedder:
    embedder = create_embedder(resolve_spec(lab, info.spec), landmark_detector=lab.landmarker, **info.options,
                               **_pinned(info))
    if info.match_threshold is not None:
        embedder.match_threshold = float(info.match_threshold)
    return embedder




def embed_faces_with(
    lab: Lab,
    embedder: FaceEmbedder,
    face_ids: list[int],
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> int:
    """Store ``embedder``'s vectors for these faces (one image read per photo, stored
    boxes and landmarks; missing landmarks come from ``lab.landmarker``, as at ingest).

    Unlike ``pipeline.library.embed.embed_faces`` this works for any embedder, not only the
    active one, and leaves every index alone: the caller builds the candidate's index
    from the database afterwards. Committed per image, so a cancel keeps the work done.
    """
    version = embedder.version
    done = 0
    for photo in stored_faces_by_photo(lab, face_ids, with_landmarks=True):
        if should_stop is not None and should_stop():
            raise PromotionStopped(f"Stopped after embedding {done} of {photo.total} face(s); nothing was switched.")
        vectors = embedder.embed(photo.image, photo.boxes)
        ids = photo.ids
        with lab.session() as session:
            existing = set(session.scalars(
                select(Embedding.face_id).where(Embedding.face_id.in_(ids), Embedding.model_version == version)
            ).all())
            alive = set(session.scalars(select(Face.id).where(Face.id.in_(ids))).all())
            for face_id, vec in zip(ids, vectors, strict=True):
                if face_id not in existing and face_id in alive:
                    session.add(Embedding.from_array(face_id, version, vec))
        done += len(ids)
        if progress is not None:
            progress((photo.index + 1) / photo.photos, f"Embedded {done} of {photo.total} face(s) with {version}")
    return done


def build_index_for(lab: Lab, embedder: FaceEmbedder) -> FaceIndex:
    """The embedder's FAISS index, complete and saved (loaded if already up to date)."""
    return lab.load_index(embedder.version, embedder.dim)


# ----------------------------------------------------------------------------- switching


def _loaded(lab: Lab, info: VersionInfo) -> FaceDetector | FaceEmbedder:
    """The version's model, loaded; any failure becomes a message for the user."""
    try:
        model = build_detector(lab, info) if info.kind == "detector" else build_embedder(lab, info)
        model.load()
    except Exception as exc:  # noqa: BLE001 - missing file, wrong format, bad spec
        raise FaceLabError(f"Could not load {info.label()}: {exc}. Nothing was switched.") from exc
    return model


def _has_options(model: object, options: dict[str, Any]) -> bool:
    return all(getattr(model, key, object()) == value for key, value in options.items())


def _swap(lab: Lab, info: VersionInfo, model: FaceDetector | FaceEmbedder, user: str, action: str,
          in_use: VersionInfo) -> VersionInfo | None:
    """The switch itself: database row, audit entry, then the in-memory model. Called
    with ``lab.write_lock`` held, after everything that can fail has been done.
    ``in_use`` is the row of the model in use (maybe inactive: the settings' default)."""
    with lab.session() as session:
        row = session.get(ModelVersion, info.id)
        previous = active_model_version(session, row.kind) or session.get(ModelVersion, in_use.id)
        set_active_model_version(session, row)
        record_audit(session, user, f"model_{action}", "model_version", row.id, {
            "kind": info.kind, "from_id": previous.id if previous is not None else None,
            "from_version": previous.version if previous is not None else None,
            "to_version": info.version, "at": utcnow().isoformat(),
        })
        prev_info = _info(previous) if previous is not None else None
    _put_in_use(lab, info.kind, info, model, resolve_spec(lab, info.spec))
    return prev_info


def _put_in_use(lab: Lab, kind: str, info: VersionInfo, model: FaceDetector | FaceEmbedder, spec: str) -> None:
    """Make ``model`` the Lab's detector or embedder and its settings say so."""
    if kind == "detector":
        lab.detector = model  # type: ignore[assignment]
        lab.settings = replace(lab.settings, detector=spec)
        return
    lab.embedder = model  # type: ignore[assignment]
    changes: dict[str, Any] = {"embedder": spec}
    if info.match_threshold is not None:
        # a global threshold was calibrated for another embedder's similarities
        changes["match_threshold"] = None
    lab.settings = replace(lab.settings, **changes)


def activate(
    lab: Lab,
    version_id: int,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    user: str = "local",
    action: str = "promote",
) -> str:
    """Make a registered version the model in use (see the module docstring)."""
    if not _SWITCH_LOCK.acquire(blocking=False):
        raise FaceLabError("Another promotion or rollback is running; wait for it to finish.")
    try:
        info = get_version(lab, version_id)
        if info.active:
            return f"{info.label()} is already in use."
        in_use = ensure_in_use_registered(lab, info.kind)
        say = progress or (lambda f, t: None)
        if info.kind == "detector":
            detector = _loaded(lab, info)  # a missing or broken file fails here, before anything switches
            say(1.0, "Detector loaded")
            with lab.write_lock:
                previous = _swap(lab, info, detector, user, action, in_use)
            return f"Detector switched to {info.label()}" + (f" (was #{previous.id} {previous.name})" if previous else "") + "."

        embedder = _loaded(lab, info)
        missing = faces_without(lab, embedder.version)
        if missing:
            with cpu_threads():
                embed_faces_with(lab, embedder, missing, lambda f, t: say(0.95 * f, t), should_stop)
        say(0.96, "Building the search index")
        if should_stop is not None and should_stop():
            raise PromotionStopped("Stopped before the switch; nothing was changed.")
        build_index_for(lab, embedder)
        with lab.write_lock:
            # faces ingested while we worked: embed them too, so the new index is complete
            late = faces_without(lab, embedder.version)
            if late:
                embed_faces_with(lab, embedder, late)
                build_index_for(lab, embedder)
            previous = _swap(lab, info, embedder, user, action, in_use)
            lab.index()  # loads the index saved above (checked against the database)
        say(1.0, "Switched")
        return (f"Embedder switched to {info.label()}: {len(missing)} face(s) embedded"
                + (f" (was #{previous.id} {previous.name})" if previous else "") + ".")
    finally:
        _SWITCH_LOCK.release()


def promote(lab: Lab, version_id: int, progress: Progress | None = None,
            should_stop: Callable[[], bool] | None = None, user: str = "local") -> str:
    """Admin action: put a trained candidate into use."""
    return activate(lab, version_id, progress, should_stop, user, "promote")


def rollback(lab: Lab, kind: str, version_id: int | None = None, progress: Progress | None = None,
             user: str = "local") -> str:
    """Go back to ``version_id``, or to the model in use before the current one."""
    _kind(kind)
    if version_id is None:
        version_id = previous_version_id(lab, kind)
        if version_id is None:
            raise InvalidRequest(f"No earlier {kind} to roll back to; pick a version id from the list.")
    info = get_version(lab, version_id)
    if info.kind != kind:
        raise InvalidRequest(f"Version {version_id} is a {info.kind}, not a {kind}.")
    return activate(lab, version_id, progress, None, user, "rollback")


def previous_version_id(lab: Lab, kind: str) -> int | None:
    """The version that was in use before the current active one (from the audit log)."""
    current = active_version(lab, kind)
    if current is None:
        return None
    with lab.sessions() as session:
        entries = session.scalars(
            select(AuditLog).where(AuditLog.target_type == "model_version", AuditLog.target_id == current.id)
            .order_by(AuditLog.id.desc())
        ).all()
        for entry in entries:
            details = entry.details or {}
            if details.get("kind") == kind and details.get("from_id") is not None:
                return int(details["from_id"])
    return None


def apply_active_models(lab: Lab) -> list[str]:
    """At start-up: put the active rows' models into use instead of the settings'
    defaults. A version whose file is gone is reported and the default kept."""
    messages = []
    for kind in KINDS:
        info = active_version(lab, kind)
        if info is None:
            continue
        spec = resolve_spec(lab, info.spec)
        current = lab.detector if kind == "detector" else lab.embedder
        if spec == resolve_spec(lab, in_use_spec(lab, kind)) and _has_options(current, info.options):
            if getattr(current, "sha256", "") is None and info.sha256:
                current.sha256 = info.sha256  # not loaded yet: it will load only the registered file
            if kind == "embedder" and info.match_threshold is not None:
                lab.embedder.match_threshold = float(info.match_threshold)
                lab.settings = replace(lab.settings, match_threshold=None)
            continue
        try:
            model: FaceDetector | FaceEmbedder = build_detector(lab, info) if kind == "detector" else build_embedder(lab, info)
            model.load()
        except Exception as exc:  # noqa: BLE001 - any load failure: keep the default, say why
            msg = f"active {kind} {info.label()} could not be loaded ({exc}); using {in_use_spec(lab, kind)}"
            log.error(msg)
            messages.append(msg)
            continue
        _put_in_use(lab, kind, info, model, spec)
        messages.append(f"{kind}: {info.label()}")
    return messages


def versions_table(lab: Lab) -> list[list[Any]]:
    """Rows for the UI and the CLI: id, kind, name, version, in use, created, run, key metrics."""
    rows = []
    for v in list_versions(lab):
        keys = [k for k in v.summary if k not in ("note", "measured on")][:4]
        metrics = ", ".join(f"{k} {v.summary[k]:.3f}" if isinstance(v.summary[k], (int, float)) else f"{k} {v.summary[k]}"
                            for k in keys) or v.summary.get("note", "")
        if keys and v.summary.get("measured on"):
            metrics += f" (on the {v.summary['measured on']})"
        rows.append([v.id, v.kind, v.name, v.version, "yes" if v.active else "", f"{v.created_at:%Y-%m-%d %H:%M}",
                     v.run_id or "", metrics])
    return rows
