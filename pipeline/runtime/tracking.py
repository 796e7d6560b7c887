"""Experiment trackers (TensorBoard, MLflow, W&B: any subset, as `train.report_to` names them), and the live
metrics.jsonl of a training attempt.

Rank 0 of training logs every logged step under TRL's metric names (`train/loss`, `train/rewards/chosen`,
...) with the config as the run's parameters; the evaluate stage logs its summary (win rates with their
intervals, reward and KL per temperature) to the same run. A training attempt is one tracking run: a
resumed worker and the evaluate stage join it through `TrackingRun`, which the train manifest keeps. A run
is named `<run_dir name>/train[/<member>]` (a sweep member, or round-<t>) in every tracker; the attempt (a
hash of the settings and the data) only identifies it.

Where each writes, for a local run directory:
  tensorboard  <top run_dir>/tensorboard/<run name>/   (`tensorboard --logdir <run_dir>/tensorboard`)
  mlflow       train.mlflow_tracking_uri, else a local file store at <run_dir>/mlruns
  wandb        <run_dir>/wandb/: offline unless WANDB_API_KEY or WANDB_MODE says otherwise
On s3:// or gs://, the TensorBoard and W&B files are written on the node and copied into the run directory
at each checkpoint and at the end; MLflow then needs a tracking URI (a file store cannot live in a bucket).

Each library is imported when its tracker opens: none is needed unless named, and each takes seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError, TrainConfig
from pipeline.runtime.storage import RunDir

TRACKERS = ("tensorboard", "mlflow", "wandb")
SYNCED = ("tensorboard", "wandb")  # folders copied into a remote run directory
SUMMARY_KEYS = ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "reward_mean", "kl_mean")


@dataclass(frozen=True)
class TrackingRun:
    """One training attempt's tracking run: where its trackers write and what names it.

    attempt: the attempt's folder under train.work (config hash and upstream hash); run_id, derived from the
    run directory and the attempt, is the W&B run id and an MLflow tag, so every writer finds the same run.
    """

    run_dir: str
    attempt: str
    report_to: tuple[str, ...]
    project: str
    mlflow_tracking_uri: str | None
    name: str = ""  # what a person sees: "<run_dir name>/train[/<member>]" (`run_name`); "": the attempt

    @property
    def display_name(self) -> str:
        return self.name or self.attempt

    @property
    def home(self) -> str:
        """The run directory whose tensorboard/ folder holds this run: a sweep member's or a round's is the
        top run directory's, so that one `tensorboard --logdir <run_dir>/tensorboard` shows them all."""
        return run_name(self.run_dir, "train")[0] if self.name else self.run_dir

    @property
    def run_id(self) -> str:
        return hashlib.sha256(f"{self.run_dir}|{self.attempt}".encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "report_to": list(self.report_to)}

    @classmethod
    def from_dict(cls, fields: dict) -> TrackingRun:
        return cls(**{**fields, "report_to": tuple(fields["report_to"])})


def run_name(run_dir: str, stage: str) -> tuple[str, str]:
    """(the top run directory, the tracker run's name `<run_dir name>/<stage>[/<member>]`) of a stage writing
    in `run_dir`: a sweep member's folder `<run_dir>/sweep/<member>`, a round's `<run_dir>/rounds/<t>`
    (named round-<t>), or the run directory itself."""
    parts = run_dir.rstrip("/").split("/")
    if len(parts) >= 3 and parts[-2] in ("sweep", "rounds"):
        member = parts[-1] if parts[-2] == "sweep" else f"round-{parts[-1]}"
        return "/".join(parts[:-2]), f"{parts[-3]}/{stage}/{member}"
    return run_dir, f"{parts[-1]}/{stage}"


def tracking_run(train: TrainConfig, run_dir: str, attempt: str) -> TrackingRun:
    return TrackingRun(
        run_dir,
        attempt,
        tuple(train.report_to),
        train.tracker_project,
        train.mlflow_tracking_uri,
        name=run_name(run_dir, "train")[1],
    )


def check_trackers(train: TrainConfig, run_dir: str) -> None:
    """Refuse, before any worker starts, a tracker that is unknown, not installed, or cannot write here."""
    for name in train.report_to:
        if name not in TRACKERS:
            raise ConfigError(f"train.report_to: unknown tracker {name!r} (known: {', '.join(TRACKERS)})")
        if importlib.util.find_spec(name) is None:  # each tracker's module has the tracker's name
            raise ConfigError(f"train.report_to: {name} needs the {name} package: pip install 'raydpo[trackers]'")
    if "mlflow" in train.report_to and "://" in run_dir and not train.mlflow_tracking_uri:
        raise ConfigError(
            f"train.report_to: mlflow with run_dir {run_dir} needs train.mlflow_tracking_uri "
            "(an MLflow server): its default file store cannot live in an object store"
        )


def train_metrics(row: dict) -> dict[str, float]:
    """A metrics.jsonl row under TRL's names (`train/loss`, `train/rewards/chosen`, ...), numbers only."""
    return {f"train/{key}": float(value) for key, value in row.items() if key != "step" and _number(value)}


def summary_metrics(rows: list[dict], models: list[str]) -> dict[str, float]:
    """The evaluate summary rows of `models` as `eval/T<temperature>/<model>/<key>` scalars."""
    return {
        f"eval/T{row['temperature']:g}/{row['model']}/{key}": float(row[key])
        for row in rows
        if row["model"] in models
        for key in SUMMARY_KEYS
        if _number(row.get(key))
    }


def flat_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as `section.key: value` strings, the form run parameters take."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Trackers:
    """The open trackers of a TrackingRun. `params` (the config, flattened) are logged when a run is created;
    `resume_step` hides what an interrupted attempt logged after the checkpoint it resumes from."""

    def __init__(self, run: TrackingRun, *, params: dict[str, str] | None = None, resume_step: int = 0):
        self.run = run
        self._remote = "://" in run.run_dir
        self.root = tempfile.mkdtemp(prefix="raydpo-trackers-") if self._remote else RunDir(run.run_dir).root
        # TensorBoard's runs of a whole run directory (sweep members, rounds) share its top tensorboard/ folder.
        self.board_root = os.path.join(self.root, "board") if self._remote else RunDir(run.home).root
        opener = {"tensorboard": _TensorBoard, "mlflow": _Mlflow, "wandb": _Wandb}
        self._writers = [opener[name](self, params, resume_step) for name in run.report_to]

    def log(self, values: dict[str, float], *, step: int) -> None:
        for writer in self._writers:
            writer.log(values, step)

    def sync(self) -> None:
        """Copy the node-local files of a remote run directory into it (nothing to do for a local one)."""
        if self._remote:
            board = os.path.join(self.board_root, "tensorboard")
            if os.path.isdir(board):
                RunDir(self.run.home).upload_dir(board, "tensorboard")
            for folder in SYNCED:
                if folder != "tensorboard" and os.path.isdir(os.path.join(self.root, folder)):
                    RunDir(self.run.run_dir).upload_dir(os.path.join(self.root, folder), folder)

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        self.sync()
        if self._remote:
            shutil.rmtree(self.root, ignore_errors=True)


class _TensorBoard:
    def __init__(self, trackers: Trackers, params: dict | None, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter  # deferred: see the module docstring

        folder = os.path.join(trackers.board_root, "tensorboard", *trackers.run.display_name.split("/"))
        _set_aside_other_attempt(folder, trackers.run.attempt)
        self.writer = SummaryWriter(folder, purge_step=resume_step + 1 if resume_step else None)
        if params:  # TensorBoard has no run parameters: the config goes in as text, one line a key
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(params.items())))

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # watchable as it happens

    def close(self) -> None:
        self.writer.close()


ATTEMPT_MARK = ".raydpo-attempt"  # in a TensorBoard run's folder: the training attempt its events belong to


def _set_aside_other_attempt(folder: str, attempt: str) -> None:
    """A TensorBoard run is named by the run directory and stage, so other settings (another attempt) reuse
    its folder: the other attempt's event files move to `<folder>@<its attempt>`, a run of its own beside,
    instead of mixing their steps with these. Sub-folders (a sweep member's runs) stay where they are."""
    mark = os.path.join(folder, ATTEMPT_MARK)
    if os.path.isfile(mark):
        with open(mark, encoding="utf-8") as f:
            before = f.read().strip()
        if before != attempt:
            aside = f"{folder}@{before[:8]}"
            os.makedirs(aside, exist_ok=True)
            for name in os.listdir(folder):
                if os.path.isfile(os.path.join(folder, name)):
                    os.replace(os.path.join(folder, name), os.path.join(aside, name))
    os.makedirs(folder, exist_ok=True)
    with open(mark, "w", encoding="utf-8") as f:
        f.write(attempt)


class _Mlflow:
    TAG = "raydpo_run_id"

    def __init__(self, trackers: Trackers, params: dict | None, resume_step: int):
        from mlflow.entities import Metric, Param  # deferred: see the module docstring
        from mlflow.tracking import MlflowClient

        self._metric = Metric
        run = trackers.run
        uri = run.mlflow_tracking_uri or "file:" + os.path.join(trackers.root, "mlruns")
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants this opt-in for a file store
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(run.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(run.project)
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.{self.TAG} = '{run.run_id}'", max_results=1
        )
        if found:
            self.run_id = found[0].info.run_id
            return
        self.run_id = self.client.create_run(
            experiment_id,
            run_name=run.display_name,
            tags={self.TAG: run.run_id, "raydpo_run_dir": run.run_dir, "raydpo_attempt": run.attempt},
        ).info.run_id
        items = sorted((params or {}).items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters a batch
            self.client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in items[i : i + 100]])

    def log(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _Wandb:
    def __init__(self, trackers: Trackers, params: dict | None, resume_step: int):
        import wandb  # deferred: see the module docstring

        run = trackers.run
        # Offline without a key: the run is complete on disk, and `wandb sync` uploads it later.
        mode = None if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY") else "offline"
        os.makedirs(trackers.root, exist_ok=True)
        self.run = wandb.init(
            dir=trackers.root,
            project=run.project,
            id=run.run_id,
            name=run.display_name,
            resume="allow",
            mode=mode,
            config=params or None,
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLog:
    """A training attempt's metrics.jsonl, one JSON line per logged step, written as the step is logged, so
    that a crashed or stopped run keeps its curve. Opening it rewrites it from `history` (the rows of the
    checkpoint a run resumes from: what was logged after that checkpoint is logged again). On a local disk
    each row is appended and flushed; an object store cannot append, so there the file is rewritten at most
    every `rewrite_s` seconds, and on `flush`."""

    def __init__(self, run_dir: RunDir, rel: str, history: list[dict], *, rewrite_s: float = 30.0):
        self.run_dir, self.rel, self.rows, self.rewrite_s = run_dir, rel, list(history), rewrite_s
        self._local = "://" not in run_dir.uri
        self._written = 0.0
        self.flush()

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self._local:
            with open(self.run_dir.path(self.rel), "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        elif time.monotonic() - self._written >= self.rewrite_s:
            self.flush()

    def flush(self) -> None:
        self.run_dir.write_text(self.rel, "".join(json.dumps(row) + "\n" for row in self.rows))
        self._written = time.monotonic()
