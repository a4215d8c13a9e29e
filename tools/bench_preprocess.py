"""Benchmark the corpus pipeline: tokenize-stage speed against raw SentencePiece, and memory.

    python tools/bench_preprocess.py --sizes-mb 32 128 --workers 2 --output /tmp/llmscale-bench

1. Generates JSON-lines corpora of the given sizes (English-like text drawn from the bundled
   plays' words, no two documents alike) and runs the whole pipeline on each with `--workers`
   processes, sampling the memory of the process tree: peak memory should stay flat as the
   corpus grows.
2. On the largest run's cleaned text, times raw `SentencePieceProcessor.encode` (one thread,
   the same text, in the same run) and the tokenize stage with 1 and `--workers` workers;
   the stage's tokens/s per worker over the raw rate is its efficiency (target >= 90%).
   Tokens per CPU-second are reported too: on a machine shared with other jobs, wall-clock
   rates measure the neighbours as much as the code.
Prints a table and writes <output>/bench.json.
"""

import argparse
import importlib.util
import json
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import sentencepiece

if importlib.util.find_spec("llmscale") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmscale.data.corpus import resolve_paths  # noqa: E402
from llmscale.data.tokenizer import train_sentencepiece  # noqa: E402
from llmscale.prep.preprocess import PreprocessConfig, run_preprocess  # noqa: E402
from llmscale.prep.tokenize_stage import TokenizeTask, tokenize_parts  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCUMENT_WORDS = (400, 1600)
LINE_WORDS = (6, 14)


def generate_corpus(path: Path, size_bytes: int, seed: int) -> int:
    """Random documents in the plays' vocabulary (word frequencies kept); returns documents."""
    plays = " ".join(p.read_text() for p in resolve_paths(["data/shakespeare"], REPO_ROOT))
    words = re.findall(r"[A-Za-z']+[,.;:!?]?", plays)
    vocabulary, counts = np.unique(words, return_counts=True)
    probabilities = counts / counts.sum()
    rng = np.random.default_rng(seed)
    written = documents = 0
    with path.open("w") as file:
        while written < size_bytes:
            count = int(rng.integers(*DOCUMENT_WORDS))
            drawn = vocabulary[rng.choice(len(vocabulary), size=count, p=probabilities)]
            cuts = np.cumsum(rng.integers(*LINE_WORDS, size=count // LINE_WORDS[0] + 1))
            lines = [" ".join(drawn[a:b]) for a, b in zip(np.r_[0, cuts], cuts) if a < count]
            line = json.dumps({"text": "\n".join(lines)}) + "\n"
            file.write(line)
            written += len(line)
            documents += 1
    return documents


class MemorySampler:
    """Peak memory of this process and its children, sampled in a thread: the proportional
    set size (PSS, shared pages split among the processes sharing them) summed over the tree,
    and the largest single resident set (RSS)."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak_pss = self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            pss = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    info = process.memory_full_info()
                except psutil.Error:
                    continue
                pss += info.pss
                self.peak_rss = max(self.peak_rss, info.rss)
            self.peak_pss = max(self.peak_pss, pss)
            self._stop.wait(self.interval)


def run_pipeline(corpus: Path, output: Path, tokenizer: Path, workers: int) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    config = PreprocessConfig(
        datasets={"bench": (str(corpus),)},
        output=output,
        tokenizer=str(tokenizer),
        workers=workers,
        part_bytes=8 << 20,
    )
    start = time.perf_counter()
    with MemorySampler() as memory:
        report = run_preprocess(config, REPO_ROOT, log=lambda line: None)
    return {
        "corpus_mb": round(corpus.stat().st_size / 2**20, 1),
        "documents_kept": report["total"]["documents_kept"],
        "tokens": report["total"]["tokens"],
        "seconds": round(time.perf_counter() - start, 1),
        "clean_seconds": report["stages"]["clean"]["seconds"],
        "tokenize_seconds": report["stages"]["tokenize"]["seconds"],
        "peak_pss_mib": round(memory.peak_pss / 2**20),
        "peak_process_rss_mib": round(memory.peak_rss / 2**20),
    }


def raw_encode_rate(parts: list[Path], model: Path) -> tuple[int, float, float]:
    """Tokens, tokens/s and tokens per CPU-second of SentencePiece alone on the parts' text:
    one thread, batches of about the size the tokenize stage encodes at once, reading and
    parsing not timed."""
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model))
    tokens, seconds, cpu_seconds = 0, 0.0, 0.0
    for part in parts:
        texts = [json.loads(line)["text"] for line in part.open()]
        for start in range(0, len(texts), 256):
            batch = texts[start : start + 256]
            begin, cpu_begin = time.perf_counter(), time.process_time()
            encoded = processor.encode(batch, num_threads=1)
            seconds += time.perf_counter() - begin
            cpu_seconds += time.process_time() - cpu_begin
            tokens += sum(map(len, encoded))
    return tokens, tokens / seconds, tokens / cpu_seconds


def tokenize_rate(
    parts: list[Path], model: Path, output: Path, workers: int
) -> tuple[int, float, float]:
    """Tokens (without EODs), tokens/s and tokens per CPU-second (of whichever processes
    tokenized: this one for 1 worker, the pool's otherwise) of the tokenize stage."""
    shutil.rmtree(output, ignore_errors=True)
    tasks = [TokenizeTask(part, output / part.stem, str(model)) for part in parts]
    before = os.times()
    start = time.perf_counter()
    results = tokenize_parts(tasks, workers)
    seconds = time.perf_counter() - start
    after = os.times()
    if workers == 1:
        cpu_seconds = after.user + after.system - before.user - before.system
    else:
        cpu_seconds = (
            after.children_user
            + after.children_system
            - before.children_user
            - before.children_system
        )
    tokens = sum(result.tokens - result.documents for result in results)
    return tokens, tokens / seconds, tokens / cpu_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[32, 128])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--output", type=Path, default=Path("/tmp/llmscale-bench"))
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)

    model = train_sentencepiece(
        resolve_paths(["data/shakespeare"], REPO_ROOT),
        args.output / "bench_tokenizer",
        args.vocab_size,
    )
    results: dict = {"cpu_count": psutil.cpu_count(), "workers": args.workers, "pipeline": []}
    for index, size in enumerate(sorted(args.sizes_mb)):
        corpus = args.output / f"corpus_{size:g}mb.jsonl"
        if not corpus.exists():
            generate_corpus(corpus, int(size * 2**20), seed=index)
        run = run_pipeline(corpus, args.output / f"run_{size:g}mb", model, args.workers)
        results["pipeline"].append(run)
        print(
            f"pipeline {run['corpus_mb']} MB: {run['seconds']} s (clean {run['clean_seconds']} s, "
            f"tokenize {run['tokenize_seconds']} s), peak memory {run['peak_pss_mib']} MiB "
            f"(PSS, all processes), largest process {run['peak_process_rss_mib']} MiB RSS"
        )

    largest = args.output / f"run_{max(args.sizes_mb):g}mb"
    parts = sorted((largest / "cleaned" / "bench").glob("part-*.jsonl"))
    raw_tokens, raw_rate, raw_cpu_rate = raw_encode_rate(parts, model)
    results["raw_sentencepiece"] = {
        "tokens": raw_tokens,
        "tokens_per_s": round(raw_rate),
        "tokens_per_cpu_s": round(raw_cpu_rate),
    }
    results["load_average_1min"] = os.getloadavg()[0]
    results["tokenize_stage"] = []
    print(
        f"raw sentencepiece, 1 thread: {raw_tokens:,} tokens at {raw_rate:,.0f} tokens/s "
        f"({raw_cpu_rate:,.0f} per CPU-second)"
    )
    for workers in sorted({1, args.workers}):
        tokens, rate, cpu_rate = tokenize_rate(
            parts, model, args.output / f"tokens_{workers}w", workers
        )
        assert tokens == raw_tokens, "the stage must encode exactly the text timed raw"
        efficiency = rate / (workers * raw_rate)
        cpu_efficiency = cpu_rate / raw_cpu_rate
        results["tokenize_stage"].append(
            {
                "workers": workers,
                "tokens_per_s": round(rate),
                "per_worker_efficiency": round(efficiency, 3),
                "tokens_per_cpu_s": round(cpu_rate),
                "cpu_efficiency": round(cpu_efficiency, 3),
            }
        )
        print(
            f"tokenize stage, {workers} worker(s): {rate:,.0f} tokens/s = {efficiency:.1%} of raw "
            f"per worker; {cpu_rate:,.0f} tokens per CPU-second = {cpu_efficiency:.1%} of raw"
        )
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {psutil.cpu_count()} CPUs")
    (args.output / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.output / 'bench.json'}")


if __name__ == "__main__":
    main()
