"""`dpo train` refuses a GPU run that cannot fit the cluster's GPUs before any worker starts, naming the
numbers. The local Ray here declares one GPU labelled H100 (Ray trusts what it is told; nvidia-smi is
absent, so the GPU's size comes from its accelerator_type), and the model is only a config.json:
nothing is loaded, which is the point of the check."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline.cli.main import main
from pipeline.config import load_config
from pipeline.runtime.gpus import cluster_gpu_memory
from pipeline.stages.fit_check import check_fits
from tests.helpers.model_configs import LLAMA_8B


@pytest.fixture(scope="module", autouse=True)
def ray_with_a_labelled_gpu():
    import ray

    ray.init(address="local", num_cpus=1, num_gpus=1, resources={"accelerator_type:H100": 1}, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture
def llama8b_config(tmp_path):
    from pipeline.demo.tiny_model import train_tokenizer

    model = tmp_path / "llama8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_8B))
    train_tokenizer(["a b c"] * 10, vocab_size=300).save_pretrained(model)  # what tokenize and train load first
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    path = tmp_path / "c.yaml"
    path.write_text(
        f"run_dir: {tmp_path}/run\ndata: {{path: {pairs}}}\nmodel: {{path: {model}}}\n"
        "tokenize: {max_length: 2048}\n"
        "train: {use_gpu: true, num_workers: 1, batch_size: 8, micro_batch_size: 2, cpus_per_worker: 0.5,\n"
        "        chunked_logps: true, gradient_checkpointing: true}\n"
    )
    return path


def test_the_gpu_size_comes_from_the_accelerator_label():
    found = cluster_gpu_memory()
    assert found is not None and found.gib == pytest.approx(79.65) and found.source == "accelerator_type H100"


def test_dpo_run_refuses_it_before_any_stage_runs_naming_the_numbers(llama8b_config, capsys):
    # The check needs the cluster's GPUs, so it comes after the checks of the config and the files (which
    # need no Ray) and before the first stage; `dpo train` alone would first need a finished score stage.
    assert main(["run", "--config", str(llama8b_config)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dpo: error: train: ddp at train.num_workers=1 needs "), last
    assert (
        "GiB per GPU (weights " in last
        and "but this cluster's GPUs have 79.7 GiB (accelerator_type H100), 71.7 usable" in last
    )
    assert "fsdp + cpu offload fits on 1" in last and "lora r=16 (ddp) fits on 1" in last
    assert not (llama8b_config.parent / "run" / "tokenize").exists()  # refused before tokenize ran
    assert not (llama8b_config.parent / "run" / "train.work").exists()  # no worker started


def test_a_run_that_fits_passes_and_cpu_runs_are_not_planned(llama8b_config, caplog):
    fits = load_config(llama8b_config, ["train.lora={r: 16}"])
    with caplog.at_level(logging.INFO, logger="pipeline.stages.fit_check"):
        check_fits(fits)
    assert "lora r=16 (ddp) at" in caplog.text and "within 71.7 of the 79.7 GiB GPUs" in caplog.text
    check_fits(load_config(llama8b_config, ["train.use_gpu=false", "model.path=/nowhere"]))  # no plan, no error
