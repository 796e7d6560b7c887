"""The train stage's capacity check: a GPU run that cannot fit the cluster's GPUs is refused before any
worker starts, naming the numbers, instead of failing minutes later with CUDA out of memory.

The figures are `pipeline.planning.memory`'s (what `dpo plan` prints); the GPU size is the cluster's
smallest (`pipeline.runtime.gpus`). CPU runs are not planned. Where the plan cannot be made (a model
type it does not model, a config.json it cannot read, GPUs of unknown size) the run goes ahead with a
warning: the check may only refuse what it knows cannot fit.
"""

from __future__ import annotations

import logging

from pipeline.config import Config
from pipeline.planning.memory import (
    GIB,
    CapacityError,
    configured_setup,
    estimate,
    fewest_gpus,
    for_run,
    setups,
    usable_bytes,
)
from pipeline.runtime.gpus import cluster_gpu_memory
from pipeline.runtime.resources import ResourceError

log = logging.getLogger(__name__)


def check_fits(config: Config) -> None:
    """Raise ResourceError when the configured train run needs more memory per GPU than the cluster's GPUs have."""
    train = config.train
    if not train.use_gpu:
        return
    try:
        shape, work = for_run(config)
    except CapacityError as err:
        log.warning("train: no capacity plan (%s); starting without one", err)
        return
    gpus = cluster_gpu_memory()
    if gpus is None:
        log.warning(
            "train: the cluster's GPU memory is unknown, so the run is not checked against it "
            "(`dpo plan --config X --gpu-gib N` shows what it needs)"
        )
        return
    setup = configured_setup(train)
    memory = estimate(shape, setup, work, workers=train.num_workers)
    usable = usable_bytes(gpus.gib)
    if memory.peak <= usable:
        log.info(
            "train: the plan puts %s at %.1f GiB per GPU, within %.1f of the %.1f GiB GPUs (%s)",
            setup.label,
            memory.peak / GIB,
            usable / GIB,
            gpus.gib,
            gpus.source,
        )
        return
    alternatives = []
    for other in setups(train):
        count = fewest_gpus(shape, other, work, gpu_gib=gpus.gib)
        if other != setup and count is not None:
            alternatives.append(f"{other.label} fits on {count}")
    suggestion = (
        f"; on such GPUs {', '.join(alternatives)}"
        if alternatives
        else "; no strategy fits: shorten tokenize.max_length, lower train.micro_batch_size, or "
        "turn on train.gradient_checkpointing and train.chunked_logps"
    )
    raise ResourceError(
        f"{setup.label} at train.num_workers={train.num_workers} needs {memory.peak / GIB:.1f} GiB per GPU "
        f"(weights {memory.weights / GIB:.1f}, gradients {memory.gradients / GIB:.1f}, optimizer "
        f"{memory.optimizer / GIB:.1f}, activations {memory.activations / GIB:.1f}) but this cluster's GPUs have "
        f"{gpus.gib:.1f} GiB ({gpus.source}), {usable / GIB:.1f} usable{suggestion} (`dpo plan --gpu-gib {gpus.gib:g}` "
        "on this config shows the table)"
    )
