"""How long the check of every image before training takes for Market-1501's 36,036 files.

    python benchmarks/image_check.py [--files 36036] [--rounds 5] [--decode-sample 3000]

Builds a folder of ``--files`` JPEGs by copying the real Market-1501 subset's files
(``../shared/data/market1501-mini`` or ``$EDAAN_FAST_SHARED_DATA``; 128 x 64 crops of ~4.5 kB,
like the full set's) round-robin under new names, or, without it, by writing 128 x 64 JPEGs.
Then, interleaved ``--rounds`` times so that both see the same machine load: the check as the
trainer runs it (:func:`edaan_fast.data.image_check.check_images`, 8 threads) and the same
check on one thread. A full decode of a sample of the files (Pillow, what a loader does)
gives the decode-everything alternative, scaled to all files. The files were just written, so
this is the page-cache-warm time; a cold first read adds the disk's or network file system's
latency per file, which the threads overlap.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from edaan_fast.data.image_check import check_images


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _sources() -> list[Path]:
    env = os.environ.get("EDAAN_FAST_SHARED_DATA")
    roots = [Path(env)] if env else []
    roots.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for root in roots:
        files = sorted(root.glob("market1501-mini/**/bounding_box_*/*.jpg"))
        if files:
            return files
    return []


def build_folder(folder: Path, n: int) -> tuple[list[str], str]:
    """``n`` JPEG files in ``folder``; returns their paths and where they came from."""
    sources = _sources()
    paths = []
    for i in range(n):
        path = folder / f"{i % 1501:04d}_c{i % 6 + 1}s1_{i:06d}_00.jpg"
        if sources:
            shutil.copyfile(sources[i % len(sources)], path)
        else:
            Image.new("RGB", (64, 128), (i % 251, i % 241, i % 239)).save(path, quality=90)
        paths.append(str(path))
    origin = (f"copies of the {len(sources)} Market-1501-mini JPEGs" if sources
              else "generated 128x64 JPEGs")
    return paths, origin


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=36036)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--decode-sample", type=int, default=3000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths, origin = build_folder(Path(tmp), args.files)
        size = sum(os.path.getsize(q) for q in paths) / len(paths)
        check_images(paths)  # warm-up
        times: dict[str, list[float]] = {"8 threads": [], "1 thread": []}
        for _ in range(args.rounds):
            for name, threads in (("8 threads", 8), ("1 thread", 1)):
                start = time.perf_counter()
                bad = check_images(paths, threads=threads)
                times[name].append(time.perf_counter() - start)
                assert not bad, bad[:3]
        sample = paths[:args.decode_sample]
        start = time.perf_counter()
        for q in sample:
            with Image.open(q) as img:
                img.convert("RGB")
        decode = (time.perf_counter() - start) * len(paths) / len(sample)
    print(f"{args.files} files ({origin}, {size / 1024:.1f} kB on average), page cache warm; "
          f"CPU: {_cpu()}, {os.cpu_count()} logical cores")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  check, {name}: median {median:.2f} s over {args.rounds} rounds "
              f"({1e6 * median / args.files:.0f} us per file; rounds: "
              f"{', '.join(f'{v:.2f}' for v in values)})")
    best = statistics.median(times["8 threads"])
    print(f"  full decode (Pillow), scaled from {len(sample)} files: {decode:.1f} s "
          f"({decode / best:.0f}x the check)")


if __name__ == "__main__":
    main()
