"""The docs' code stays true: the custom-loss example of docs/losses.md registers and plugs into compute_loss,
and every YAML block of the README and of docs/losses.md loads as a config."""

import re
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.unit
README = Path(__file__).parent.parent / "README.md"
LOSSES_PAGE = Path(__file__).parent.parent / "docs" / "losses.md"


def test_custom_loss_example_registers_and_trains():
    from pipeline.training.losses import LOSSES, PairLogps, compute_loss

    block = re.search(r"```python\n(.*?)```", LOSSES_PAGE.read_text(), re.S).group(1)
    exec(compile(block, "docs/losses.md", "exec"), {})
    try:
        batch = PairLogps(
            policy_chosen_logps=torch.tensor([-10.0, -12.0], requires_grad=True),
            policy_rejected_logps=torch.tensor([-11.0, -9.0]),
            ref_chosen_logps=torch.tensor([-10.5, -12.0]),
            ref_rejected_logps=torch.tensor([-10.5, -9.5]),
        )
        with_margin = compute_loss("dpo_margin", batch, beta=0.1, gamma=0.0)
        torch.testing.assert_close(with_margin.loss, compute_loss("dpo", batch, beta=0.1).loss)
        assert compute_loss("dpo_margin", batch, beta=0.1, gamma=0.5).loss > with_margin.loss
    finally:
        LOSSES.pop("dpo_margin", None)


def test_every_yaml_config_block_is_a_valid_config(tmp_path):
    """Every YAML block of the README and of docs/losses.md loads as a config: no misspelt key, no wrong
    type; the loss pages' train sections also pass the losses' up-front check."""
    from pipeline.config import load_config
    from pipeline.training.losses import check_loss_config

    losses = re.findall(r"```yaml\n(.*?)```", LOSSES_PAGE.read_text(), re.S)
    assert len(losses) >= 4
    for i, block in enumerate(losses):
        path = tmp_path / f"losses{i}.yaml"
        path.write_text(block)
        check_loss_config(load_config(path).train)
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 4
    for i, block in enumerate(blocks):
        path = tmp_path / f"block{i}.yaml"
        path.write_text(block)
        load_config(path)  # raises ConfigError naming the key
