"""Peak memory and speed of preparing a Parquet corpus into token shards, at several corpus sizes.

    python experiments/prep_memory.py --sizes-mb 50 200 --num-proc 2 --work prep-study/

Writes synthetic web-like documents (Parquet, row groups of 1,000 documents, --docs-per-file each),
runs scripts/prepare_data.py on each corpus under /usr/bin/time, and prints one markdown row per
corpus: its size, tokens, wall time, tokens/s, the peak RSS of the main process and of the largest
worker, and the CPU use (user + system over wall: 2.0 = two cores busy).
"""

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
WORDS = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be",
         "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have",
         "an", "they", "you", "were", "her", "she", "there", "been", "one", "all", "we", "their",
         "has", "would", "when", "learning", "students", "energy", "water", "history", "science",
         "school", "research", "system", "health"]


def write_corpus(folder: Path, megabytes: int, docs_per_file: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written, index = 0, 0
    while written < megabytes * 2**20:
        docs = [" ".join(rng.choice(WORDS, size=rng.integers(200, 1500))) + "."
                for _ in range(docs_per_file)]
        pq.write_table(pa.table({"text": docs}), folder / f"{index:03d}.parquet",
                       row_group_size=1000)
        written += sum(len(d) for d in docs)
        index += 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[50, 200])
    p.add_argument("--num-proc", type=int, default=None)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "prep_memory",
                   help="where the corpora and token caches go (kept for a rerun)")
    p.add_argument("--docs-per-file", type=int, default=10_000,
                   help="documents per Parquet file (~5 KB each)")
    args = p.parse_args()
    print("| corpus (text) | files | tokens | wall s | tokens/s | peak RSS, largest process | "
          "CPU use |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size in args.sizes_mb:
        corpus = args.work / f"corpus-{size}mb"
        if not corpus.exists():
            write_corpus(corpus, size, args.docs_per_file)
        cache = args.work / f"cache-{size}mb"
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        cmd = ["/usr/bin/time", "-v", sys.executable, str(REPO / "scripts" / "prepare_data.py"),
               str(corpus), "--tokenizer", "gpt2", "--cache-dir", str(cache),
               *(["--num-proc", str(args.num_proc)] if args.num_proc else [])]
        start = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        stats = result.stderr
        rss_mb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stats)[1]) / 1024
        cpu = (float(re.search(r"User time \(seconds\): ([\d.]+)", stats)[1])
               + float(re.search(r"System time \(seconds\): ([\d.]+)", stats)[1])) / wall
        tokens = sum(int(n.replace(",", "")) for n in re.findall(r": ([\d,]+) tokens",
                                                                 result.stdout))
        files = list(corpus.glob("*.parquet"))
        text_mb = sum(sum(len(t) for t in pq.read_table(f, columns=["text"])["text"].to_pylist())
                      for f in files) / 2**20
        print(f"| {text_mb:.0f} MB | {len(files)} | {tokens:,} | {wall:.1f} | "
              f"{tokens / wall:,.0f} | {rss_mb:.0f} MB | {cpu:.2f} |", flush=True)


if __name__ == "__main__":
    main()
