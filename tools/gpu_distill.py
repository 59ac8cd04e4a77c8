"""Distil the dlib teacher into our ResNet50 on a lent GPU, in one short run.

The CPU recipe (``models.training.distill_trainer``, chips made by the app's own
detect -> landmarks -> align path in ``distill_data``) is unchanged; this module only
moves it onto a GPU machine that can take 64 MiB per call and gives back 64 MiB:

CPU side (repo root; writes into the git-ignored ``gpu_payload/``)::

    python -m tools.gpu_distill pack --store ~/facelab-runs/embedder-data \\
        --store ~/facelab-runs/embedder-data-utk --budget-mib 44 --budget-mib 52

writes ``gpu_payload/emb0`` (the teacher's weights + the first chip shard, with every
held-out quick-eval chip) and ``gpu_payload/emb1`` ... (more training chips), each under
its budget, chips as WebP. Carry one folder per device call; a run trains on every
shard it finds (``--payload`` folders).

GPU side::

    python -m tools.gpu_distill train --payload gpu_payload/emb0 --payload /tmp/stage/emb1 \\
        --out $OUT/emb --minutes 7

What runs there is the CPU recipe: the same chips, the same augmentation
(``chip_augment.augment_batch``, run by CPU worker processes), the same losses
(``distill_losses``: cosine to the teacher + relational term around the teacher's
mean), the same student (``ResNet50EmbeddingNet``, 128-d, 112 px input through
``chips_to_tensor``), with the teacher (dlib's ResNet, flip-averaged) on the same
augmented chip ("consistent teaching"), bf16 autocast + channels_last for the student
and a cosine learning rate over the time budget instead of over a step count (the
speed of a machine one has never seen is unknown beforehand).

Two things differ from the CPU path, and the model card says so: chips travel as
WebP (quality in the pack report), and the teacher's weights travel as fp16 (the
teacher still computes in fp32, its convolutions in cuDNN's default TF32 on a Hopper GPU;
``pack`` prints the cosine between the fp32 and the fp16 teacher on real chips).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = REPO / "gpu_payload"
TEACHER_FILE = "dlib_teacher_fp16.pt"


# ----------------------------------------------------------------------------- CPU: pack


def _encode_webp(chip: np.ndarray, quality: int) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".webp", np.ascontiguousarray(chip[:, :, ::-1]), [cv2.IMWRITE_WEBP_QUALITY, int(quality)])
    if not ok:
        raise ValueError("WebP encoding failed")
    return buf.tobytes()


def _decode_webp(data: bytes) -> np.ndarray:
    import cv2

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("WebP decoding failed")
    return np.ascontiguousarray(img[:, :, ::-1])


def save_teacher_fp16(path: Path) -> dict[str, Any]:
    """dlib's network as fp16 tensors + its op list (no pickle of our classes)."""
    import torch
    from dataclasses import asdict

    from models.embedders.dlib_resnet import DlibEmbedder

    emb = DlibEmbedder(align=False)
    emb._load()
    net = emb._net
    doc = {"format": "facelab-dlib-teacher/1", "version": emb.version,
           "ops": [asdict(op) for op in net.ops], "mean": net.mean.flatten().tolist(),
           "weights": [w.detach().half() for w in net.weights], "biases": [b.detach().float() for b in net.biases]}
    torch.save(doc, path)
    return {"teacher": emb.version, "teacher_bytes": path.stat().st_size}


def load_teacher(path: Path, device: str):
    """The fp16-stored dlib network as a ``DlibResNet``-like module in fp32."""
    import torch
    from torch import nn

    from models.embedders.dlib_resnet import DlibResNet, _Op

    doc = torch.load(path, map_location="cpu", weights_only=True)
    net = DlibResNet.__new__(DlibResNet)
    nn.Module.__init__(net)
    net.register_buffer("mean", torch.tensor(doc["mean"], dtype=torch.float32).view(1, 3, 1, 1))
    net.weights = nn.ParameterList([nn.Parameter(w.float(), requires_grad=False) for w in doc["weights"]])
    net.biases = nn.ParameterList([nn.Parameter(b.float(), requires_grad=False) for b in doc["biases"]])
    net.ops = [_Op(**{**o, "size": tuple(o["size"]), "stride": tuple(o["stride"]), "padding": tuple(o["padding"])})
               for o in doc["ops"]]
    net.input_size = 150
    net.output_dim = int(net.weights[-1].shape[0])
    return net.to(device).eval(), doc["version"]


def _store_rows(opened: dict[Path, Any]) -> list[tuple[Path, Any]]:
    """Every chip of the (opened) stores, a photo taken once (the first store that holds
    it); a store still being filled is read as it was when opened."""
    seen: set[tuple[str, str]] = set()
    rows: list[tuple[Path, Any]] = []
    for root, store in opened.items():
        recs = store.records()
        files = {(r.source, r.file) for r in recs}
        for r in recs:
            if (r.source, r.file) in seen:
                continue
            rows.append((root, r))
        seen |= files
    return rows


def pack(stores: list[Path], out: Path, budgets_mib: list[float], quality: int, eval_quality: int, seed: int) -> dict:
    from models.training.face_chip_store import ChipStore

    opened = {root: ChipStore(root) for root in stores}
    rows = _store_rows(opened)
    train = [(root, r) for root, r in rows if r.split == "train"]
    evals = [(root, r) for root, r in rows if r.split == "eval"]
    rng = np.random.default_rng(seed)
    train = [train[i] for i in rng.permutation(len(train))]  # each shard a random sample of all sources
    # the teacher's mean vector over ALL training chips (stored clean-chip vectors), as DistillRun
    centre = np.zeros(128, np.float64)
    for root, r in train:
        centre += opened[root].teacher[r.index]
    centre /= max(1, len(train))

    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"stores": [str(s) for s in stores], "webp_quality": quality,
                              "eval_webp_quality": eval_quality, "train_chips_total": len(train),
                              "eval_chips": len(evals), "shards": []}
    first = out / "emb0"
    first.mkdir(parents=True, exist_ok=True)
    report.update(save_teacher_fp16(first / TEACHER_FILE))
    report["teacher_fp16_vs_fp32"] = teacher_fp16_check(first / TEACHER_FILE, opened, train[:256])
    eval_pairs = json.loads((stores[0] / "eval_pairs.json").read_text())
    it = iter(train)
    pending: tuple[Path, Any] | None = None
    for k, budget in enumerate(budgets_mib):
        folder = out / f"emb{k}"
        folder.mkdir(parents=True, exist_ok=True)
        used = sum(f.stat().st_size for f in folder.iterdir() if f.name != "shard.npz")
        limit = int(budget * 1024 * 1024) - used - 200_000  # room for the index arrays
        blobs: list[bytes] = []
        meta: list[dict[str, Any]] = []
        size = 0
        if k == 0:
            for root, r in evals:
                b = _encode_webp(np.asarray(opened[root].chips[r.index]), eval_quality)
                blobs.append(b)
                size += len(b)
                meta.append({"source": r.source, "file": r.file, "split": r.split, "identity": r.identity})
        while True:
            item = pending if pending is not None else next(it, None)
            pending = None
            if item is None:
                break
            root, r = item
            b = _encode_webp(np.asarray(opened[root].chips[r.index]), quality)
            if size + len(b) > limit:
                pending = item
                break
            blobs.append(b)
            size += len(b)
            meta.append({"source": r.source, "file": r.file, "split": r.split, "identity": r.identity})
        offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        np.savez(folder / "shard.npz", data=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets,
                 meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
        info = {"shard": k, "chips": len(meta), "train_chips": sum(m["split"] == "train" for m in meta),
                "bytes": (folder / "shard.npz").stat().st_size,
                "folder_bytes": sum(f.stat().st_size for f in folder.iterdir())}
        report["shards"].append(info)
        print(json.dumps(info), flush=True)
    left = (1 if pending is not None else 0) + sum(1 for _ in it)
    report["train_chips_left_out"] = left
    (first / "run_facts.json").write_text(json.dumps({"teacher_centre": centre.round(7).tolist(),
                                                      "eval_pairs": eval_pairs["pairs"], "pack": report}))
    return report


def teacher_fp16_check(path: Path, opened: dict, sample: list) -> dict[str, float]:
    """Cosine between the app's fp32 teacher and the fp16-stored one on real chips."""
    import torch

    from models.embedders.dlib_resnet import DlibEmbedder

    chips = np.stack([np.asarray(opened[root].chips[r.index]) for root, r in sample])
    ref = DlibEmbedder(align=False).embed_chips(chips)
    net, _ = load_teacher(path, "cpu")
    with torch.inference_mode():
        y = net(torch.from_numpy(chips).permute(0, 3, 1, 2).float())
    y = (y / y.norm(dim=1, keepdim=True)).numpy()
    cos = np.sum(ref * y, axis=1)
    return {"chips": len(chips), "cos_min": round(float(cos.min()), 6), "cos_median": round(float(np.median(cos)), 6)}


# ----------------------------------------------------------------------------- GPU: train


def _decode_many(args: tuple[np.ndarray, np.ndarray, int, int]) -> np.ndarray:
    data, offsets, lo, hi = args
    return np.stack([_decode_webp(data[offsets[i]:offsets[i + 1]].tobytes()) for i in range(lo, hi)])


def load_shards(folders: list[Path], workers: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    from multiprocessing import Pool

    chips, meta = [], []
    for folder in folders:
        f = folder / "shard.npz"
        if not f.is_file():
            print(f"no shard in {folder}, skipped", flush=True)
            continue
        z = np.load(f)
        data, offsets = z["data"], z["offsets"]
        m = json.loads(z["meta"].tobytes())
        n = len(m)
        step = max(1, math.ceil(n / (workers * 4)))
        with Pool(workers) as pool:
            parts = pool.map(_decode_many, [(data, offsets, lo, min(n, lo + step)) for lo in range(0, n, step)])
        chips.append(np.concatenate(parts))
        meta += m
        print(f"{folder}: {n} chips decoded", flush=True)
    return np.concatenate(chips), meta


class _Batches:
    """Batch k = augment_batch of the chips at ``order[k]`` (CPU worker processes)."""

    def __init__(self, chips: np.ndarray, order: np.ndarray, seed: int, augment) -> None:
        self.chips, self.order, self.seed, self.augment = chips, order, seed, augment

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int):
        import torch

        from models.training.chip_augment import augment_batch

        idx = np.sort(self.order[k])
        return torch.from_numpy(idx), torch.from_numpy(augment_batch(self.chips[idx], self.seed, k, self.augment))


def train(payloads: list[Path], out: Path, minutes: float, batch: int, lr: float, warmup_frac: float,
          weight_decay: float, workers: int, eval_every_s: float, seed: int,
          centred_weight: float = 0.0) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from models.embedders.resnet50 import ResNet50EmbeddingNet, chips_to_tensor, save_checkpoint
    from models.evaluation.verification import best_threshold, kfold_accuracy, roc_auc
    from models.training.chip_augment import ChipAugmentConfig
    from models.training.distill_trainer import EMA, DistillConfig, distill_losses

    t_start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"

    def log(row: dict[str, Any]) -> None:
        row = {"t": round(time.monotonic() - t_start, 1), **row}
        print(json.dumps(row), flush=True)
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    # the teacher runs in fp32 except its convolutions, which take cuDNN's default (TF32 on
    # Hopper); quick-eval accuracy of its targets: 0.980 on the H200 and in a CPU dry run
    torch.backends.cuda.matmul.allow_tf32 = False
    first = payloads[0]
    facts = json.loads((first / "run_facts.json").read_text())
    chips, meta = load_shards(payloads, workers)
    log({"event": "data", "chips": len(chips), "train": sum(m["split"] == "train" for m in meta),
         "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__})
    train_idx = np.asarray([i for i, m in enumerate(meta) if m["split"] == "train"], np.int64)
    eval_by_file = {m["file"]: i for i, m in enumerate(meta) if m["split"] == "eval" and m["source"] == "lfw"}
    pairs = [p for p in facts["eval_pairs"] if p["a"] in eval_by_file and p["b"] in eval_by_file]
    e_a = np.asarray([eval_by_file[p["a"]] for p in pairs])
    e_b = np.asarray([eval_by_file[p["b"]] for p in pairs])
    e_same = np.asarray([bool(p["same"]) for p in pairs])
    e_fold = np.asarray([int(p["fold"]) for p in pairs])
    ids_eval = np.asarray(sorted(eval_by_file.values()), np.int64)

    cfg = DistillConfig(batch_size=batch, lr=lr, weight_decay=weight_decay, seed=seed)
    augment = ChipAugmentConfig()
    centre = torch.tensor(facts["teacher_centre"], dtype=torch.float32, device=device)
    teacher, teacher_version = load_teacher(first / TEACHER_FILE, device)

    # enough batches for any speed: epochs of seeded permutations, drop_last
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5A3]))
    per_epoch = len(train_idx) // batch
    epochs = 400
    order = np.concatenate([train_idx[rng.permutation(len(train_idx))][: per_epoch * batch].reshape(per_epoch, batch)
                            for _ in range(epochs)])
    loader = torch.utils.data.DataLoader(_Batches(chips, order, seed, augment), batch_size=None, shuffle=False,
                                         num_workers=workers, pin_memory=device == "cuda", prefetch_factor=6,
                                         persistent_workers=False)

    torch.manual_seed(seed)
    net = ResNet50EmbeddingNet(cfg.embedding_dim).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay, fused=device == "cuda")
    ema = EMA(net, cfg.ema_decay)
    ema_params, net_params = list(ema.net.parameters()), list(net.parameters())
    ema_bufs, net_bufs = list(ema.net.buffers()), list(net.buffers())

    @torch.no_grad()
    def ema_update() -> None:
        """``EMA.update`` with one fused kernel per list instead of one per tensor."""
        ema.updates += 1
        d = min(ema.decay, (1 + ema.updates) / (10 + ema.updates))
        torch._foreach_mul_(ema_params, d)
        torch._foreach_add_(ema_params, net_params, alpha=1 - d)
        torch._foreach_copy_(ema_bufs, net_bufs)

    @torch.no_grad()
    def teacher_targets(x255: torch.Tensor) -> torch.Tensor:
        both = teacher(torch.cat([x255, x255.flip(3)]))
        both = F.normalize(both.float(), dim=1)
        n = x255.shape[0]
        return F.normalize(both[:n] + both[n:], dim=1)

    @torch.no_grad()
    def embed(model, idx: np.ndarray) -> np.ndarray:
        model.eval()
        outs = []
        for s in range(0, len(idx), 256):
            u8 = torch.from_numpy(chips[idx[s:s + 256]]).to(device)
            x = chips_to_tensor(u8, cfg.input_size, cfg.mean, cfg.std, device).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                y = model(x)
            outs.append(F.normalize(y.float(), dim=1).cpu().numpy())
        model.train()
        return np.concatenate(outs)

    def pair_metrics(v: np.ndarray) -> dict[str, float]:
        s = np.sum(v[e_a] * v[e_b], axis=1)
        kf = kfold_accuracy(s, e_same, e_fold)
        thr, _ = best_threshold(s, e_same)
        return {"acc": round(kf.mean, 5), "auc": round(roc_auc(s, e_same), 5), "threshold_all_pairs": round(thr, 5)}

    def evaluate(step: int, epoch: float) -> dict[str, Any]:
        t0 = time.monotonic()
        row: dict[str, Any] = {"event": "eval", "step": step, "epoch": round(epoch, 3), "pairs": len(pairs)}
        if len(pairs) >= 20:
            tvec = np.zeros((len(meta), 128), np.float32)
            allv = np.zeros((len(meta), 128), np.float32)
            for s in range(0, len(ids_eval), 256):
                ids = ids_eval[s:s + 256]
                u8 = torch.from_numpy(chips[ids]).to(device)
                tvec[ids] = teacher_targets(u8.permute(0, 3, 1, 2).float()).cpu().numpy()
            row["teacher"] = pair_metrics(tvec)
            allv[ids_eval] = embed(net, ids_eval)
            row["student"] = pair_metrics(allv)
            allv[ids_eval] = embed(ema.net, ids_eval)
            row["ema"] = pair_metrics(allv)
        row["eval_s"] = round(time.monotonic() - t0, 1)
        log(row)
        return row

    budget = 60.0 * minutes
    t_train = time.monotonic()
    last_eval = t_train
    step = 0
    evals: list[dict[str, Any]] = []
    window: list[dict[str, float]] = []
    t_window = time.monotonic()
    for _idx, u8 in loader:
        elapsed = time.monotonic() - t_train
        if elapsed >= budget:
            break
        p = elapsed / budget
        cur_lr = lr * (p / warmup_frac if p < warmup_frac else 0.5 * (1 + math.cos(math.pi * (p - warmup_frac) / (1 - warmup_frac))))
        for g in opt.param_groups:
            g["lr"] = cur_lr
        u8 = u8.to(device, non_blocking=True)
        target = teacher_targets(u8.permute(0, 3, 1, 2).float())
        x = chips_to_tensor(u8, cfg.input_size, cfg.mean, cfg.std, device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            emb = net(x)
        parts = distill_losses(emb, target, centre, cfg)
        loss = cfg.direct_weight * parts["direct"] + cfg.relation_weight * parts["relation"]
        if centred_weight > 0:
            # dlib's unit vectors share a large common part (their mean has norm ~0.9), so
            # 1 - cos on raw vectors is mostly satisfied by that part; the same term on
            # vectors centred by the teacher's mean weighs the part that tells people apart
            sc = F.normalize(F.normalize(emb.float(), dim=1) - centre, dim=1)
            tc = F.normalize(target - centre, dim=1)
            parts["centred"] = (1.0 - (sc * tc).sum(dim=1)).mean()
            loss = loss + centred_weight * parts["centred"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        ema_update()
        step += 1
        window.append({k2: v.detach() for k2, v in (("loss", loss), *parts.items())})
        if step % 100 == 0:
            vals = {k2: round(float(torch.stack([w[k2] for w in window]).mean()), 5) for k2 in window[0]}
            now = time.monotonic()
            log({"event": "train", "step": step, "epoch": round(step / per_epoch, 3), "lr": round(cur_lr, 7),
                 "img_s": round(len(window) * batch / (now - t_window), 1), **vals})
            window, t_window = [], now
            if not math.isfinite(vals["loss"]):
                raise FloatingPointError(f"non-finite loss at step {step}")
        if time.monotonic() - last_eval >= eval_every_s:
            evals.append(evaluate(step, step / per_epoch))
            last_eval = time.monotonic()
    del loader
    train_s = time.monotonic() - t_train
    evals.append(evaluate(step, step / per_epoch))
    last = evals[-1]
    pick = "ema" if last.get("ema", {}).get("acc", 0) >= last.get("student", {}).get("acc", 0) else "student"
    chosen = ema.net if pick == "ema" else net
    info = {"recipe": "tools/gpu_distill.py (dlib teacher, consistent teaching; the CPU recipe's data, augmentation and losses)",
            "weights": pick, "step": step, "epochs": round(step / per_epoch, 3), "train_seconds": round(train_s, 1),
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
            "batch": batch, "lr": lr, "warmup_frac": warmup_frac, "weight_decay": weight_decay, "seed": seed,
            "centred_weight": centred_weight,
            "train_chips": int(len(train_idx)), "teacher": teacher_version + " (fp16-stored weights; fp32 compute, TF32 convolutions on CUDA)",
            "augment": augment.to_dict(), "quick_eval_last": last, "pack": facts.get("pack")}
    ckpt_meta = {"embedding_dim": cfg.embedding_dim, "input_size": cfg.input_size, "chip_size": 150, "chip_padding": 0.25,
                 "mean": list(cfg.mean), "std": list(cfg.std), "dropout": 0.0, "training": info}
    # plain JSON types only: the app loads checkpoints with weights_only=True, which
    # refuses e.g. torch's TorchVersion string or numpy scalars inside ``meta``
    ckpt_meta = json.loads(json.dumps(ckpt_meta, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    state = {k2: v.contiguous() for k2, v in chosen.state_dict().items()}
    path = save_checkpoint(state, ckpt_meta, out / "resnet50-face.pt")
    summary = {"checkpoint": str(path), "bytes": path.stat().st_size, **info, "evals": evals,
               "total_seconds": round(time.monotonic() - t_start, 1)}
    (out / "embedder_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    log({"event": "done", "pick": pick, "step": step, "train_s": round(train_s, 1)})
    return summary


# ----------------------------------------------------------------------------- bundle for the trip back


def _xz(chunk: bytes) -> bytes:
    import lzma

    return lzma.compress(chunk, preset=6)


def _shuffle_fp16(data: bytes) -> bytes:
    """All even bytes, then all odd bytes: the high bytes of fp16 weights (sign,
    exponent) are few distinct values and compress well once they sit together."""
    even = len(data) // 2 * 2
    arr = np.frombuffer(data[:even], np.uint8).reshape(-1, 2)
    return arr[:, 0].tobytes() + arr[:, 1].tobytes() + data[even:]


def _unshuffle_fp16(data: bytes) -> bytes:
    half = len(data) // 2
    arr = np.empty((half, 2), np.uint8)
    arr[:, 0] = np.frombuffer(data[:half], np.uint8)
    arr[:, 1] = np.frombuffer(data[half:2 * half], np.uint8)
    return arr.tobytes() + data[2 * half:]


def bundle(files: list[Path], out: Path, part_mib: float = 15.0, chunk_mib: int = 4) -> list[Path]:
    """Put ``files`` into one tar of xz members (.pt files byte-shuffled first; every
    member compressed in 4 MiB chunks on all cores: concatenated xz streams), split into
    parts of ``part_mib`` with a sha256 beside them. The device tool gives back at most
    8 files, 64 MiB in all."""
    import hashlib
    import tarfile
    from concurrent.futures import ThreadPoolExecutor

    buf = io.BytesIO()
    step = chunk_mib * 1024 * 1024
    # threads, not processes: lzma releases the GIL while it compresses, and forking a
    # process that holds other threads' locks (a test suite, an app) can deadlock the child
    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool, tarfile.open(fileobj=buf, mode="w") as tar:
        for f in files:
            if not f.is_file():
                print(f"bundle: {f} missing, left out", flush=True)
                continue
            data = f.read_bytes()
            name = f.name
            if f.suffix == ".pt":
                data, name = _shuffle_fp16(data), name + ".shuf"
            packed = b"".join(pool.map(_xz, [data[i:i + step] for i in range(0, len(data), step)] or [b""]))
            info = tarfile.TarInfo(name + ".xz")
            info.size = len(packed)
            tar.addfile(info, io.BytesIO(packed))
    blob = buf.getvalue()
    out.mkdir(parents=True, exist_ok=True)
    part = int(part_mib * 1024 * 1024)
    parts = []
    for i, s in enumerate(range(0, len(blob), part)):
        p = out / f"bundle.part{i:02d}"
        p.write_bytes(blob[s:s + part])
        parts.append(p)
    (out / "bundle.sha256").write_text(hashlib.sha256(blob).hexdigest() + "\n")
    return parts


def unbundle(src: Path, dest: Path) -> list[Path]:
    import hashlib
    import lzma
    import tarfile

    blob = b"".join(p.read_bytes() for p in sorted(src.glob("bundle.part*")))
    want = (src / "bundle.sha256").read_text().split()[0]
    if hashlib.sha256(blob).hexdigest() != want:
        raise ValueError(f"bundle in {src}: sha256 mismatch (a part is missing or damaged)")
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        for m in tar.getmembers():
            data = lzma.decompress(tar.extractfile(m).read())
            name = m.name[: -len(".xz")]
            if name.endswith(".shuf"):
                data, name = _unshuffle_fp16(data), name[: -len(".shuf")]
            target = dest / Path(name).name
            target.write_bytes(data)
            out.append(target)
    return out


# ----------------------------------------------------------------------------- CPU: finalize


def finalize(checkpoint: Path, store_root: Path, out: Path) -> dict[str, Any]:
    """The returned checkpoint with its match threshold chosen as the CPU recipe does
    (``DistillRun.export``): best accuracy over the quick-eval pairs (LFW View 2 folds
    1-5, train identities, people held out of training), embedded here from the store's
    own uncompressed chips by the app's ``ResNet50Embedder``."""
    from models.embedders.resnet50 import ResNet50Embedder, load_checkpoint, save_checkpoint
    from models.evaluation.verification import best_threshold, kfold_accuracy, roc_auc
    from models.training.face_chip_store import ChipStore

    store = ChipStore(store_root)
    records = store.records()
    by_file = {r.file: r.index for r in records if r.split == "eval" and r.source == "lfw"}
    pairs = [p for p in json.loads((store_root / "eval_pairs.json").read_text())["pairs"]
             if p["a"] in by_file and p["b"] in by_file]
    files = sorted({p["a"] for p in pairs} | {p["b"] for p in pairs})
    pos = {f: i for i, f in enumerate(files)}
    emb = ResNet50Embedder(checkpoint=checkpoint)
    vecs = emb.embed_chips(np.asarray(store.chips[[by_file[f] for f in files]]))
    a = np.asarray([pos[p["a"]] for p in pairs])
    b = np.asarray([pos[p["b"]] for p in pairs])
    same = np.asarray([bool(p["same"]) for p in pairs])
    fold = np.asarray([int(p["fold"]) for p in pairs])
    scores = np.sum(vecs[a] * vecs[b], axis=1)
    thr, _ = best_threshold(scores, same)
    quick = {"pairs": len(pairs), "acc": round(kfold_accuracy(scores, same, fold).mean, 5),
             "auc": round(roc_auc(scores, same), 5), "threshold_all_pairs": round(float(thr), 5)}
    state, meta = load_checkpoint(checkpoint)
    meta = {**meta, "match_threshold": float(thr)}
    meta["training"] = {**meta.get("training", {}), "quick_eval_cpu": quick}
    save_checkpoint({k: v for k, v in state.items()}, meta, out)
    return {"out": str(out), **quick}


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.gpu_distill", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--store", type=Path, action="append", required=True)
    p.add_argument("--out", type=Path, default=PAYLOAD)
    p.add_argument("--budget-mib", type=float, action="append", required=True, help="one per shard folder")
    p.add_argument("--quality", type=int, default=80)
    p.add_argument("--eval-quality", type=int, default=95)
    p.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("train")
    t.add_argument("--payload", type=Path, action="append", required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--minutes", type=float, default=7.0)
    t.add_argument("--batch", type=int, default=256)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--warmup-frac", type=float, default=0.04)
    t.add_argument("--weight-decay", type=float, default=0.05)
    t.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 3))
    t.add_argument("--eval-every-s", type=float, default=60.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--centred-weight", type=float, default=0.0,
                   help="weight of 1 - cos on vectors centred by the teacher's mean (0: the CPU recipe)")
    b = sub.add_parser("bundle")
    b.add_argument("files", type=Path, nargs="+")
    b.add_argument("--out", type=Path, required=True)
    u = sub.add_parser("unbundle")
    u.add_argument("src", type=Path)
    u.add_argument("--dest", type=Path, required=True)
    f = sub.add_parser("finalize", help="CPU: set the returned checkpoint's match threshold on the quick-eval pairs")
    f.add_argument("checkpoint", type=Path)
    f.add_argument("--store", type=Path, required=True)
    f.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if a.cmd == "pack":
        print(json.dumps(pack(a.store, a.out, a.budget_mib, a.quality, a.eval_quality, a.seed), indent=1))
    elif a.cmd == "train":
        s = train(a.payload, a.out, a.minutes, a.batch, a.lr, a.warmup_frac, a.weight_decay, a.workers,
                  a.eval_every_s, a.seed, a.centred_weight)
        print(json.dumps({k: s[k] for k in ("weights", "step", "epochs", "train_seconds", "quick_eval_last")}, default=str))
    elif a.cmd == "bundle":
        for part in bundle(a.files, a.out):
            print(part, part.stat().st_size)
    elif a.cmd == "finalize":
        print(json.dumps(finalize(a.checkpoint, a.store, a.out)))
    elif a.cmd == "unbundle":
        for f in unbundle(a.src, a.dest):
            print(f, f.stat().st_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
