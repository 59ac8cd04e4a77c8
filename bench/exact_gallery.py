"""CPU time of the exact enrolled-gallery score (``among=`` lists up to
``IndexPolicy.exact_candidates``): one query against N gathered vectors, top 200.

    python bench/exact_gallery.py [--sizes 20000 50000 100000 200000] [--out docs/results/exact_gallery.json]

This is ``storage.faiss_index._exact_top`` as ``FaceIndex.search(..., among=...)`` runs it
over its cached gathered matrix, one thread. Its cost does not depend on what the
vectors are (random ones here); its recall is 1.0 by construction. Compare: an HNSW graph
of 1M face-like vectors searched among 50,000 of them through an id selector took 47 ms
at recall@200 0.747 (docs/results/index_scaling_1m_efc200.json, ``among``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from storage.faiss_index import _exact_top  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 50_000, 100_000, 200_000])
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "exact_gallery.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for n in args.sizes:
        matrix = rng.standard_normal((n, 128)).astype(np.float32)
        labels = np.arange(n, dtype=np.int64)
        times = []
        for _ in range(args.queries):
            q = rng.standard_normal((1, 128)).astype(np.float32)
            c0 = time.process_time()
            _exact_top(q, matrix, labels, 200)
            times.append(time.process_time() - c0)
        ms = np.asarray(times) * 1000
        rows.append({"gallery": n, "cpu_p50_ms": round(float(np.median(ms)), 2),
                     "cpu_p99_ms": round(float(np.percentile(ms, 99)), 2), "cache_mb": round(n * 128 * 4 / 1e6, 1)})
        print(json.dumps(rows[-1]), flush=True)
    out = {"command": "python " + " ".join(sys.argv), "k": 200, "dim": 128, "queries": args.queries,
           "load_avg": os.getloadavg()[0], "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
