"""Face-like vectors for index benchmarks: real LFW embeddings plus generated identity
clusters fitted to them.

Random unit vectors are no test for approximate search (every index finds < 25 % of the
true neighbours among them, because in 128 dimensions they are all about equally far
apart). Face embeddings are clustered: a person's photos sit close together, people
spread out. So the benchmarks start from the dlib embeddings of the LFW library folder
(``bench/lfw_library.py``; copied, never written) and add synthetic people drawn from
two Gaussians fitted to it: centres from the spread of LFW's person means (with the part
a mean of few photos owes to within-person noise taken out), and photos from the pooled
within-person spread around each centre, scaled per person like a random LFW person's. ``describe`` compares same-person and
different-person similarities of the real and the generated part, so a reader can see
how face-like the generated part is.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import select  # noqa: E402

from storage.db import make_engine, session_factory  # noqa: E402
from storage.embedding_rows import fetch_embeddings  # noqa: E402
from storage.orm import Embedding, Face, Image  # noqa: E402

LFW_LIBRARY = Path.home() / "facelab-runs" / "ident-lfw" / "lab"


@dataclass
class FaceLike:
    vectors: np.ndarray  # (n, dim) float32, unit length
    person: np.ndarray  # (n,) int64: person index (LFW people first, then generated ones)
    real: int  # the first ``real`` rows are LFW embeddings


def lfw_embeddings(library: Path = LFW_LIBRARY) -> tuple[np.ndarray, np.ndarray, str]:
    """(unit vectors, person index, embedder version) of the LFW library, read from a copy."""
    source = library / "facelab.sqlite3"
    if not source.is_file():
        raise FileNotFoundError(f"no LFW library at {library}: build it with bench/lfw_library.py")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "facelab.sqlite3"
        shutil.copy2(source, copy)  # never open the shared folder itself
        engine = make_engine(f"sqlite:///{copy}")
        try:
            with session_factory(engine)() as session:
                version, dim = session.execute(select(Embedding.model_version, Embedding.dim).limit(1)).one()
                ids, vectors = fetch_embeddings(session, version, dim)
                names = dict(session.execute(select(Face.id, Image.original_name).join(Image)).all())
        finally:
            engine.dispose()
    people = [re.sub(r"_\d+\.\w+$", "", Path(names[int(i)]).name) for i in ids]
    _, person = np.unique(people, return_inverse=True)
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32), person.astype(np.int64), version


def fit_and_generate(real: np.ndarray, person: np.ndarray, total: int, per_person: int = 10,
                     seed: int = 0) -> FaceLike:
    """``real`` plus generated people (``per_person`` photos each) up to ``total`` vectors."""
    rng = np.random.default_rng(seed)
    counts = np.bincount(person)
    multi = np.flatnonzero(counts >= 2)
    means = np.stack([real[person == p].mean(axis=0) for p in multi])
    residuals = np.concatenate([real[person == p] - means[i] for i, p in enumerate(multi)])
    within = np.cov(residuals, rowvar=False) * len(residuals) / max(1, len(residuals) - len(multi))
    # the spread of means of n photos = spread of centres + within / n
    between = np.cov(means, rowvar=False) - within * float(np.mean(1.0 / counts[multi]))
    w, v = np.linalg.eigh(between)
    between = (v * np.clip(w, 1e-6, None)) @ v.T  # keep it a covariance
    centre = means.mean(axis=0)
    n_new = max(0, total - len(real))
    people = -(-n_new // per_person)
    centres = rng.multivariate_normal(centre, between, size=people, method="cholesky").astype(np.float32)
    noise = rng.multivariate_normal(np.zeros(real.shape[1]), within, size=people * per_person,
                                    method="cholesky").astype(np.float32)
    # people differ in how much their photos vary (pose, age, light): each generated
    # person's spread is scaled like a random LFW person's (those with >= 3 photos)
    pooled = float(np.sqrt(np.mean(np.sum(residuals**2, axis=1))))
    offsets = np.concatenate([[0], np.cumsum([counts[p] for p in multi])])
    scales = np.array([np.sqrt(np.mean(np.sum(residuals[offsets[i]:offsets[i + 1]] ** 2, axis=1))
                               * counts[p] / (counts[p] - 1)) / pooled
                       for i, p in enumerate(multi) if counts[p] >= 3])
    spread = rng.choice(scales, size=people).astype(np.float32)
    generated = np.repeat(centres, per_person, axis=0) + noise * np.repeat(spread, per_person)[:, None]
    generated = generated[:n_new]
    generated /= np.linalg.norm(generated, axis=1, keepdims=True)
    gen_person = person.max() + 1 + np.arange(n_new) // per_person
    return FaceLike(np.concatenate([real, generated]).astype(np.float32),
                    np.concatenate([person, gen_person]).astype(np.int64), len(real))


def describe(data: FaceLike, pairs: int = 20_000, seed: int = 1) -> dict[str, dict[str, float]]:
    """Same-person and different-person cosine similarities, real part vs generated part."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, lo, hi in (("lfw", 0, data.real), ("generated", data.real, len(data.vectors))):
        if hi - lo < 2:
            continue
        vec, who = data.vectors[lo:hi], data.person[lo:hi]
        a, b = rng.integers(0, hi - lo, pairs), rng.integers(0, hi - lo, pairs)
        diff = who[a] != who[b]
        order = np.argsort(who, kind="stable")
        starts = np.searchsorted(who[order], who[order])
        # a same-person partner for random rows (rows whose person has >= 2 photos)
        counts = np.bincount(who - who.min())[who[order] - who.min()]
        eligible = np.flatnonzero(counts >= 2)[: pairs]
        pick = rng.choice(eligible, size=min(pairs, len(eligible)), replace=False)
        partner = starts[pick] + (pick - starts[pick] + 1 + rng.integers(0, counts[pick] - 1)) % counts[pick]
        same_sims = np.sum(vec[order[pick]] * vec[order[partner]], axis=1)
        diff_sims = np.sum(vec[a[diff]] * vec[b[diff]], axis=1)
        out[name] = {"same_person_mean": float(same_sims.mean()), "same_person_std": float(same_sims.std()),
                     "different_mean": float(diff_sims.mean()), "different_std": float(diff_sims.std())}
    return out
