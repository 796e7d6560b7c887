"""Data plane at scale: tokenize and score from 50k to 2M pairs, beside bare Ray Data pipelines over the same rows.

    python benchmarks/data_scale.py [--sizes 50000,400000,2000000] [--with-10m] [--stages tokenize,score]
                                    [--num-cpus 2] [--workdir DIR] [--keep]

For each size it writes synthetic preference pairs as one JSON Lines file (prompts of ~120 characters,
responses of ~640, every row distinct) and a tiny GPT-2 with a byte-level BPE tokenizer trained on them, then
runs, each in a fresh process with an embedded local Ray of `--num-cpus` CPUs:

    bare tokenize   ray.data.read_json -> map_batches(the same tokenizer, one actor) -> write_parquet
    tokenize        the tokenize stage (`pipeline.stages.TOKENIZE`), as `dpo tokenize` runs it
    bare score      ray.data.read_parquet(the tokenize stage's shards) -> map_batches(the same scorer,
                    one actor) -> write_parquet
    score           the score stage (`pipeline.stages.SCORE`) on the tokenize stage's output

and prints, per run, the wall time (from the first Ray Data call to the last shard written; Ray's own
start excluded), rows per second and the peak RSS of the driver process (VmHWM of the process that runs
the pipeline; Ray's workers are other processes), also as it stood before the first row
(Ray joined, the code imported: like the bare pipeline's, the stages' drivers import neither torch nor
transformers; their actors do), beside the machine and its load average before and after. The ratios
against the bare pipeline are what issue 24 asks about: the driver's memory must not grow with the data.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

HERE = Path(__file__).resolve()
SIZES = (50_000, 400_000, 2_000_000)
TEN_MILLION = 10_000_000
MAX_PROMPT, MAX_LENGTH = 128, 512
SCORE_BATCH = 32


# ---------------------------------------------------------------------------------------------- the data


def words(seed: int = 0, n: int = 3000) -> list[str]:
    """Pronounceable made-up words: a vocabulary a BPE tokenizer learns in a few thousand rows."""
    rng = random.Random(seed)
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    return ["".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(1, 4))) for _ in range(n)]


def text(rng: random.Random, vocab: list[str], chars: int) -> str:
    out, length = [], 0
    while length < chars:
        word = rng.choice(vocab)
        out.append(word)
        length += len(word) + 1
    return " ".join(out)


def write_pairs(path: Path, rows: int, *, seed: int = 0) -> None:
    """`rows` distinct pairs as JSON Lines (written once per size, then reused)."""
    if path.exists():
        return
    rng, vocab = random.Random(seed), words(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(rows):
            row = {
                "prompt": f"question {i}: {text(rng, vocab, 110)}?",
                "chosen": " " + text(rng, vocab, 640),
                "rejected": " " + text(rng, vocab, 640),
            }
            f.write(json.dumps(row) + "\n")
    tmp.rename(path)


def make_model(directory: Path, sample: Path) -> None:
    """A 2-layer GPT-2 (width 64) with a 1,000-token BPE trained on the first rows of `sample`."""
    if (directory / "config.json").exists():
        return
    from pipeline.demo.tiny_model import TinyShape, build_tiny_model, train_tokenizer
    from pipeline.model.pretrained import save_pretrained

    with open(sample) as f:
        texts = [" ".join(json.loads(next(f)).values()) for _ in range(2000)]
    tokenizer = train_tokenizer(texts, vocab_size=1000)
    model = build_tiny_model(tokenizer, TinyShape(n_layer=2, n_embd=64, n_head=2, n_positions=MAX_LENGTH))
    save_pretrained(model, tokenizer, directory)


# ---------------------------------------------------------------------------------------------- the runs


class BareTokenizer:
    """The bare pipeline's actor: the tokenizer on the three text columns, nothing else."""

    def __init__(self, model: str):
        from pipeline.model.pretrained import load_tokenizer

        self.tokenizer = load_tokenizer(model)

    def __call__(self, batch: dict) -> dict:
        out = {}
        for column in ("prompt", "chosen", "rejected"):
            out[f"{column}_ids"] = self.tokenizer(list(batch[column]), add_special_tokens=False)["input_ids"]
        return out


class BareScorer:
    """The bare pipeline's actor: the same scorer as the score stage's, on the tokenize stage's rows."""

    def __init__(self, model: str):
        from pipeline.model.scoring import SequenceScorer

        self.scorer = SequenceScorer(
            model, dtype="float32", use_gpu=False, micro_batch=SCORE_BATCH, trust_remote_code=False, prefix="ref_"
        )

    def __call__(self, batch):
        return self.scorer(batch)


def stage_config(work: Path, rows: int):
    from pipeline.config import load_config

    return load_config(
        None,
        [
            f"run_dir={work / f'run-{rows}'}",
            f"data.path={work / f'pairs-{rows}.jsonl'}",
            f"model.path={work / 'model'}",
            f"tokenize.max_prompt_length={MAX_PROMPT}",
            f"tokenize.max_length={MAX_LENGTH}",
            f"score.batch_size={SCORE_BATCH}",
            "score.shard_rows=8192",
        ],
    )


def child(kind: str, rows: int, work: Path, num_cpus: int) -> dict:
    """One run in this process (see the module docstring); returns its figures."""
    import ray

    from pipeline.config import RayConfig
    from pipeline.runtime.ray_setup import init_ray

    init_ray(RayConfig(num_cpus=num_cpus))
    if kind in ("tokenize", "score"):
        import pipeline.stages  # noqa: F401  # what `dpo tokenize` imports before it starts
    baseline = peak_rss_mb()  # the driver before any row: Ray joined, the code imported
    out = work / f"{kind}-{rows}"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    if kind == "bare_tokenize":
        ds = ray.data.read_json(str(work / f"pairs-{rows}.jsonl")).map_batches(
            BareTokenizer,
            fn_constructor_kwargs={"model": str(work / "model")},
            batch_size=512,
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=0.5,
        )
        ds.write_parquet(str(out))
        done = rows
    elif kind == "bare_score":
        tokenized = work / f"run-{rows}" / "tokenize"
        ds = ray.data.read_parquet([str(tokenized / "train"), str(tokenized / "eval")]).map_batches(
            BareScorer,
            fn_constructor_kwargs={"model": str(work / "model")},
            batch_size=SCORE_BATCH * 8,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=1,
        )
        ds.write_parquet(str(out))
        done = json.loads((tokenized / "manifest.json").read_text())["rows_out"]
    else:
        from pipeline.stages import SCORE, TOKENIZE

        stage = TOKENIZE if kind == "tokenize" else SCORE
        manifest = stage.run(stage_config(work, rows), force=True)
        done = manifest["rows_out"]
    wall = time.perf_counter() - started
    return {
        "kind": kind,
        "rows": rows,
        "done": done,
        "wall_s": wall,
        "peak_rss_mb": peak_rss_mb(),
        "baseline_rss_mb": baseline,
    }


def peak_rss_mb() -> float:
    """This process's peak RSS since it started. On Linux, VmHWM of /proc/self/status: getrusage's ru_maxrss
    keeps the high-water mark of the process before its exec, so a run started by a parent that had built
    the model (torch and transformers imported, ~430 MB) would report at least that much."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, elsewhere a bound


# ---------------------------------------------------------------------------------------------- the table


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.node()}: {os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, {platform.system()}"


def run_child(kind: str, rows: int, work: Path, num_cpus: int, *, tries: int = 6) -> dict:
    """One run in a fresh process; a Ray that could not start in time (a loaded machine) is tried again."""
    command = [sys.executable, str(HERE), "--child", kind, "--rows", str(rows), "--workdir", str(work)]
    for attempt in range(tries):
        before = os.getloadavg()[0]
        done = subprocess.run([*command, "--num-cpus", str(num_cpus)], capture_output=True, text=True)
        if done.returncode == 0:
            result = json.loads(done.stdout.strip().splitlines()[-1])
            return {**result, "load_before": before, "load_after": os.getloadavg()[0]}
        if "timed out during startup" not in done.stderr or attempt == tries - 1:
            raise RuntimeError(f"{kind} at {rows}: exit {done.returncode}\n{done.stderr[-3000:]}")
        print(f"# {kind} at {rows}: Ray did not start in time (load {before:.0f}); again", flush=True)
    raise AssertionError("unreachable")


def table(results: list[dict]) -> str:
    lines = [
        "| pairs | run | wall | rows/s | driver peak RSS (of it, before the first row) | vs bare: RSS, growth "
        "after the first row (this run's, the bare one's), wall | load avg (1 min) before, after |",
        "|---:|---|---:|---:|---:|---|---|",
    ]
    bare = {(r["rows"], r["kind"].removeprefix("bare_")): r for r in results if r["kind"].startswith("bare_")}
    for r in results:
        ref = bare.get((r["rows"], r["kind"])) if not r["kind"].startswith("bare_") else None
        grown = r["peak_rss_mb"] - r["baseline_rss_mb"]
        ratio = "-"
        if ref:
            ref_grown = ref["peak_rss_mb"] - ref["baseline_rss_mb"]
            ratio = (
                f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x, +{grown:,.0f} MB against +{ref_grown:,.0f} MB, "
                f"{r['wall_s'] / ref['wall_s']:.2f}x"
            )
        lines.append(
            f"| {r['rows']:,} | {r['kind'].replace('_', ' ')} | {r['wall_s']:.0f} s | {r['done'] / r['wall_s']:,.0f} "
            f"| {r['peak_rss_mb']:,.0f} MB ({r['baseline_rss_mb']:,.0f} MB) | {ratio} "
            f"| {r['load_before']:.1f}, {r['load_after']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--with-10m", action="store_true", help="also 10,000,000 pairs (about 15 GB of JSON)")
    parser.add_argument("--stages", default="tokenize,score")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/raydpo-data-scale")
    parser.add_argument("--keep", action="store_true", help="keep the data and outputs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    if args.child:
        print(json.dumps(child(args.child, args.rows, work, args.num_cpus)), flush=True)
        return
    sizes = [int(s) for s in args.sizes.split(",")] + ([TEN_MILLION] if args.with_10m else [])
    stages = args.stages.split(",")
    work.mkdir(parents=True, exist_ok=True)
    print(f"# data_scale {time.strftime('%Y-%m-%d %H:%M')}, {machine()}, Ray num_cpus={args.num_cpus}", flush=True)
    results = []
    for rows in sizes:
        write_pairs(work / f"pairs-{rows}.jsonl", rows)
        make_model(work / "model", work / f"pairs-{rows}.jsonl")
        kinds = [k for stage in stages for k in (f"bare_{stage}", stage)]
        if "score" in stages and "tokenize" not in stages:
            kinds = ["tokenize", *kinds]  # score reads the tokenize stage's output
        for kind in kinds:
            results.append(run_child(kind, rows, work, args.num_cpus))
            print(json.dumps(results[-1]), flush=True)
        if not args.keep:
            for path in work.glob(f"*-{rows}*"):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
    print(table([r for r in results if r["kind"] in (*stages, *(f"bare_{s}" for s in stages))]))


if __name__ == "__main__":
    main()
