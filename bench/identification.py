"""Open-set identification on LFW through the app: enroll people, search with photos of
them and of strangers, and count who is named.

    python bench/identification.py [--split test] [--work DIR] [--galleries 100 1000 all]
        [--enrolled 1 2] [--modes before after] [--out docs/results/identification.json]

Everything goes through the app's own code: photos are ingested by ``pipeline.library.ingest``
(detector, landmarks, embedder, database, FAISS index) into a data folder
(``bench/lfw_library.py``, kept between runs); each protocol runs on a copy of it, where
gallery faces are named with ``pipeline.library.identities.enroll`` and every probe photo is
searched with ``pipeline.library.search.search_face`` (the photo's face as stored at ingest; a
sample is also searched with ``search_image`` on the photo's bytes, which must give the
same answers). The decision counted is the app's: ``SearchResult.best_person``.

Protocol, per split (``--split test``: LFW test identities, never used for any choice;
``train`` for development):

* people with at least e + 1 photos can be enrolled with e photos (``--enrolled``) and
  have probes (their other photos);
* the other people are split in two halves by a seeded draw: *strangers* (never
  enrolled; every photo of theirs is a stranger probe, the same set at every gallery
  size) and *distractors* (enrolled without probes, used to reach gallery sizes larger
  than the people with probes);
* gallery size G: G people (with probes first, then distractors; "all" = every
  candidate).

Modes: ``after`` is the app as it is (face-quality gate, primary face, 1:N threshold
calibrated by ``bench/fit_open_set.py`` on train identities). ``before`` reproduces the
previous behaviour: the detector's most confident box is enrolled and searched, no
quality gate, the fixed 1:1 threshold (``--before-threshold``, 0.913: LFW verification's
best-accuracy threshold).

Reported per mode, enrolled photos and gallery size: rank-1 and rank-5 (closed-set, over
enrolled people's probes), DIR (detection and identification rate: the probe's own person
ranked first AND above the threshold) at the thresholds letting in 1 % and 0.1 % of
strangers, and for the app's default decision: enrolled probes named correctly / named
wrongly, strangers named (FAR).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.lfw_library import (  # noqa: E402
    DEFAULT_WORK,
    LFW,
    PhotoFaces,
    copy_library,
    ensure_ingested,
    identities,
    photo_faces,
    photos_of,
)
from pipeline.context import Lab  # noqa: E402
from pipeline.library.identities import enroll  # noqa: E402
from pipeline.library.search import search_face, search_image  # noqa: E402
from pipeline.settings import Settings  # noqa: E402

BEFORE_THRESHOLD = 0.91345


def split_people(people: list[str], photos: dict[str, list[Path]], enrolled: int, seed: int) -> dict[str, list[str]]:
    rng = np.random.default_rng(seed)
    with_probes = [p for p in people if len(photos[p]) >= enrolled + 1]
    rest = [p for p in people if len(photos[p]) < enrolled + 1]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    return {"with_probes": [with_probes[i] for i in rng.permutation(len(with_probes))],
            "strangers": rest[: len(rest) // 2], "distractors": rest[len(rest) // 2:]}


def chosen_face(entry: PhotoFaces | None, mode: str) -> int | None:
    """The stored face id this mode enrolls or searches for a photo (None: no face)."""
    if entry is None:
        return None
    i = entry.primary() if mode == "after" else entry.most_confident()
    return None if i is None else entry.face_ids[i]


def run_protocol(work: Path, lib: dict[str, PhotoFaces], photos: dict[str, list[Path]], groups: dict[str, list[str]],
                 gallery_size: int | None, enrolled: int, mode: str, embedder: str, before_threshold: float,
                 max_probes: int, image_checks: int, seed: int) -> dict:
    gallery_people = groups["with_probes"] + groups["distractors"]
    if gallery_size is not None:
        gallery_people = gallery_people[:gallery_size]
    with_probes = set(groups["with_probes"])
    settings = dict(embedder=embedder)
    if mode == "before":
        settings.update(match_threshold=before_threshold, face_quality_gate=False)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="facelab-ident-") as tmp:
        copy = copy_library(work, Path(tmp) / "lab")
        with Lab.open(Settings(data_dir=copy, **settings)) as lab:
            enrolled_people = 0
            for person in gallery_people:
                faces = [chosen_face(lib.get(p.name), mode) for p in photos[person][:enrolled]]
                faces = [f for f in faces if f is not None]
                for face_id in faces:
                    enroll(lab, face_id, person, confirm_face=(mode == "before"))
                enrolled_people += bool(faces)
            genuine = [(person, p) for person in gallery_people if person in with_probes for p in photos[person][enrolled:]]
            if max_probes and len(genuine) > max_probes:
                genuine = [genuine[i] for i in sorted(rng.choice(len(genuine), max_probes, replace=False))]
            strangers = [(person, p) for person in groups["strangers"] for p in photos[person]]
            started = time.perf_counter()
            g = [_probe(lab, lib, path, mode) for _, path in genuine]
            s = [_probe(lab, lib, path, mode) for _, path in strangers]
            per_search = (time.perf_counter() - started) / max(1, len(g) + len(s))
            agreement = _image_path_agrees(lab, lib, genuine + strangers, image_checks, mode, rng)
    return {"gallery_people": enrolled_people, "gallery_faces": int(g[0]["gallery_faces"]) if g else 0,
            "threshold": g[0]["threshold"] if g else None, **_metrics(genuine, g, s),
            "search_face_ms": round(per_search * 1000, 1), "search_image_agrees": agreement}


def _probe(lab: Lab, lib: dict[str, PhotoFaces], path: Path, mode: str) -> dict:
    face_id = chosen_face(lib.get(path.name), mode)
    if face_id is None:
        return {"people": [], "decided": None, "gallery_faces": 0, "threshold": None}
    result = search_face(lab, face_id, k=5)
    face = result.faces[0]
    best = result.best_person
    return {"people": [(p.name, p.similarity) for p in face.people], "decided": best.name if best else None,
            "gallery_faces": result.gallery_faces, "threshold": result.threshold}


def _image_path_agrees(lab: Lab, lib: dict[str, PhotoFaces], probes: list[tuple[str, Path]], n: int, mode: str,
                       rng: np.random.Generator) -> dict | None:
    """Search a sample of probe photos by their bytes (detector -> landmarks -> embedder ->
    index, as a user's upload) and compare the decision with the stored-face path."""
    if not n or mode != "after":
        return None
    pick = rng.choice(len(probes), min(n, len(probes)), replace=False)
    same = 0
    for i in pick:
        _, path = probes[int(i)]
        by_bytes = search_image(lab, path.read_bytes(), path.name, k=5).best_person
        stored = _probe(lab, lib, path, mode)["decided"]
        same += (by_bytes.name if by_bytes else None) == stored
    return {"checked": len(pick), "same_decision": same}


def _metrics(genuine: list[tuple[str, Path]], g: list[dict], s: list[dict]) -> dict:
    truth = [person for person, _ in genuine]
    rank1 = np.mean([bool(r["people"]) and r["people"][0][0] == t for r, t in zip(g, truth)]) if g else float("nan")
    rank5 = np.mean([t in [n for n, _ in r["people"][:5]] for r, t in zip(g, truth)]) if g else float("nan")
    # identification scores: the true person's similarity when ranked first, else -inf
    g_scores = np.array([r["people"][0][1] if r["people"] and r["people"][0][0] == t else -np.inf
                         for r, t in zip(g, truth)])
    s_scores = np.array([r["people"][0][1] if r["people"] else -np.inf for r in s])
    out = {"genuine_probes": len(g), "stranger_probes": len(s),
           "rank1": round(float(rank1), 4), "rank5": round(float(rank5), 4)}
    for far in (0.01, 0.001):
        finite = np.sort(s_scores[np.isfinite(s_scores)])
        allowed = int(np.floor(far * len(s_scores)))  # strangers that may score >= t
        t = finite[-allowed - 1] + 1e-7 if allowed < len(finite) else -np.inf
        out[f"dir_at_far_{far:g}"] = round(float(np.mean(g_scores >= t)), 4)
    correct = np.mean([r["decided"] == t for r, t in zip(g, truth)]) if g else float("nan")
    wrong = np.mean([r["decided"] is not None and r["decided"] != t for r, t in zip(g, truth)]) if g else float("nan")
    far_default = np.mean([r["decided"] is not None for r in s]) if s else float("nan")
    out.update({"default_named_correctly": round(float(correct), 4), "default_named_wrongly": round(float(wrong), 4),
                "default_strangers_named": round(float(far_default), 4),
                "probes_without_face": int(sum(not r["people"] and r["gallery_faces"] == 0 for r in g + s))})
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lfw", type=Path, default=LFW)
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--split", choices=["train", "test"], default="test")
    ap.add_argument("--embedder", default="dlib")
    ap.add_argument("--galleries", nargs="+", default=["100", "1000", "all"])
    ap.add_argument("--enrolled", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--modes", nargs="+", choices=["before", "after"], default=["before", "after"])
    ap.add_argument("--before-threshold", type=float, default=BEFORE_THRESHOLD)
    ap.add_argument("--max-probes", type=int, default=0, help="at most N enrolled people's probes (0: all)")
    ap.add_argument("--image-checks", type=int, default=100, help="probes also searched by their bytes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "identification.json")
    args = ap.parse_args(argv)

    people = identities(args.lfw, args.split)
    photos = photos_of(args.lfw, people)
    with Lab.open(Settings(data_dir=args.work, embedder=args.embedder)) as lab:
        ensure_ingested(lab, [p for ps in photos.values() for p in ps])
        lab.index()  # saved and in step before the copies are made
        lib = photo_faces(lab)
        version = lab.model_version
    rows = []
    for enrolled in args.enrolled:
        groups = split_people(people, photos, enrolled, args.seed)
        for size in args.galleries:
            gallery = None if size == "all" else int(size)
            for mode in args.modes:
                row = run_protocol(args.work, lib, photos, groups, gallery, enrolled, mode, args.embedder,
                                   args.before_threshold, args.max_probes, args.image_checks, args.seed)
                row = {"mode": mode, "enrolled_photos": enrolled, "gallery": size, **row}
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"command": "python bench/identification.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": dt.date.today().isoformat(), "split": args.split, "embedder_version": version,
              "load_avg": os.getloadavg(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    return result


def plot(result: dict, path: Path) -> None:
    """Strangers named and enrolled people named correctly, before vs after, per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    settings = sorted({(r["enrolled_photos"], r["gallery"]) for r in rows},
                      key=lambda s: (s[0], float("inf") if s[1] == "all" else int(s[1])))
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    x = np.arange(len(settings))
    for ax, key, title in ((axes[0], "default_strangers_named", "strangers named as an enrolled person"),
                           (axes[1], "default_named_correctly", "enrolled people named correctly"),
                           (axes[2], "default_named_wrongly", "enrolled people named as someone else")):
        for offset, mode, colour in ((-0.2, "before", "#c44e52"), (0.2, "after", "#4c72b0")):
            values = [next((r[key] for r in rows if r["mode"] == mode and (r["enrolled_photos"], r["gallery"]) == s),
                           np.nan) * 100 for s in settings]
            ax.bar(x + offset, values, 0.4, label=mode, color=colour)
        ax.set_xticks(x, [f"{g} people\n{e} photo{'s' if e > 1 else ''}" for e, g in settings], fontsize=8)
        ax.set_ylabel("% of probes")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 100)
    axes[0].legend()
    fig.suptitle(f"Open-set search on LFW {result['split']} identities: the app's default decision", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
