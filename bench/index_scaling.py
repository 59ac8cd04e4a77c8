"""Search index at 10k / 100k / 1M faces: exact (flat) vs HNSW, on face-like data.

    nice -n 19 python bench/index_scaling.py [--sizes 10000 100000 1000000] [--queries 1000]
        [--hnsw 32:128,256,512 32/flat:256,512] [--sq8] [--ef-construction 200]
        [--out docs/results/index_scaling.json]

Data (``bench/face_like.py``): the LFW library's dlib embeddings plus generated identity
clusters fitted to them, 10 photos per generated person. Queries: photos held out of the
index (half real LFW photos, half generated), whose people have other photos in it.

Per size and structure, through ``storage.faiss_index.FaceIndex`` (the app's own code
path: normalising, locks, label mapping): build time, memory (resident-set growth while
building, and the size of the saved files), recall@10 against exact search (numpy, all
vectors), and p50/p99 per single query on one thread, as wall time and as the thread's
CPU time (``time.thread_time``: what the query cost without the time a busy machine's
scheduler gave other processes; the closest this machine gets to an idle core). HNSW
variants: the app's (fp16 graph re-scored exactly, ``32:...``) and the float32 graph it
replaced (``32/flat:...``). Exact search, the first variant at its second efSearch and
every variant listing that efSearch too are timed interleaved, query by query, so a busy
machine slows them alike (``interleaved``; each exact query streams every vector through
the caches, so the HNSW query after it starts cold); every efSearch is also timed in its
own pass (``ef_search``). Also: ``among=`` searches (enrolled galleries of 1k and
50k faces, k=200 as ``rank_people`` asks) and tombstones (20 % removed, then searched).
Results are written after every step, so a long run can be read while it goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402

from bench.face_like import describe, fit_and_generate, lfw_embeddings  # noqa: E402
from storage.faiss_index import FaceIndex, IndexPolicy  # noqa: E402

K = 10


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def pct(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3)}


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 200_000) -> np.ndarray:
    """Row numbers of the exact top ``k`` per query (numpy, chunked)."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    for start in range(0, len(vectors), chunk):
        sims = queries @ vectors[start : start + chunk].T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        s = np.concatenate([best_s, np.take_along_axis(sims, part, axis=1)], axis=1)
        i = np.concatenate([best_i, part + start], axis=1)
        top = np.argsort(-s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s, top, axis=1), np.take_along_axis(i, top, axis=1)
    return best_i


def recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g[g >= 0]) & set(w)) / len(w) for g, w in zip(got, want, strict=True)]))


def split(data, n: int, queries: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """(index rows, query rows) out of the first n + queries vectors: queries are rows whose
    person keeps at least one other photo in the index; half real, half generated."""
    total = n + queries
    person = data.person[:total]
    counts = np.bincount(person)
    ok = np.flatnonzero(counts[person] >= 2)
    real_ok, gen_ok = ok[ok < data.real], ok[ok >= data.real]
    half = queries // 2 if len(gen_ok) else queries
    picked = rng.choice(real_ok, size=min(half, len(real_ok)), replace=False)
    if len(gen_ok):
        picked = np.concatenate([picked, rng.choice(gen_ok, size=queries - len(picked), replace=False)])
    # one query per person at most, so the person keeps a photo in the index
    _, first = np.unique(person[picked], return_index=True)
    picked = picked[np.sort(first)]
    mask = np.ones(total, bool)
    mask[picked] = False
    return np.flatnonzero(mask)[:n], picked


#: CPU seconds of each timed query (thread time: what the query cost, without the time
#: the busy machine's scheduler gave other processes), filled by timed()
CPU: dict[int, list[float]] = {}


def timed(index: FaceIndex, queries: np.ndarray, k: int = K, **kw) -> tuple[list[float], np.ndarray]:  # noqa: ANN003
    """Wall seconds per query and the ids found; CPU seconds go to CPU[id(returned list)]."""
    times, cpu, found = [], [], []
    for q in queries:
        c0, t0 = time.thread_time(), time.perf_counter()
        _, ids = index.search(q[None], k, **kw)
        times.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
        found.append(np.pad(ids[0], (0, k - len(ids[0])), constant_values=-1))
    CPU[id(times)] = cpu
    return times, np.stack(found)


def pct_cpu(times: list[float]) -> dict[str, float]:
    """pct() of wall time plus p50/p99 of the CPU time of the same queries."""
    out = pct(times)
    cpu = CPU.get(id(times))
    if cpu:
        ms = np.asarray(cpu) * 1000
        out.update({"cpu_p50_ms": round(float(np.percentile(ms, 50)), 3),
                    "cpu_p99_ms": round(float(np.percentile(ms, 99)), 3)})
    return out


def build(policy: IndexPolicy, ids: np.ndarray, vectors: np.ndarray, build_threads: int) -> tuple[FaceIndex, dict]:
    faiss.omp_set_num_threads(build_threads)
    before = rss_mb()
    t0 = time.perf_counter()
    index = FaceIndex.build("bench", vectors.shape[1], ids, vectors, policy=policy)
    seconds = time.perf_counter() - t0
    grown = rss_mb() - before
    with tempfile.TemporaryDirectory() as tmp:
        index.save(tmp)
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
    faiss.omp_set_num_threads(1)
    return index, {"kind": index.kind, "build_s": round(seconds, 1), "build_threads": build_threads,
                   "rss_growth_mb": round(grown, 1), "files_mb": round(size / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--hnsw", nargs="*", default=["32:128,256,512", "32/flat:256,512"],
                        help="M[/storage]:efSearch,... per HNSW variant; storage fp16 (default: the app's) or "
                             "flat (float32 graph, as before fp16). The first variant's second efSearch is timed "
                             "interleaved with exact search and with the variants that list it too")
    parser.add_argument("--ef-construction", type=int, default=IndexPolicy().ef_construction)
    parser.add_argument("--build-threads", type=int, default=2)
    parser.add_argument("--sq8", action="store_true", help="also raw faiss IndexHNSWSQ (8-bit) at M of the first variant")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "index_scaling.json")
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)

    real, person, version = lfw_embeddings()
    data = fit_and_generate(real, person, max(args.sizes) + args.queries)
    result: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": "python " + " ".join(sys.argv), "embedder": version, "data_similarity": describe(data),
        "search_threads": 1, "k": K, "sizes": {},
    }

    def write() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

    variants = []
    for spec in args.hnsw:
        m, efs = spec.split(":")
        m, _, storage = m.partition("/")
        variants.append((int(m), storage or "fp16", [int(e) for e in efs.split(",")]))

    for n in args.sizes:
        rows, qrows = split(data, n, args.queries, rng)
        vectors, queries = data.vectors[rows], data.vectors[qrows]
        ids = np.arange(1, n + 1, dtype=np.int64)
        t0 = time.perf_counter()
        truth = ids[exact_top(vectors, queries, K)]
        entry: dict = {"n": n, "queries": len(queries), "lfw_vectors": int(np.sum(rows < data.real)),
                       "exact_numpy_s": round(time.perf_counter() - t0, 1), "load_avg_start": os.getloadavg()[0]}
        result["sizes"][str(n)] = entry
        print(f"== {n:,} vectors, {len(queries)} queries (load {os.getloadavg()[0]:.1f})", flush=True)

        flat, info = build(IndexPolicy(hnsw_above=10**12), ids, vectors, args.build_threads)
        entry["flat"] = info
        write()
        built: list[tuple[str, FaceIndex, IndexPolicy, list[int]]] = []
        for m, storage, efs in variants:
            policy = IndexPolicy(hnsw_above=0, hnsw_m=m, ef_construction=args.ef_construction, ef_search=efs[0],
                                 hnsw_storage=storage)
            hnsw, info = build(policy, ids, vectors, args.build_threads)
            name = f"hnsw_m{m}" + ("" if storage == "fp16" else f"_{storage}")
            print(f"   {name}: built in {info['build_s']} s, +{info['rss_growth_mb']} MB", flush=True)
            entry[name] = {"build": info, "storage": storage, "ef_search": {}}
            built.append((name, hnsw, policy, efs))
            write()
        # the first variant at its second efSearch is timed interleaved, query by query, with
        # exact search and with every other variant listing the same efSearch: a busy machine
        # slows them alike, so their ratios hold
        _, _, _, first_efs = built[0]
        cmp_ef = first_efs[min(1, len(first_efs) - 1)]
        together = [(flat, "flat", None)] + [(h, name, replace(p, ef_search=cmp_ef, ef_search_large=cmp_ef))
                                              for name, h, p, efs in built if cmp_ef in efs]
        for h, _, p in together[1:]:
            h._store.policy = p
        walls: dict[str, list[float]] = {name: [] for _, name, _ in together}
        cpus: dict[str, list[float]] = {name: [] for _, name, _ in together}
        found: dict[str, list[np.ndarray]] = {name: [] for _, name, _ in together}
        for q in queries:
            for h, name, _ in together:
                t, f = timed(h, q[None])
                walls[name] += t
                cpus[name] += CPU.pop(id(t))
                found[name].append(f[0])
        for name in walls:
            CPU[id(walls[name])] = cpus[name]
        flat_p50 = np.percentile(walls["flat"], 50)
        entry["flat"].update({"recall_at_10": recall(np.stack(found["flat"]), truth), **pct_cpu(walls["flat"])})
        for _, name, _ in together[1:]:
            row = {"recall_at_10": recall(np.stack(found[name]), truth), **pct_cpu(walls[name]),
                   "interleaved_with": [o for _, o, _ in together if o != name],
                   "p50_ratio_to_flat": round(np.percentile(walls[name], 50) / flat_p50, 4), "load_avg": os.getloadavg()[0]}
            entry[name]["interleaved"] = {"ef_search": cmp_ef, **row}
            print(f"   {name} ef{cmp_ef} (interleaved): recall@10 {row['recall_at_10']:.4f} p50 {row['p50_ms']} "
                  f"p99 {row['p99_ms']} ms (CPU p50 {row.get('cpu_p50_ms')} p99 {row.get('cpu_p99_ms')})", flush=True)
        write()
        for name, hnsw, policy, efs in built:
            for ef in efs:  # each in its own pass too: exact search between queries empties the caches
                hnsw._store.policy = replace(policy, ef_search=ef, ef_search_large=ef)
                t, got = timed(hnsw, queries)
                row = {"recall_at_10": recall(got, truth), **pct_cpu(t), "load_avg": os.getloadavg()[0]}
                entry[name]["ef_search"][str(ef)] = row
                print(f"   {name} ef{ef}: recall@10 {row['recall_at_10']:.4f} p50 {row['p50_ms']} "
                      f"p99 {row['p99_ms']} ms (CPU p50 {row.get('cpu_p50_ms')} p99 {row.get('cpu_p99_ms')})", flush=True)
                write()
        name, hnsw, policy, _ = built[0]
        hnsw._store.policy = replace(policy, ef_search=cmp_ef, ef_search_large=cmp_ef)
        entry["among"] = among_bench(flat, hnsw, ids, queries, rng)
        entry["tombstones"] = tombstone_bench(hnsw, ids, vectors, queries, rng)
        write()
        del built, hnsw, together
        print(f"   flat: p50 {entry['flat'].get('p50_ms')} p99 {entry['flat'].get('p99_ms')} ms "
              f"(CPU p50 {entry['flat'].get('cpu_p50_ms')} p99 {entry['flat'].get('cpu_p99_ms')})", flush=True)
        del flat
        if args.sq8:
            entry["hnsw_sq8"] = sq8_bench(variants[0][0], args.ef_construction, variants[0][2], vectors, queries,
                                          truth, ids, args.build_threads)
            write()
    result["load_avg_end"] = os.getloadavg()[0]
    write()
    print(f"wrote {args.out}")


def among_bench(flat: FaceIndex, hnsw: FaceIndex, ids: np.ndarray, queries: np.ndarray,
                rng: np.random.Generator) -> dict:
    """``among=`` as rank_people uses it (k=200 over the enrolled faces)."""
    out = {}
    for gallery in (1_000, 50_000):
        if gallery >= len(ids):
            continue
        among = np.sort(rng.choice(ids, size=gallery, replace=False))
        k = 200
        qs = queries[:200]
        t_f, want = timed(flat, qs, k, among=among)
        t_h, got = timed(hnsw, qs, k, among=among)
        out[str(gallery)] = {"k": k, "flat": pct_cpu(t_f), "hnsw": pct_cpu(t_h), "recall_at_200_vs_exact": recall(got, want),
                             "path": "exact over the gathered candidates" if gallery <= hnsw.policy.exact_candidates
                             else "HNSW with an id selector"}
        print(f"   among {gallery}: flat p50 {out[str(gallery)]['flat']['p50_ms']} hnsw p50 "
              f"{out[str(gallery)]['hnsw']['p50_ms']} ms, recall {out[str(gallery)]['recall_at_200_vs_exact']:.4f}",
              flush=True)
    return out


def tombstone_bench(hnsw: FaceIndex, ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray,
                    rng: np.random.Generator) -> dict:
    """Remove 15 % (below the rebuild share): searches skip the tombstones."""
    gone = rng.choice(ids, size=int(0.15 * len(ids)), replace=False)
    t0 = time.perf_counter()
    hnsw.remove(gone)
    remove_s = time.perf_counter() - t0
    keep = np.ones(len(ids), bool)
    keep[gone - 1] = False
    truth = ids[keep][exact_top(vectors[keep], queries, K)]
    t, got = timed(hnsw, queries)
    out = {"removed": len(gone), "remove_s": round(remove_s, 2), "dead": int(hnsw._store.dead),
           "recall_at_10": recall(got, truth), "returned_removed": int(np.isin(got, gone).sum()), **pct_cpu(t)}
    print(f"   15% tombstones: recall@10 {out['recall_at_10']:.4f} p50 {out['p50_ms']} p99 {out['p99_ms']} ms", flush=True)
    return out


def sq8_bench(m: int, ef_construction: int, efs: list[int], vectors: np.ndarray, queries: np.ndarray,
              truth: np.ndarray, ids: np.ndarray, threads: int) -> dict:
    faiss.omp_set_num_threads(threads)
    before = rss_mb()
    t0 = time.perf_counter()
    index = faiss.IndexHNSWSQ(vectors.shape[1], faiss.ScalarQuantizer.QT_8bit, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.train(vectors[: min(len(vectors), 200_000)])
    index.add(vectors)
    out: dict = {"build_s": round(time.perf_counter() - t0, 1), "rss_growth_mb": round(rss_mb() - before, 1),
                 "ef_search": {}}
    faiss.omp_set_num_threads(1)
    for ef in efs:
        params = faiss.SearchParametersHNSW(efSearch=ef)
        times, cpu, found = [], [], []
        for q in queries:
            c1, t1 = time.thread_time(), time.perf_counter()
            _, at = index.search(q[None], K, params=params)
            times.append(time.perf_counter() - t1)
            cpu.append(time.thread_time() - c1)
            found.append(ids[at[0]])
        CPU[id(times)] = cpu
        out["ef_search"][str(ef)] = {"recall_at_10": recall(np.stack(found), truth), **pct_cpu(times)}
        print(f"   HNSW-SQ8 M{m} ef{ef}: {out['ef_search'][str(ef)]}", flush=True)
    return out


if __name__ == "__main__":
    main()
