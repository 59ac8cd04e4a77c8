"""``FaceAttributeModel``: emotion, age and gender of each face, from our own weights.

Two small weight files, each optional (the app runs without them, attributes absent):

* ``models/weights/emotion-fer2013.pt``: the emotion CNN (``emotion_net``) and the FER
  framing it expects (``framing``), trained by ``models.training.emotion_trainer``; or
  several such CNNs whose probabilities are averaged (an ensemble file, written by
  ``models.training.emotion_ensemble``);
* ``models/weights/age-gender-utkface.pt``: the trainable tail and heads of the
  age/gender model (``age_gender_net``), trained by
  ``models.training.age_gender_trainer`` on dlib-network activations; the frozen front
  is dlib's face ResNet from ``face_recognition_models`` (its hash must match the one
  the weights were trained on).

Both are read with ``torch.load(weights_only=True)`` (no pickled code) and never
replaced by a random network: a missing file is reported by name (``missing``) and
its attributes stay None. ``version`` names the files actually loaded (hash prefixes),
so stored attributes are recomputed when either changes.

Inference follows ingest's own path: boxes carry dlib 5-point landmarks (filled here if
missing); age/gender see the embedder's aligned 150 px chip and its mirror image
(averaged); emotion sees a 48x48 grey FER-framed crop and its mirror (averaged).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.align import face_chips, mirror_boxes
from models.attributes.age_gender_net import AgeGenderNet, expected_age
from models.attributes.emotion_net import EMOTIONS, EmotionEnsemble, EmotionNet, fold_batch_norm, predict_proba
from models.attributes.framing import Framing, fer_frames
from models.base import InferenceModel
from models.cpu_features import cpu_native_bf16
from models.errors import ModelInputError, WeightsNotFoundError
from models.types import FaceBox
from models.weights_locator import file_sha256

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
EMOTION_WEIGHTS = WEIGHTS_DIR / "emotion-fer2013.pt"
AGE_GENDER_WEIGHTS = WEIGHTS_DIR / "age-gender-utkface.pt"
EMOTION_FORMAT = "facelab-emotion/1"
#: several emotion networks in one file: ``members`` (fp16 state dicts) and ``meta["members"]``
#: (each one's width, dropout, epoch...); one framing for all, in ``meta["framing"]``
EMOTION_ENSEMBLE_FORMAT = "facelab-emotion-ensemble/1"
#: the emotion is named only when its probability reaches this; below it the face's
#: emotion is UNSURE (the probabilities are still stored). Chosen on the FER2013 select
#: split (from train; bench/fit_emotion_floor.py: the lowest floor whose named faces are
#: >= 80 % right): for the weights of 2026-11-30 (select accuracy 0.679), 0.55 names 66 %
#: of select faces, 81 % of them right (0.5 fell under 80 %: this run's label smoothing
#: is lighter, so its probabilities are sharper). FER2013 test figures: docs/attributes.md.
EMOTION_MIN_CONFIDENCE = 0.55
UNSURE = "unsure"
#: The smallest face each model reads (shorter box side, px). A smaller face holds too few
#: pixels: the app would upsample it into the model's input and the model would answer
#: anyway, with the confidence it learned on sharp faces. Below these sides the face gets
#: no emotion / age / gender (None, ``too_small``) instead of a guess, and the networks do
#: not run for it. Chosen by bench/attributes_by_size.py on the select splits (FER2013
#: train's held-out 10 %, UTKFace select; never the test sets): the smallest side from
#: which on the measure stays within 4 accuracy points (emotion) / 3 points (gender) / 1
#: year of MAE (age) of full resolution. docs/results/attributes_by_size.json has the
#: curves. Emotion was 32 px for the width-32 network (0.640 there, 3.9 points below its
#: full 0.679); the ensemble reads better from 24 px up (0.646 at 32 px) but sits 4.4
#: points below its own full-size 0.690 there, so the same rule now says 36 px (0.660).
#: (With 3 points it would be 40 px: the median box of FER2013's own 48x48 test faces
#: through our detector, the very faces its accuracy is quoted on.)
EMOTION_MIN_FACE_PX = 36
AGE_GENDER_MIN_FACE_PX = 24
#: written into ``version``: changing the policy recomputes stored attributes
SIZE_POLICY = f"min{EMOTION_MIN_FACE_PX}x{AGE_GENDER_MIN_FACE_PX}"


def models_in_version(version: str) -> tuple[bool, bool]:
    """(emotion model present, age/gender model present) for a ``FaceAttributeModel.version``
    string ("attr-emo<sha|none>-ag<sha|none>[-min..]"): which fields of a row stored under
    it were computed, so an empty one means "too small", not "no model"."""
    return not version.startswith("attr-emonone"), "-agnone" not in version


def age_gender_digest(version: str) -> str:
    """The age/gender weights' digest in a ``FaceAttributeModel.version`` ("" if none):
    whether two versions scored the same age/gender file, whatever the emotion file."""
    return version.split("-ag", 1)[1].split("-", 1)[0] if "-ag" in version else ""
AGE_GENDER_FORMAT = "facelab-age-gender/1"
HOW_TO_GET = {
    "emotion": "It ships with FaceLab (git checkout of models/weights/); to train it again: "
               "python -m models.training.emotion_trainer --fer FER2013_DIR --out RUN_DIR --export PATH "
               "for each network, then python -m models.training.emotion_ensemble PATH... --out FILE "
               "(docs/attributes.md).",
    "age_gender": "It ships with FaceLab (git checkout of models/weights/); to train it again: "
                  "python -m models.training.utk_data ... then python -m models.training.age_gender_trainer "
                  "... --export PATH (docs/attributes.md).",
}


@dataclass(frozen=True)
class FaceAttributes:
    """One face's attributes; a part whose model is absent is None."""

    emotion: str | None = None
    emotion_confidence: float | None = None
    emotion_probs: dict[str, float] | None = None
    age: float | None = None
    gender: str | None = None  #: "female" | "male"
    gender_confidence: float | None = None  #: probability of ``gender``
    #: the attribute-model version that produced them (set when read back from storage)
    model_version: str | None = None
    #: the face is too small for at least one model (``EMOTION_MIN_FACE_PX``,
    #: ``AGE_GENDER_MIN_FACE_PX``): its attributes are None by design, not missing
    too_small: bool = False

    def summary(self) -> str:
        """Short text for captions: 'happy 0.91 · 34 y · female 0.97'."""
        parts = []
        if self.emotion is not None:
            parts.append(f"{self.emotion} {self.emotion_confidence:.2f}")
        if self.age is not None:
            parts.append(f"{self.age:.0f} y")
        if self.gender is not None:
            parts.append(f"{self.gender} {self.gender_confidence:.2f}")
        if self.too_small and not parts:
            parts.append("too small to read")
        elif self.too_small and self.emotion is None:  # read for age/gender, not for emotion
            parts.insert(0, "emotion: face too small")
        return " · ".join(parts)


@dataclass
class _Loaded:
    path: Path
    sha: str
    meta: dict
    net: torch.nn.Module
    extra: dict = field(default_factory=dict)


MODEL_NAMES = {"emotion": "emotion model", "age_gender": "age/gender model"}


def _read(path: Path, formats: tuple[str, ...], what: str) -> dict:
    if not path.is_file():
        raise WeightsNotFoundError(MODEL_NAMES[what], path, HOW_TO_GET[what])
    doc = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(doc, dict) or doc.get("format") not in formats:
        raise ModelInputError(f"{path}: not a {' or '.join(formats)} weights file "
                              f"(format {doc.get('format') if isinstance(doc, dict) else '?'})")
    return doc


def _fp32(state: dict) -> dict:
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


class FaceAttributeModel(InferenceModel):
    """Emotion + age + gender per face box. A missing weights file is not an error:
    ``absent()`` lists it (``WeightsNotFoundError`` naming the file), ``missing_note()``
    says it in one sentence, and its part of every ``FaceAttributes`` stays None.
    Networks load on the first ``predict``; ``available`` and ``version`` only look at
    the files."""

    name = "attributes"

    def __init__(self, emotion_path: Path | str | None = EMOTION_WEIGHTS,
                 age_gender_path: Path | str | None = AGE_GENDER_WEIGHTS,
                 landmark_detector: object | None = None, flip: bool = True, precision: str = "auto") -> None:
        super().__init__()
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
        #: the emotion networks run under bf16 autocast where the CPU computes bf16 natively
        #: ("auto"): on the select split the shipped ensemble gave the same accuracy (0.690)
        #: with 99.8 % of answers equal to fp32's, at 1.4-1.9x the speed (docs/attributes.md).
        #: Like the embedder's precision it is not part of ``version``.
        self.bf16 = precision == "bf16" or (precision == "auto" and cpu_native_bf16())
        self.emotion_path = Path(emotion_path) if emotion_path is not None else None
        self.age_gender_path = Path(age_gender_path) if age_gender_path is not None else None
        self.landmark_detector = landmark_detector
        self.flip = flip
        self.missing: list[WeightsNotFoundError] = []
        self._emotion: _Loaded | None = None
        self._age_gender: _Loaded | None = None
        self._dlib = None  # frozen dlib network (the age/gender model's front)
        self._sha_cache: dict[str, tuple[object, str]] = {}

    # -- loading -------------------------------------------------------------------------
    def _load(self) -> None:
        self.missing = []
        if self.emotion_path is not None:
            try:
                self._emotion = self._load_emotion(self.emotion_path)
            except WeightsNotFoundError as exc:
                self.missing.append(exc)
        if self.age_gender_path is not None:
            try:
                self._age_gender = self._load_age_gender(self.age_gender_path)
            except WeightsNotFoundError as exc:
                self.missing.append(exc)
        for exc in self.missing:
            log.warning("face attributes: %s", exc)

    @staticmethod
    def _load_emotion(path: Path) -> _Loaded:
        doc = _read(path, (EMOTION_FORMAT, EMOTION_ENSEMBLE_FORMAT), "emotion")
        meta = doc["meta"]
        if list(meta["emotions"]) != list(EMOTIONS):
            raise ModelInputError(f"{path}: classes {meta['emotions']} differ from {list(EMOTIONS)}")

        def network(member_meta: dict, state: dict) -> EmotionNet:
            net = EmotionNet(int(member_meta["width"]), len(EMOTIONS), float(member_meta["dropout"]))
            net.load_state_dict(_fp32(state))
            return fold_batch_norm(net.eval())

        if doc["format"] == EMOTION_ENSEMBLE_FORMAT:
            if len(doc.get("members", ())) != len(meta.get("members", ())) or len(doc["members"]) < 2:
                raise ModelInputError(f"{path}: an ensemble file needs two or more members, each with its meta")
            net = EmotionEnsemble([network(m, st) for m, st in zip(meta["members"], doc["members"])]).eval()
        else:
            net = network(meta, doc["state_dict"])
        framing = Framing(**meta["framing"])
        return _Loaded(path, file_sha256(path), meta, net, {"framing": framing})

    def _load_age_gender(self, path: Path) -> _Loaded:
        from models.embedders.dlib_resnet import DlibEmbedder

        doc = _read(path, (AGE_GENDER_FORMAT,), "age_gender")
        meta = doc["meta"]
        dlib = DlibEmbedder(align=False)  # raises WeightsNotFoundError naming dlib's file
        dlib.load()
        if dlib.version != meta["dlib_version"]:
            raise ModelInputError(
                f"{path} was trained on {meta['dlib_version']} activations, but the installed dlib network is "
                f"{dlib.version}; retrain it (docs/attributes.md)")
        self._dlib = dlib._net
        net = AgeGenderNet(self._dlib, int(meta["cut"]), int(meta["hidden"]), float(meta["dropout"]))
        net.load_state_dict(_fp32(doc["state_dict"]))
        return _Loaded(path, file_sha256(path), meta, net.eval())

    # -- what is installed (cheap: no network is loaded to answer) ------------------------
    def _parts(self) -> dict[str, Path | None]:
        return {"emotion": self.emotion_path, "age_gender": self.age_gender_path}

    def absent(self) -> list[WeightsNotFoundError]:
        """One error per weights file that is not there (a part set to None is not asked for)."""
        return [WeightsNotFoundError(MODEL_NAMES[what], path, HOW_TO_GET[what])
                for what, path in self._parts().items() if path is not None and not path.is_file()]

    @property
    def available(self) -> bool:
        return any(path is not None and path.is_file() for path in self._parts().values())

    @property
    def version(self) -> str:
        """e.g. ``attr-emo3f2a9c1b20de-ag81c0e2d4a911`` (weights files' sha256 prefixes; a
        part whose file is absent is ``none``). Read from the files, not the loaded nets,
        so checking what needs recomputing never loads a network."""
        shas = {}
        for what, path in self._parts().items():
            if path is None or not path.is_file():
                shas[what] = "none"
            else:
                key = (str(path), path.stat().st_mtime_ns, path.stat().st_size)
                if self._sha_cache.get(what, (None,))[0] != key:
                    self._sha_cache[what] = (key, file_sha256(path)[:12])
                shas[what] = self._sha_cache[what][1]
        return f"attr-emo{shas['emotion']}-ag{shas['age_gender']}-{SIZE_POLICY}"

    def missing_note(self) -> str | None:
        """One sentence for the UI/CLI naming each absent weights file, or None."""
        absent = self.absent()
        if not absent:
            return None
        parts = [f"{exc.model}: {exc.path} not found" for exc in absent]
        return ("Face attributes " + ("off" if not self.available else "partly off") + ": " + "; ".join(parts)
                + ". See docs/attributes.md.")

    # -- inference -----------------------------------------------------------------------
    def trunk_cut_for(self, network_version: str, flip: bool) -> int | None:
        """Where the age/gender model joins dlib's network, if an embedder running that
        network (``network_version``, e.g. ``dlib-55533b28a958``) with the same mirroring
        can hand over its activations there (``predict(..., trunk=)``), so the front of
        the network runs once per face instead of twice; else None."""
        self.load()
        if self._age_gender is None or bool(flip) != self.flip or network_version != self._age_gender.meta["dlib_version"]:
            return None
        return int(self._age_gender.net.cut)

    def predict(self, image: np.ndarray, boxes: Sequence[FaceBox],
                trunk: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> list[FaceAttributes]:
        """Attributes per box. ``trunk``: the dlib activations at ``trunk_cut_for(...)`` of
        these boxes' plain and mirrored chips, as the embedder computed them (ingest);
        without it the age/gender model runs dlib's front itself. A face under
        ``EMOTION_MIN_FACE_PX`` / ``AGE_GENDER_MIN_FACE_PX`` gets None for that model's
        attributes and ``too_small`` (no network runs for it)."""
        self.load()
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ModelInputError(f"expected an HxWx3 uint8 RGB image, got {getattr(image, 'shape', None)}")
        boxes = list(boxes)
        if not boxes or (self._emotion is None and self._age_gender is None):
            return [FaceAttributes() for _ in boxes]
        sides = np.array([min(b.x2 - b.x1, b.y2 - b.y1) for b in boxes], dtype=np.float64)
        read_emotion = np.flatnonzero(sides >= EMOTION_MIN_FACE_PX) if self._emotion else np.zeros(0, int)
        read_age = np.flatnonzero(sides >= AGE_GENDER_MIN_FACE_PX) if self._age_gender else np.zeros(0, int)
        needed = sorted(set(read_emotion) | set(read_age))
        missing = [i for i in needed if boxes[i].landmarks is None]
        if missing and self.landmark_detector is not None:
            for i, b in zip(missing, self.landmark_detector.predict(image, [boxes[i] for i in missing])):
                boxes[i] = b
        emo = self._emotions(image, [boxes[i] for i in read_emotion]) if len(read_emotion) else None
        ag = None
        if len(read_age):
            if trunk is not None and any(t is not None and len(t) != len(boxes) for t in trunk):
                raise ModelInputError(f"trunk activations for {[None if t is None else len(t) for t in trunk]} "
                                      f"faces, {len(boxes)} boxes")
            part = None if trunk is None else tuple(None if t is None else t[torch.from_numpy(read_age)] for t in trunk)
            ag = self._ages_genders(image, [boxes[i] for i in read_age], part)
        emo_at = {int(i): k for k, i in enumerate(read_emotion)}
        ag_at = {int(i): k for k, i in enumerate(read_age)}
        out = []
        for i in range(len(boxes)):
            kw: dict = {"too_small": (self._emotion is not None and i not in emo_at)
                        or (self._age_gender is not None and i not in ag_at)}
            if i in emo_at:
                p = emo[emo_at[i]]
                k = int(p.argmax())
                kw.update(emotion=EMOTIONS[k] if p[k] >= EMOTION_MIN_CONFIDENCE else UNSURE,
                          emotion_confidence=float(p[k]),
                          emotion_probs={e: round(float(v), 4) for e, v in zip(EMOTIONS, p)})
            if i in ag_at:
                age, p_female = ag[0][ag_at[i]], ag[1][ag_at[i]]
                female = p_female >= 0.5
                kw.update(age=round(float(age), 1), gender="female" if female else "male",
                          gender_confidence=float(p_female if female else 1.0 - p_female))
            out.append(FaceAttributes(**kw))
        return out

    @torch.inference_mode()
    def _emotions(self, image: np.ndarray, boxes: list[FaceBox]) -> np.ndarray:
        frames = fer_frames(image, boxes, self._emotion.extra["framing"])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            p = predict_proba(self._emotion.net, torch.from_numpy(frames).unsqueeze(1), flip=self.flip)
        return p.float().numpy()

    @torch.inference_mode()
    def _ages_genders(self, image: np.ndarray, boxes: list[FaceBox],
                      trunk: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        from models.embedders.dlib_resnet import CHIP_PADDING, CHIP_SIZE

        net, cut = self._dlib, self._age_gender.net.cut
        if trunk is not None:
            fronts = [t for t in trunk[: 2 if self.flip else 1]]
            if any(t is None or len(t) != len(boxes) for t in fronts):
                raise ModelInputError(f"trunk activations for {[None if t is None else len(t) for t in fronts]} "
                                      f"faces, {len(boxes)} boxes")
        else:
            views = [face_chips(image, boxes, CHIP_SIZE, CHIP_PADDING)]
            if self.flip:
                views.append(face_chips(image[:, ::-1], mirror_boxes(boxes, image.shape[1]), CHIP_SIZE, CHIP_PADDING))
            fronts = [net.run_ops((torch.from_numpy(np.ascontiguousarray(c)).permute(0, 3, 1, 2).float() - net.mean)
                                  / 256.0, 0, cut) for c in views]
        ages, females = [], []
        for a in fronts:
            logits, g = self._age_gender.net(a)
            ages.append(expected_age(logits).numpy())
            females.append(torch.sigmoid(g).numpy())
        return np.mean(ages, axis=0), np.mean(females, axis=0)
