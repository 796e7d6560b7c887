"""`dpo`: run the pipeline, or one stage of it, from a config file.

    dpo run --config configs/demo.yaml                 every stage (the demo's preparation first)
    dpo tokenize|score|train|evaluate --config X       one stage
    dpo sweep --config X --set train.beta=[0.05,0.5]   several policies from one score stage
    dpo inspect tokenize --config X                    the tokenize audit as a table
    --set a.b=value                                    override any config key (repeatable)
    --force                                            redo the named stage(s) even if finished
"""

from __future__ import annotations

import argparse
import logging
import sys

STAGES = ("tokenize", "score", "train", "evaluate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo", description="Direct Preference Optimization as Ray stages.")
    parser.add_argument("command", choices=("run", *STAGES, "sweep", "inspect"))
    parser.add_argument("target", nargs="?", help="for inspect: the stage to show (tokenize)")
    parser.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.beta=0.5 (repeatable)")
    parser.add_argument("--force", action="store_true", help="redo finished stages instead of skipping them")
    return parser


def run_stages(config, stages, *, force: bool) -> dict:
    """Run `stages` in order; a stage the losses don't need (score for reference-free) is skipped."""
    from pipeline import demo, evaluate, score, tokenize, train
    from pipeline.ray_setup import init_ray

    if "tokenize" in stages and not config.demo.enabled:
        _check_input(config.data.path)  # a missing file is an error before Ray starts, not after
    init_ray(config.ray)
    from pipeline.resources import check_resources

    # A request this cluster can never satisfy fails now, naming the resource, instead of hanging.
    check_resources(config, stages=[s for s in stages if s != "score" or train.needs_reference(config)])
    modules = {"tokenize": tokenize, "score": score, "train": train, "evaluate": evaluate}
    manifests = {}
    if config.demo.enabled and "tokenize" in stages:
        manifests["demo"] = demo.prepare(config, force=force)
    for stage in stages:
        if stage == "score" and not train.needs_reference(config):
            logging.info("score: skipped, the configured loss needs no reference model")
            continue
        manifests[stage] = modules[stage].run(config, force=force)
    return manifests


def _check_input(path: str) -> None:
    import os

    from pipeline.formats import _BARE_HUB_NAME, InputError

    if not path:
        raise InputError("data.path is not set: name a JSONL/Parquet file, a directory, or a hub dataset")
    if "://" not in path and not os.path.exists(path) and not _BARE_HUB_NAME.match(path):
        raise InputError(f"{path}: no such file or directory (data.path)")


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import ConfigError
    from pipeline.formats import InputError
    from pipeline.resources import ResourceError

    try:
        return _main(argv)
    except (ConfigError, InputError, ResourceError) as err:
        print(f"dpo: error: {err}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from pipeline.config import load_config

    if args.command == "sweep":
        from pipeline import sweep

        sweep.run(args.config, args.overrides, force=args.force)
        print(f"report: {load_config(args.config, sweep.split_overrides(args.overrides)[0]).run_dir}/sweep/evaluate/report.md")
        return 0
    config = load_config(args.config, args.overrides)
    if args.command == "inspect":
        from pipeline.inspection import print_tokenize_audit

        if args.target != "tokenize":
            raise SystemExit("dpo inspect: only `dpo inspect tokenize` is available")
        print_tokenize_audit(config)
        return 0
    stages = STAGES if args.command == "run" else (args.command,)
    manifests = run_stages(config, stages, force=args.force)
    from pipeline.storage import RunDir

    run_dir = RunDir(config.run_dir)
    if "evaluate" in manifests:
        print(f"report: {run_dir.uri_of('evaluate', 'report.md')}")
        print(f"summary: {run_dir.uri_of('evaluate', 'summary.json')}")
    else:
        for stage in manifests:
            print(f"{stage}: {run_dir.uri_of(stage)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
