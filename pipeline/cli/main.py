"""`dpo`: run the pipeline, or one stage of it, from a config file.

dpo run --config configs/demo.yaml                 every stage (the demo's preparation first)
dpo tokenize|score|train|evaluate --config X       one stage
dpo sweep --config X --set train.beta=[0.05,0.5]   several policies from one score stage
dpo iterate --config X [--from-round N]            on-policy rounds: sample, label, pair, train, repeat
dpo inspect tokenize --config X                    the tokenize audit as a table
dpo plan --config X [--gpu-gib 80 ...]             GPU memory per strategy and the fewest GPUs that fit
dpo submission-id --config X [--stage S]           the `ray job submit --submission-id` of this work
dpo init DATA [--model M] [--output X.yaml]        a starter config for a data file (format and columns detected)
dpo tiny-model DIR [--data DATA]                   a tiny local model and tokenizer, to try things without the hub
--set a.b=value                                    override any config key (repeatable)
--force                                            redo the named stage(s) even if finished
run --from-stage S | --only S | --to-stage S       redo S and what follows | redo S alone | stop after S
"""

from __future__ import annotations

import argparse
import sys
import traceback

from pipeline.cli import sweep
from pipeline.cli.inspection import print_tokenize_audit
from pipeline.cli.iterate import iterate
from pipeline.cli.plan import print_plan
from pipeline.cli.preflight import check_before_planning, preflight
from pipeline.cli.schedule import plan_run, run_stages, submission_id
from pipeline.cli.starter import tiny_model, write_starter
from pipeline.config import ConfigError, load_config
from pipeline.data.sources import InputError
from pipeline.planning.memory import CapacityError
from pipeline.runtime import logs
from pipeline.runtime.lease import LeaseError
from pipeline.runtime.resources import ResourceError
from pipeline.runtime.storage import RunDir
from pipeline.stages import STAGE_NAMES
from pipeline.stages.base import failed_stage, one_line

# Errors in what the user asked for (exit 2, no traceback); any other failure exits 1 after its traceback.
USER_ERRORS = (ConfigError, InputError, ResourceError, LeaseError, CapacityError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo", description="Direct Preference Optimization as Ray stages.")
    parser.add_argument(
        "command",
        choices=("run", *STAGE_NAMES, "sweep", "inspect", "submission-id", "plan", "iterate", "init", "tiny-model"),
    )
    parser.add_argument(
        "target", nargs="?", help="inspect: the stage to show (tokenize); init: the data file; tiny-model: the folder"
    )
    parser.add_argument("--config", help="experiment YAML (see configs/; `dpo init DATA` writes one)")
    parser.add_argument("--model", help="init: the model folder or hub id to name in the config")
    parser.add_argument("--output", help="init: where to write the config (default: <data name>.yaml)")
    parser.add_argument("--data", help="tiny-model: train the tokenizer on this data file's text")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.beta=0.5 (repeatable)",
    )
    parser.add_argument("--force", action="store_true", help="redo finished stages instead of skipping them")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's and the libraries' output too (or RAYDPO_LOG_LEVEL=INFO|WARNING); the run's log file "
        "under <run_dir>/logs/ keeps it either way",
    )
    parser.add_argument("--from-stage", choices=STAGE_NAMES, help="run: redo this stage and every stage after it")
    parser.add_argument(
        "--only", choices=STAGE_NAMES, help="run: redo this stage alone (the stages before it must be finished)"
    )
    parser.add_argument("--to-stage", choices=STAGE_NAMES, help="run: stop after this stage")
    parser.add_argument("--from-round", type=int, help="iterate: redo this round and every round after it")
    parser.add_argument(
        "--gpu-gib",
        type=float,
        action="append",
        metavar="GIB",
        help="plan: the memory of one GPU; repeat for several sizes (default 80)",
    )
    parser.add_argument(
        "--stage",
        default="run",
        choices=("run", *STAGE_NAMES, "iterate"),
        help="submission-id: the id of a job running this stage (default: the whole run; iterate: the rounds)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Every failure ends in one line, `dpo: error: <stage>: <what happened>` (the command where no stage
    was running), and a non-zero exit."""
    args = build_parser().parse_args(argv)
    logs.setup(verbose=args.verbose)
    try:
        return _main(args)
    except KeyboardInterrupt as err:
        print(f"dpo: error: {failed_stage(err) or args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        logs.log_exception(err)  # the whole story, in the run's log file
        where = failed_stage(err) or args.command
        # Messages that already name their stage ("train: ...") are not prefixed twice.
        line = f"dpo: error: {where}: {one_line(err).removeprefix(f'{where}: ')}"
        if not isinstance(err, USER_ERRORS):
            if args.verbose:
                traceback.print_exception(err)
            if logs.STATE.log_path:
                line += f" (traceback in {logs.STATE.log_path})"
        print(line, file=sys.stderr, flush=True)
        return 2 if isinstance(err, USER_ERRORS) else 1
    finally:
        logs.close_log()


def _main(args: argparse.Namespace) -> int:
    if args.command in ("init", "tiny-model"):
        if not args.target:
            raise ConfigError(f"dpo {args.command}: name the {'data file' if args.command == 'init' else 'folder'}")
        if args.command == "init":
            print(write_starter(args.target, output=args.output, model=args.model, force=args.force))
        else:
            print(tiny_model(args.target, data=args.data))
        return 0
    if not args.config:
        raise ConfigError(f"dpo {args.command} needs --config (an experiment YAML; `dpo init DATA` writes one)")
    if args.command == "sweep":
        run_dir = load_config(args.config, sweep.split_overrides(args.overrides)[0]).run_dir
        logs.keep_log(run_dir)
        sweep.run(args.config, args.overrides, force=args.force)
        print(f"report: {run_dir}/sweep/evaluate/report.md")
        return 0
    config = load_config(args.config, args.overrides)
    if args.command in ("run", "iterate", *STAGE_NAMES):
        logs.keep_log(config.run_dir)
    if args.command != "run" and (args.from_stage or args.only or args.to_stage):
        raise ConfigError("--from-stage, --only and --to-stage go with `dpo run`")
    if args.command != "iterate" and args.from_round is not None:
        raise ConfigError("--from-round goes with `dpo iterate`")
    if args.command == "iterate":
        iterate(config, from_round=args.from_round, force=args.force)
        return 0
    if args.command == "submission-id":
        print(submission_id(config, args.stage))
        return 0
    if args.command == "plan":
        print_plan(config, args.gpu_gib)
        return 0
    if args.command == "inspect":
        if args.target != "tokenize":
            raise SystemExit("dpo inspect: only `dpo inspect tokenize` is available")
        print_tokenize_audit(config)
        return 0
    check_before_planning(config)
    if args.command == "run":
        plan = plan_run(config, from_stage=args.from_stage, only=args.only, to_stage=args.to_stage, force=args.force)
        if plan.run:
            preflight(config, plan.run)  # everything knowable from the config and the files, before Ray starts
        print(plan.describe(config.run_dir), flush=True)
        if not plan.run:
            return 0  # nothing to do: no Ray started
        manifests = run_stages(config, plan.run, force=True if args.force else plan.force)  # --force: the demo too
    else:
        preflight(config, (args.command,))
        manifests = run_stages(config, (args.command,), force=args.force)
    print_outputs(RunDir(config.run_dir), manifests)
    return 0


def print_outputs(run_dir: RunDir, manifests: dict[str, dict]) -> None:
    if "evaluate" in manifests:
        print(f"report: {run_dir.uri_of('evaluate', 'report.md')}")
        print(f"summary: {run_dir.uri_of('evaluate', 'summary.json')}")
        return
    for stage in manifests:
        print(f"{stage}: {run_dir.uri_of(stage)}")


if __name__ == "__main__":
    sys.exit(main())
