"""The chaos suite: faults injected into real runs on a fake multi-node Ray cluster, as Ray's own suites do.

One `ray.cluster_utils.Cluster` for the module: a head that runs no work (0 CPUs, its dashboard serving
`ray.util.state`) and two worker nodes of 2 CPUs. On it:

- run A, undisturbed: `dpo run` (tokenize, score, train with two workers, evaluate) in this process, on a
  dataset that also holds malformed JSON (deep nesting included), bad pairs, over-long prompts and
  responses, emoji, right-to-left text, combining marks and invalid UTF-8;
- run B, the same config into another run directory, as a `dpo run` subprocess while this process hurts
  it: SIGKILL the scorer actor with a batch in flight, then remove the node hosting the (restarted)
  scorer, whose pool starts again on the shards not yet written; SIGKILL a train worker after a
  checkpoint, then remove the node hosting the train workers (a node joins in place of each one
  removed, as an autoscaler's would); and, meanwhile, start a second
  `dpo run` on B's directory, which must be refused at once naming B's process.
Then B must equal A: tokenize and score shards row for row (ids, log-probs), final weights tensor for
tensor, training metrics (all but throughput), evaluate's samples. Equal to an undisturbed run means
nothing was lost or duplicated and recovery changed nothing; it is also the two-runs determinism check.

Besides: a finished run is a no-op; a batch that always kills its actor fails its stage within a bound
with one `dpo: error: score: ...` line naming the batch; max_length beyond the model's context is one
error line; the tokenize stage keeps unicode intact to disk and back and accounts for every bad row.

The chaos model (tests/helpers/chaos_model.py) sleeps in every forward pass so that stages last long enough to
be hit mid-way; its numbers are the tiny model's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from ray._common.test_utils import wait_for_condition
from ray.util.state import list_actors
from safetensors.torch import load_file

from pipeline.cli.main import main
from pipeline.config import RayConfig
from pipeline.runtime.ray_setup import init_ray
from pipeline.runtime.storage import RunDir, read_parquet_dir
from tests.helpers.chaos_model import make_chaos_model_dir
from tests.helpers.tiny import write_pairs

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "demo_smoke.yaml"
STEPS = 40
UNICODE = {
    "emoji": ("review 😀🎬:", " great 👍🏽 film", " awful 💩 film"),
    "rtl": ("مراجعة الفيلم:", " فيلم رائع", " فيلم ممل"),
    "combining": ("re\u0301view cafe\u0301:", " nai\u0308ve and good", " Zalgo z\u0336\u0327a\u0337lgo"),
    "mixed": ("שלום review:", " ok ✓ מצוין", " bad ✗ גרוע"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """The fake cluster. Its address is fixed before it starts and set as RAY_ADDRESS for every process
    of it: Ray's own helpers that look a cluster up (the state API, Ray Train's placement-group cleaner)
    would otherwise take the newest Ray on the machine, which need not be this one."""
    from ray.cluster_utils import Cluster

    address = f"{ray.util.get_node_ip_address()}:{free_port()}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_ADDRESS", address)
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "gcs_server_port": int(address.split(":")[1]),
                # A removed node is declared dead within about 3 s instead of Ray's default of tens of seconds.
                "_system_config": {
                    "health_check_initial_delay_ms": 0,
                    "health_check_period_ms": 1000,
                    "health_check_timeout_ms": 1000,
                    "health_check_failure_threshold": 3,
                },
                "include_dashboard": True,
                "dashboard_port": free_port(),
                "dashboard_host": "127.0.0.1",
            },
        )
        assert cluster.address == address, cluster.address
        workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
        cluster.wait_for_nodes()
        init_ray(RayConfig(address=address))  # as the CLI joins a cluster: Ray Data's order preserved
        try:
            yield cluster, workers
        finally:
            ray.shutdown()
            cluster.shutdown()


def chaos_data(path: Path) -> Path:
    """80 good pairs, then rows the tokenize stage must account for, one by one."""
    write_pairs(path, 80)
    rows = [json.dumps({"prompt": p, "chosen": c, "rejected": r}, ensure_ascii=False) for p, c, r in UNICODE.values()]
    rows += [
        "{not json",
        '{"prompt": '
        + "[" * 50_000
        + "]" * 50_000
        + ', "chosen": " a", "rejected": " b"}',  # deeper than Python parses
        '{"prompt": "p", "chosen": NaN, "rejected": " b"}',
        json.dumps({"prompt": "same:", "chosen": " same", "rejected": " same"}),
        json.dumps({"prompt": "missing:", "chosen": " only"}),
        json.dumps({"prompt": "empty:", "chosen": " fine", "rejected": " "}),
        json.dumps({"prompt": "long prompt " * 60 + ":", "chosen": " a good one", "rejected": " a bad one"}),
        json.dumps({"prompt": "long answer:", "chosen": " good" * 80, "rejected": " bad"}),
    ]
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(row + "\n" for row in rows)
    with open(path, "ab") as f:
        f.write(b'{"prompt": "bytes:", "chosen": " caf\xe9", "rejected": " ok"}\n')  # Latin-1, not UTF-8
        f.write(open(path, "rb").readline())  # the first pair again: a duplicate
    return path


@pytest.fixture(scope="module")
def setting(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("chaos")
    model = make_chaos_model_dir(tiny_model_dir, root / "chaos_model", sleep_s=0.05)
    data = chaos_data(root / "pairs.jsonl")
    overrides = [
        "demo.enabled=false",
        f"data.path={data}",
        f"model.path={model}",
        "model.trust_remote_code=true",
        "data.eval_fraction=0.2",
        "tokenize.max_prompt_length=48",
        "tokenize.max_length=96",
        "score.batch_size=2",
        "score.shard_rows=16",  # units of work small enough that some are written before the node goes
        "score.cpus_per_actor=1",
        "train.num_workers=2",
        "train.cpus_per_worker=0.5",
        "train.batch_size=8",
        "train.micro_batch_size=4",
        f"train.max_steps={STEPS}",
        "train.checkpoint_steps=4",
        "train.learning_rate=1e-3",
        "train.warmup_steps=0",
        "evaluate.num_prompts=2",
        "evaluate.temperatures=[1.0]",
        "evaluate.max_tokens=4",
        "evaluate.best_of_n=0",
        "evaluate.judge_vs_chosen=false",
        "evaluate.bootstrap_samples=20",
    ]
    return root, model, overrides


def argv(command: str, overrides: list[str], *more: str) -> list[str]:
    return [command, "--config", str(SMOKE), *(f"--set={o}" for o in overrides), *more]


@pytest.fixture(scope="module")
def run_a(cluster, setting):
    root, _, overrides = setting
    run_dir = root / "a"
    assert main(argv("run", [*overrides, f"run_dir={run_dir}"])) == 0
    return run_dir


# ---- run B and its faults ----------------------------------------------------------------------
class Driver:
    """`dpo run` as a subprocess driver on the cluster, its output collected line by line."""

    def __init__(self, cluster, overrides: list[str], log: Path) -> None:
        env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *argv("run", overrides)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.log = log
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with open(self.log, "w") as out:
            for line in self.process.stdout:
                self.lines.append(line)
                out.write(line)
                out.flush()

    def saw(self, text: str, times: int = 1) -> bool:
        return sum(text in line for line in self.lines) >= times

    def running(self) -> bool:
        """True while the driver runs; an error showing its output once it failed."""
        code = self.process.poll()
        assert code in (None, 0), f"dpo run exited {code}:\n{self.tail()}"
        return code is None

    def tail(self) -> str:
        noise = ("state-dump", "Reporting training result", "Loading weights", "Writing model", "PlacementGroupCleaner")
        return "".join([line for line in self.lines if line.strip() and not any(n in line for n in noise)][-150:])


def alive(class_part: str) -> list:
    actors = list_actors(address=os.environ["RAY_ADDRESS"], filters=[("state", "=", "ALIVE")], detail=True)
    return [a for a in actors if class_part in a.class_name]


def node_of(cluster, workers: list, node_id: str):
    return next(n for n in workers if n.node_id == node_id)


def in_flight(run_dir: Path, stage: str) -> list[dict]:
    notes = []
    for path in run_dir.glob(f".staging/{stage}-*/_scratch/in_flight/*.json"):
        try:
            notes.append({"pid": int(path.stem.rsplit("-", 1)[1]), **json.loads(path.read_text())})
        except (OSError, ValueError):
            pass  # caught mid-write
    return notes


def written(run_dir: Path, stage: str) -> int:
    """The shards the stage's attempt has written so far (whole files, not the bookkeeping)."""
    return sum(
        "_scratch" not in path.parts and ".tmp-" not in path.name
        for path in run_dir.glob(f".staging/{stage}-*/**/*.parquet")
    )


def until(driver: Driver, condition, *, timeout: float) -> None:
    """Wait for `condition` while the driver runs (failing at once, with its output, if it fails)."""
    wait_for_condition(
        lambda: condition() or not driver.running(), timeout=timeout, retry_interval_ms=50, raise_exceptions=True
    )
    assert condition(), f"dpo run ended first:\n{driver.tail()}"


def hurt_the_score_stage(cluster, workers: list, run_dir: Path, driver: Driver) -> None:
    """SIGKILL the scorer with a batch in flight; once its restart has another batch in flight and a shard is
    written (so that a pool started again has shards to skip), remove its node."""
    until(driver, lambda: in_flight(run_dir, "score"), timeout=240)
    first = in_flight(run_dir, "score")[0]
    (scorer,) = alive("ReferenceScorer")
    assert scorer.pid == first["pid"]  # the ledger's pid and the state API's: this cluster's scorer
    os.kill(scorer.pid, signal.SIGKILL)
    until(
        driver,
        lambda: (
            any(n["pid"] != first["pid"] and n["first"] != first["first"] for n in in_flight(run_dir, "score"))
            and written(run_dir, "score") > 0
        ),
        timeout=120,
    )
    (scorer,) = alive("ReferenceScorer")
    removed = node_of(cluster, workers, scorer.node_id)
    cluster.remove_node(removed, allow_graceful=False)
    workers[workers.index(removed)] = cluster.add_node(num_cpus=2)


def registered(run_dir: Path) -> int:
    """The last step whose checkpoint Ray Train has registered (what a recovery resumes from); 0 if none."""
    steps = [0]
    for snapshot in run_dir.glob("train.work/*/checkpoint_manager_snapshot.json"):
        try:
            steps += [
                int(c["checkpoint_dir_name"].split("-")[1])
                for c in json.loads(snapshot.read_text())["checkpoint_results"]
            ]
        except (OSError, ValueError, KeyError):
            pass  # caught mid-write
    return max(steps)


def hurt_the_train_stage(cluster, workers: list, run_dir: Path, driver: Driver) -> None:
    """SIGKILL a train worker once Ray Train has registered a checkpoint; once the recovered run has
    registered one of its own, remove the node that hosts the train workers."""
    until(driver, lambda: len(alive("RayTrainWorker")) == 2, timeout=300)
    victim = alive("RayTrainWorker")[1]  # known before the checkpoint lands: the kill follows it at once
    until(driver, lambda: registered(run_dir) > 0, timeout=300)
    first = registered(run_dir)
    os.kill(victim.pid, signal.SIGKILL)
    until(driver, lambda: driver.saw("train: resuming at step"), timeout=240)
    assert any(f"train: resuming at step {step} " in driver.tail() for step in range(first, STEPS, 4)), driver.tail()
    until(driver, lambda: len(alive("RayTrainWorker")) == 2, timeout=240)
    node = node_of(cluster, workers, alive("RayTrainWorker")[0].node_id)
    resumed = registered(run_dir)
    until(driver, lambda: registered(run_dir) > resumed, timeout=240)
    cluster.remove_node(node, allow_graceful=False)
    workers[workers.index(node)] = cluster.add_node(num_cpus=2)
    until(driver, lambda: driver.saw("train: resuming at step", times=2), timeout=240)


@pytest.fixture(scope="module")
def run_b(cluster, setting, run_a):
    """Run B as a subprocess, hurt as the module docstring says; returns its directory and its output."""
    root, _, overrides = setting
    run_dir = root / "b"
    driver = Driver(cluster[0], [*overrides, f"run_dir={run_dir}"], root / "b.log")
    hurt_the_score_stage(*cluster, run_dir, driver)
    until(driver, lambda: (run_dir / "score" / "manifest.json").exists(), timeout=300)
    second = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *argv("run", [*overrides, f"run_dir={run_dir}"])],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    hurt_the_train_stage(*cluster, run_dir, driver)
    assert driver.process.wait(timeout=600) == 0, driver.tail()
    driver.reader.join(timeout=10)
    out, err = second.communicate(timeout=120)
    return run_dir, driver, subprocess.CompletedProcess(second.args, second.returncode, out, err)


# ---- what B must show --------------------------------------------------------------------------
def test_a_second_writer_on_a_run_dir_being_written_is_refused_naming_the_first(run_b):
    run_dir, driver, second = run_b
    assert second.returncode == 2
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"dpo: error: run: {run_dir} is being written by another process: pid {driver.process.pid} "
    ), last


def test_killed_and_lost_scorers_and_train_workers_lose_and_duplicate_nothing(run_a, run_b):
    run_b_dir, driver, _ = run_b
    a, b = RunDir(str(run_a)), RunDir(str(run_b_dir))
    for split in ("train", "eval"):
        for stage in ("tokenize", "score"):
            assert read_parquet_dir(b, f"{stage}/{split}").equals(read_parquet_dir(a, f"{stage}/{split}")), (
                stage,
                split,
            )
        scored = read_parquet_dir(b, f"score/{split}")["id"].to_pylist()
        assert scored == read_parquet_dir(b, f"tokenize/{split}")["id"].to_pylist() and len(set(scored)) == len(scored)
    # Recovery redid the units in flight at the kill and the node loss, not the input: the rows scored a second
    # time are fewer than the input (a pool started again skips the shards already written).
    rows, passes = b.manifest("tokenize")["rows_out"], b.manifest("score")["scoring_passes"]
    assert a.manifest("score")["scoring_passes"] == {"rows": rows, "redone": 0}
    assert 0 < passes["redone"] < rows and passes["rows"] == rows + passes["redone"], passes
    if len(b.manifest("score")["pool_starts"]) > 1:  # Ray gave the pool up with the node: it started again
        assert driver.saw("shards are written already; scoring the other")
    weights_a, weights_b = (load_file(str(r / "train" / "final" / "model.safetensors")) for r in (run_a, run_b_dir))
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert (weights_a[name] - weights_b[name]).abs().max() <= 1e-6, name
    metrics_a, metrics_b = (
        a.read_text("train/metrics.jsonl").splitlines(),
        b.read_text("train/metrics.jsonl").splitlines(),
    )
    assert len(metrics_b) == STEPS
    for row_a, row_b in zip(map(json.loads, metrics_a), map(json.loads, metrics_b)):
        for key in row_a.keys() - {"tokens_per_s"}:
            assert row_b[key] == pytest.approx(row_a[key], abs=1e-6), (row_a["step"], key)
    samples_a, samples_b = (pq.read_table(str(r / "evaluate" / "samples.parquet")) for r in (run_a, run_b_dir))
    assert samples_b.equals(samples_a)
    assert driver.saw("train: resuming at step", times=2)


# ---- runs of their own ---------------------------------------------------------------------------
def test_a_finished_run_is_a_no_op(run_a, setting, capsys):
    _, _, overrides = setting
    before = {s: RunDir(str(run_a)).manifest(s)["manifest_hash"] for s in ("tokenize", "score", "train", "evaluate")}
    assert main(argv("run", [*overrides, f"run_dir={run_a}"])) == 0
    assert "every stage finished (tokenize, score, train, evaluate); nothing to do" in capsys.readouterr().out
    assert {s: RunDir(str(run_a)).manifest(s)["manifest_hash"] for s in before} == before


def test_a_batch_that_always_kills_its_actor_fails_the_stage_naming_it(cluster, setting, tiny_model_dir, capsys):
    root, _, overrides = setting
    poison = make_chaos_model_dir(tiny_model_dir, root / "poison_model", kill_token=50)  # "Q"
    run_dir = root / "poison"
    data = write_pairs(root / "poison.jsonl", 40)
    with open(data, "a") as f:
        f.write(json.dumps({"prompt": "review Q:", "chosen": " good", "rejected": " bad"}) + "\n")
    mine = [*overrides, f"run_dir={run_dir}", f"model.path={poison}", f"data.path={data}", "ray.max_retries=1"]
    assert main(argv("tokenize", mine)) == 0
    capsys.readouterr()
    assert main(argv("score", mine)) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("dpo: error: score: the batch of "), last
    assert "was in flight in 2 actor deaths and ran out of retries (ray.max_retries=1)" in last
    assert RunDir(str(run_dir)).manifest("score") is None
    assert not any(run_dir.glob(".staging/*"))  # the failed attempt left nothing behind


def test_max_length_beyond_the_models_context_is_one_error_line(cluster, setting, capsys):
    root, _, overrides = setting
    assert main(argv("tokenize", [*overrides, f"run_dir={root / 'too_long'}", "tokenize.max_length=4096"])) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("dpo: error: tokenize: tokenize.max_length (4096) is beyond the context of the model"), last


def test_tokenize_accounts_for_every_bad_row_and_keeps_unicode_to_disk_and_back(run_a, setting):
    from pipeline.model.pretrained import load_tokenizer
    from pipeline.stages.tokenize import rejected_rows

    _, model, _ = setting
    run = RunDir(str(run_a))
    manifest = run.manifest("tokenize")
    assert manifest["rows_in"] == 80 + len(UNICODE) + 10
    assert manifest["rows_in"] == manifest["rows_out"] + sum(manifest["dropped"].values())
    assert manifest["dropped"] == {
        "malformed_json": 3,
        "identical_responses": 1,
        "missing_field": 1,
        "empty_response": 1,
        "invalid_utf8": 1,
        "duplicate_pair": 1,
    }
    assert manifest["audit"]["prompt_truncated"] >= 1 and manifest["audit"]["response_truncated"] >= 1
    rejected = rejected_rows(run)
    assert next(r for r in rejected if r["reason"] == "invalid_utf8")["raw"].startswith(
        '{"prompt": "bytes:", "chosen": " caf\\xe9"'
    )
    assert any(r["reason"] == "malformed_json" and r["raw"].startswith('{"prompt": [[[[') for r in rejected)
    tokenizer = load_tokenizer(str(model), trust_remote_code=True)
    kept = [row for split in ("train", "eval") for row in read_parquet_dir(run, f"tokenize/{split}").to_pylist()]
    decoded = {tokenizer.decode(r["prompt_ids"]): r for r in kept}
    for prompt, chosen, rejected_text in UNICODE.values():
        row = decoded[prompt]  # byte for byte: no normalisation, no lost marks
        assert tokenizer.decode(row["chosen_ids"], skip_special_tokens=True) == chosen
        assert tokenizer.decode(row["rejected_ids"], skip_special_tokens=True) == rejected_text


def test_a_non_finite_step_stops_training_naming_the_step_and_its_pairs(run_a, setting):
    """A learning rate of 1e30 sends the weights to about 1e30 in one step: the next step's loss is not finite."""
    from pipeline.config import load_config
    from pipeline.stages import TRAIN
    from pipeline.stages.base import failed_stage
    from pipeline.stages.train import NonFiniteStepError

    root, _, overrides = setting
    out = RunDir(str(root / "nonfinite"))
    config = load_config(
        str(SMOKE),
        [*overrides, f"run_dir={out.uri}", "train.learning_rate=1e30", "train.num_workers=1", "train.max_steps=4"],
    )
    with pytest.raises(
        NonFiniteStepError,
        match=r"^step 2: the loss \((nan|inf|-inf)\) or the gradient norm \(\S+\) is not finite; "
        r"the step's pairs: [0-9a-f]{16}, ",
    ) as stopped:
        TRAIN.run(config, data_dir=RunDir(str(run_a)))
    assert failed_stage(stopped.value) == "train"
    assert "The weights are those of step 1" in str(stopped.value)
    assert out.manifest("train") is None and not any((root / "nonfinite").glob(".staging/*"))
