"""Rebuild FER2013's train folder from a sharp copy of the same files.

    python tools/fer2013_sharp_train.py \
        --blurred ~/facelab-extra/fer2013/archive \
        --sharp-git /work/.mirror/RecepTahirGunlu+Duygu-Tanima/repo \
        --out ~/facelab-extra/fer2013-sharp/archive

Why: in the FER2013 snapshot listed in ``shared/data/EXTRA.md``
(anudeepkaddala/Facial-Expression-Predictor) every ``train`` image is heavily blurred
(JPEG median 786 bytes against 1,580 for ``test``; per-image grey std median 38 against
54), while ``test`` is sharp. A network trained on it learns blurred faces and meets
sharp ones at test time (and in the app): our first emotion model reached 0.53 on its
select split but 0.40 on test. The public repository RecepTahirGunlu/Duygu-Tanima holds
the 28,709 original ``Training_*.jpg`` files sharp, under the same names and emotion
folders (its own test folder, other files and augmented copies are ignored here).

What this does: for every file of the blurred ``train/<emotion>/`` it takes the file of
the same name from the same emotion folder of the sharp repository (read from its git
objects, no work tree needed), writes it to ``<out>/train/<emotion>/``, links
``<out>/test`` to the blurred snapshot's ``test`` (which is sharp; FER2013's test half
comes from the listed source), and checks on a sample that each sharp file *is* the
blurred one: the Gaussian-blurred (sigma 3 px) sharp image must correlate with the
blurred one (median r >= 0.95; unrelated FER faces correlate ~0.14). It refuses to write
a folder that is missing any file.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

MIN_MEDIAN_CORRELATION = 0.95


def _list_git_training(repo: Path) -> dict[tuple[str, str], str]:
    """(emotion, file name) -> path inside the sharp repository, for ``*/<emotion>/Training_*.jpg``."""
    names = subprocess.run(["git", "-C", str(repo), "ls-tree", "-r", "--name-only", "HEAD"],
                           check=True, capture_output=True, text=True).stdout.split("\n")
    found: dict[tuple[str, str], str] = {}
    for path in names:
        parts = path.split("/")
        if len(parts) >= 3 and parts[-1].startswith("Training_") and parts[-1].endswith(".jpg"):
            found.setdefault((parts[-2], parts[-1]), path)
    return found


def _read_blobs(repo: Path, paths: list[str]) -> list[bytes]:
    proc = subprocess.Popen(["git", "-C", str(repo), "cat-file", "--batch"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    out = []
    for path in paths:
        proc.stdin.write(f"HEAD:{path}\n".encode())
        proc.stdin.flush()
        header = proc.stdout.readline().split()
        if len(header) < 3 or header[1] != b"blob":
            raise RuntimeError(f"{path}: not readable from {repo} ({header!r})")
        out.append(proc.stdout.read(int(header[2])))
        proc.stdout.read(1)
    proc.stdin.close()
    proc.wait()
    return out


def _grey(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float64)


def correlation_check(blurred_root: Path, sharp_root: Path, sample: int = 300, seed: int = 0) -> float:
    """Median correlation between blurred files and their Gaussian-blurred sharp copies."""
    files = sorted(blurred_root.glob("train/*/*.jpg"))
    rng = random.Random(seed)
    rs = []
    for path in rng.sample(files, min(sample, len(files))):
        sharp = sharp_root / path.relative_to(blurred_root)
        with Image.open(sharp) as im:
            smoothed = np.asarray(im.convert("L").filter(ImageFilter.GaussianBlur(3)), dtype=np.float64)
        rs.append(float(np.corrcoef(_grey(path).ravel(), smoothed.ravel())[0, 1]))
    return float(np.median(rs))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blurred", type=Path, required=True, help="the listed snapshot's archive/ (train/ and test/)")
    ap.add_argument("--sharp-git", type=Path, required=True, help="git directory of RecepTahirGunlu/Duygu-Tanima")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    blurred, out = args.blurred.expanduser(), args.out.expanduser()
    wanted = sorted((p.parent.name, p.name) for p in blurred.glob("train/*/*.jpg"))
    available = _list_git_training(args.sharp_git.expanduser())
    missing = [w for w in wanted if w not in available]
    if missing:
        print(f"{len(missing)} of {len(wanted)} train files have no sharp copy (first: {missing[0]}); nothing written",
              file=sys.stderr)
        return 1
    blobs = _read_blobs(args.sharp_git.expanduser(), [available[w] for w in wanted])
    for (emotion, name), data in zip(wanted, blobs, strict=True):
        target = out / "train" / emotion / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    test_link = out / "test"
    if not test_link.exists():
        test_link.symlink_to((blurred / "test").resolve(), target_is_directory=True)
    r = correlation_check(blurred, out)
    print(f"wrote {len(wanted)} sharp train files to {out / 'train'}; median correlation with the blurred "
          f"files after a sigma-3 blur: {r:.3f}")
    if r < MIN_MEDIAN_CORRELATION:
        print(f"correlation below {MIN_MEDIAN_CORRELATION}: these are not the same images", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
