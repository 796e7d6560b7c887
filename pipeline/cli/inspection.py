"""`dpo inspect tokenize`: the tokenize audit as a table a person reads before training."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.model.pretrained import load_tokenizer
from pipeline.runtime.shards import read_rows
from pipeline.runtime.storage import RunDir


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def print_tokenize_audit(config: Config, *, examples: int = 3) -> None:
    run_dir = RunDir(config.run_dir)
    manifest = run_dir.manifest("tokenize")
    if manifest is None:
        raise SystemExit(f"no finished tokenize stage under {run_dir.uri_of('tokenize')}; run `dpo tokenize` first")
    audit = manifest["audit"]
    rows = [
        ("input", manifest["input"]),
        ("rows in", str(manifest["rows_in"])),
        ("pairs out", f"{manifest['rows_out']} (train {manifest['rows_train']}, eval {manifest['rows_eval']})"),
        *[(f"dropped: {reason}", str(n)) for reason, n in manifest["dropped"].items()],
        ("rejected rows in", run_dir.uri_of("tokenize", "rejected") + "/part-*.jsonl"),
        ("prompts truncated", str(audit["prompt_truncated"])),
        ("responses truncated", str(audit["response_truncated"])),
        ("boundary mismatches", str(audit["boundary_mismatches"])),
        ("duplicates", str(audit["duplicates"])),
        (
            "chosen longer than rejected",
            "–" if audit["chosen_longer_share"] is None else f"{audit['chosen_longer_share']:.1%}",
        ),
    ]
    for name, hist in audit["length_histograms"].items():
        if hist.get("counts"):
            rows.append((f"{name} length", f"mean {hist['mean']:.1f}, max {hist['max']}"))
    print(f"tokenize audit of {run_dir.uri_of('tokenize')}\n{_table(rows)}")
    if manifest["rows_out"] == 0:
        return
    tokenizer = load_tokenizer(config.model.path, trust_remote_code=config.model.trust_remote_code)
    shards = sorted(f for f, entry in manifest["files"].items() if f.startswith("train/") and entry.get("rows"))
    table = read_rows(run_dir.fs, run_dir.path("tokenize", shards[0]), 0, examples) if shards else None
    for row in table.to_pylist() if table is not None else []:
        print(f"\n[{row['id']}] from {row['source']}")
        for part in ("prompt", "chosen", "rejected"):
            print(f"  {part:>8}: {tokenizer.decode(row[f'{part}_ids'])!r}")
