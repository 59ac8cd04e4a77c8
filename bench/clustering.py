"""Grouping unknown faces on LFW: pairwise and BCubed precision / recall, before and after.

    python bench/clustering.py [--split test] [--work DIR] [--thresholds 0.913 ...]
        [--out docs/results/clustering.json]

The faces are each photo's primary face, as stored by the app's own ingest
(``bench/lfw_library.py``), of every person of the split (``test``: LFW test identities,
never used for a choice; ``train``: where the default threshold was chosen). Nobody is
named, so every face is an unknown face, as in the Data tab's "Find groups".

* ``after``: ``pipeline.library.clustering.cluster_faces`` as the app runs it (average linkage;
  groups smaller than ``min_faces`` are left out), at its default threshold
  (``default_threshold``).
* ``before``: the previous algorithm, kept here only as the baseline: DBSCAN-style
  single links between faces with ``min_faces`` neighbours within the threshold, at its
  default threshold (the embedder's 1:1 threshold).

``--thresholds`` also runs both at each given threshold.

Faces left out of every group count as groups of one. Reported: pairwise precision and
recall (over pairs of faces), BCubed precision and recall (per face, averaged), the
number of groups, the largest group and how many people it mixes, and how many groups
mix three or more people.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.lfw_library import DEFAULT_WORK, LFW, ensure_ingested, identities, photo_faces, photos_of  # noqa: E402
from pipeline.library.clustering import (  # noqa: E402
    DEFAULT_MAX_NEIGHBOURS,
    DEFAULT_MIN_FACES,
    _neighbours,
    _vectors,
    cluster_faces,
    default_threshold,
)
from pipeline.context import Lab  # noqa: E402
from pipeline.settings import Settings  # noqa: E402


def dbscan_groups(ids: np.ndarray, neighbours: list[list[tuple[int, float]]], min_faces: int) -> list[list[int]]:
    """The previous algorithm (pipeline/library/clustering.py before average linkage), verbatim in
    effect: core faces joined through single links, borders attached, noise dropped."""
    position = {int(f): i for i, f in enumerate(ids)}
    core = [len(n) + 1 >= min_faces for n in neighbours]
    parent = list(range(len(ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, found in enumerate(neighbours):
        if core[i]:
            for face, _ in found:
                j = position[face]
                if core[j]:
                    a, b = root(i), root(j)
                    if a != b:
                        parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(len(ids)):
        if core[i]:
            groups.setdefault(root(i), []).append(int(ids[i]))
    for i, found in enumerate(neighbours):
        if not core[i]:
            best = next((position[f] for f, _ in found if core[position[f]]), None)
            if best is not None:
                groups[root(best)].append(int(ids[i]))
    return list(groups.values())


def scores(groups: list[list[int]], truth: dict[int, str]) -> dict:
    """Pairwise and BCubed precision/recall; faces in no group are groups of one."""
    label = {}
    for g, members in enumerate(groups):
        for f in members:
            label[f] = g
    next_id = len(groups)
    for f in truth:
        if f not in label:
            label[f] = next_id
            next_id += 1
    by_group: dict[int, list[int]] = {}
    for f, g in label.items():
        by_group.setdefault(g, []).append(f)
    person_size = Counter(truth.values())
    same_group_pairs = same_group_same_person = 0
    b_precision = b_recall = 0.0
    for members in by_group.values():
        counts = Counter(truth[f] for f in members)
        n = len(members)
        same_group_pairs += n * (n - 1) // 2
        same_group_same_person += sum(c * (c - 1) // 2 for c in counts.values())
        for person, c in counts.items():
            b_precision += c * (c / n)
            b_recall += c * (c / person_size[person])
    same_person_pairs = sum(c * (c - 1) // 2 for c in person_size.values())
    mixes = [len(set(truth[f] for f in g)) for g in groups]
    largest = max(groups, key=len) if groups else []
    total = len(truth)
    return {
        "faces": total, "groups": len(groups), "faces_grouped": sum(len(g) for g in groups),
        "pairwise_precision": round(same_group_same_person / max(1, same_group_pairs), 4),
        "pairwise_recall": round(same_group_same_person / max(1, same_person_pairs), 4),
        "bcubed_precision": round(b_precision / total, 4), "bcubed_recall": round(b_recall / total, 4),
        "largest_group_faces": len(largest), "largest_group_people": len(set(truth[f] for f in largest)),
        "groups_mixing_3_or_more_people": int(sum(m >= 3 for m in mixes)),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lfw", type=Path, default=LFW)
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--split", choices=["train", "test"], default="test")
    ap.add_argument("--thresholds", nargs="*", type=float, default=None,
                    help="similarity thresholds to try (default: the app's default only)")
    ap.add_argument("--min-faces", type=int, default=DEFAULT_MIN_FACES)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "clustering.json")
    args = ap.parse_args(argv)

    people = identities(args.lfw, args.split)
    photos = photos_of(args.lfw, people)
    rows = []
    with Lab.open(Settings(data_dir=args.work)) as lab:
        ensure_ingested(lab, [p for ps in photos.values() for p in ps])
        lib = photo_faces(lab)
        truth: dict[int, str] = {}
        for person, paths in photos.items():
            for path in paths:
                entry = lib.get(path.name)
                main_face = entry.primary() if entry else None
                if main_face is not None:
                    truth[entry.face_ids[main_face]] = person
        face_ids = sorted(truth)
        ids, vectors = _vectors(lab, face_ids)

        def run(name: str, threshold: float, setting: str) -> None:
            if name == "before":
                groups = dbscan_groups(ids, _neighbours(lab, ids, vectors, threshold, DEFAULT_MAX_NEIGHBOURS),
                                       args.min_faces)
            else:
                groups = [c.face_ids for c in cluster_faces(lab, face_ids, threshold, args.min_faces)]
            row = {"algorithm": name, "setting": setting, "threshold": round(threshold, 4), "min_faces": args.min_faces,
                   **scores(groups, truth)}
            rows.append(row)
            print(json.dumps(row), flush=True)

        # each at the app's default: before, the 1:1 threshold; after, default_threshold()
        run("before", lab.match_threshold, "default")
        run("after", default_threshold(lab), "default")
        for threshold in args.thresholds or []:
            run("before", threshold, "sweep")
            run("after", threshold, "sweep")
    result = {"command": "python bench/clustering.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": dt.date.today().isoformat(), "split": args.split, "people": len(people), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
