"""cluster.yaml passes the autoscaler's own schema and the checks `ray up` makes before launching anything.
Outside the unit tier because it imports Ray (its schema file and validator); it starts no cluster."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_yaml_passes_the_autoscalers_schema():
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema = pytest.importorskip("jsonschema")
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    # What `ray up` does before launching anything: merge the provider's defaults, then validate.
    validate_config(prepare_config(copy.deepcopy(cluster)))
