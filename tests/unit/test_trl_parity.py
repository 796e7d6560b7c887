"""TRL 1.16's own loss code and ours give the same loss and gradient on the same per-token log-probs.

TRL is not a dependency: this runs where it is installed (`pip install trl==1.16.0`) and skips elsewhere.
TRL's loss lives in `DPOTrainer._compute_loss`, which calls the policy (and the reference) for per-token
log-probs through TRL's fused output layer. Here both are `FusedHeadLogps`, a module that returns fixed
per-token log-probs (and WPO's log sum_v p^2) in the fields TRL reads, so TRL's code runs unchanged on
numbers we also hand to ours, summed over the same completion masks. The trainer object is made
without its `__init__` (which would load a model and a dataset): the attributes `_compute_loss` reads
are set from a real `DPOConfig`, as `__init__` sets them.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from pipeline.training.losses import PairLogps, compute_loss

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer", reason="TRL is an optional check: pip install trl==1.16.0")

B, T = 4, 9  # pairs; sequence length (prompt + completion + padding)
PROMPTS = [2, 3, 1, 2]  # prompt tokens of pair i (chosen and rejected share it)
CHOSEN = [3, 5, 2, 6]  # completion tokens
REJECTED = [5, 2, 4, 4]


def completion_mask() -> torch.Tensor:
    """(2B, T): 1 on completion tokens; rows 0..B-1 chosen, B..2B-1 rejected (TRL's order)."""
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i, (p, c, r) in enumerate(zip(PROMPTS, CHOSEN, REJECTED)):
        mask[i, p : p + c] = 1
        mask[B + i, p : p + r] = 1
    return mask


class FusedHeadLogps(torch.nn.Module):
    """Stands where TRL expects a model patched with its fused output layer: returns the given per-token
    log-probs (2B, T-1) and log sum_v p^2, zero where the next token is not a completion token (as TRL's
    fused head leaves every position whose label is -100), and neutral values of the fields TRL only logs."""

    is_gradient_checkpointing = False

    def __init__(self, log_probs: torch.Tensor, log_sum_sq_probs: torch.Tensor):
        super().__init__()
        scored = completion_mask()[:, 1:].to(log_probs.dtype)
        self.values = log_probs * scored
        self.squares = log_sum_sq_probs * scored

    def forward(self, **inputs):
        zeros = torch.zeros_like(self.values)
        return SimpleNamespace(
            log_probs=self.values,
            log_sum_sq_probs=self.squares,
            entropy=zeros.detach(),
            mean_logits=zeros.detach(),
            is_top1=zeros.detach().bool(),
        )


def trl_loss(policy, reference, squares, *, config) -> torch.Tensor:
    """TRL 1.16's `_compute_loss` on these log-probs, the reference computed by TRL itself (not precomputed)."""
    trainer = trl_dpo.DPOTrainer.__new__(trl_dpo.DPOTrainer)
    from accelerate import Accelerator

    trainer.model = FusedHeadLogps(policy, squares)
    trainer.ref_model = FusedHeadLogps(reference, squares)
    trainer.args = config
    trainer.accelerator = Accelerator(cpu=True)
    trainer.beta, trainer.loss_types = config.beta, config.loss_type
    trainer.loss_weights = config.loss_weights or [1.0] * len(config.loss_type)
    trainer.ld_alpha, trainer.label_smoothing = config.ld_alpha, config.label_smoothing
    trainer.f_divergence_type, trainer.f_alpha_divergence_coef = (
        config.f_divergence_type,
        config.f_alpha_divergence_coef,
    )
    trainer.use_weighting, trainer.precompute_ref_logps, trainer.aux_loss_enabled = config.use_weighting, False, False
    trainer._metrics, trainer._total_train_tokens, trainer._tp_size = {"train": defaultdict(list)}, 0, 1
    mask = completion_mask()
    inputs = {"input_ids": torch.ones(2 * B, T, dtype=torch.long), "attention_mask": torch.ones_like(mask)}
    return trainer._compute_loss(trainer.model, {**inputs, "completion_mask": mask}, return_outputs=False)


def our_loss(policy, reference, squares, *, config) -> torch.Tensor:
    """Ours on the same log-probs: sums over the same completion masks, prefix sums over each pair's
    shared length, then `compute_loss` with the same keys."""
    mask = completion_mask()[:, 1:].to(policy.dtype)  # the shift: entry t-1 scores token t
    lengths = mask.sum(-1)
    within = mask.cumsum(-1)
    shared = torch.minimum(lengths[:B], lengths[B:]).repeat(2)[:, None]
    prefix_mask = mask * (within <= shared)
    sums = lambda x, m: (x * m).sum(-1)
    policy_sum, ref_sum, policy_prefix, ref_prefix = (
        sums(policy, mask),
        sums(reference, mask),
        sums(policy, prefix_mask),
        sums(reference, prefix_mask),
    )
    square_sum = sums(squares, mask)
    batch = PairLogps(
        policy_chosen_logps=policy_sum[:B],
        policy_rejected_logps=policy_sum[B:],
        ref_chosen_logps=ref_sum[:B],
        ref_rejected_logps=ref_sum[B:],
        chosen_lengths=lengths[:B],
        rejected_lengths=lengths[B:],
        policy_chosen_prefix_logps=policy_prefix[:B],
        policy_rejected_prefix_logps=policy_prefix[B:],
        ref_chosen_prefix_logps=ref_prefix[:B],
        ref_rejected_prefix_logps=ref_prefix[B:],
        policy_chosen_sq_logps=square_sum[:B],
        policy_rejected_sq_logps=square_sum[B:],
    )
    return compute_loss(
        config.loss_type,
        batch,
        weights=config.loss_weights,
        beta=config.beta,
        label_smoothing=config.label_smoothing,
        discopop_tau=config.discopop_tau,
        f_divergence_type=config.f_divergence_type,
        f_alpha_divergence_coef=config.f_alpha_divergence_coef,
        ld_alpha=config.ld_alpha,
        use_weighting=config.use_weighting,
    ).loss


CASES = {
    "sigmoid": {"loss_type": ["sigmoid"]},
    "hinge": {"loss_type": ["hinge"]},
    "ipo": {"loss_type": ["ipo"]},
    "exo_pair": {"loss_type": ["exo_pair"], "label_smoothing": 1e-3},
    "nca_pair": {"loss_type": ["nca_pair"]},
    "robust": {"loss_type": ["robust"], "label_smoothing": 0.1},
    "bco_pair": {"loss_type": ["bco_pair"]},  # our running shift is 0 before the first step, as TRL's always is
    "sppo_hard": {"loss_type": ["sppo_hard"]},
    "aot": {"loss_type": ["aot"], "label_smoothing": 0.1},
    "aot_unpaired": {"loss_type": ["aot_unpaired"]},
    "apo_zero": {"loss_type": ["apo_zero"]},
    "apo_down": {"loss_type": ["apo_down"]},
    "discopop": {"loss_type": ["discopop"], "discopop_tau": 0.05},
    "sft": {"loss_type": ["sft"]},
    "sigmoid_norm": {"loss_type": ["sigmoid_norm"]},
    "sigmoid forward_kl": {"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl"},
    "sigmoid js": {"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"},
    "sigmoid alpha 0.3": {
        "loss_type": ["sigmoid"],
        "f_divergence_type": "alpha_divergence",
        "f_alpha_divergence_coef": 0.3,
    },
    "ipo js": {"loss_type": ["ipo"], "f_divergence_type": "js_divergence"},
    "hinge forward_kl": {"loss_type": ["hinge"], "f_divergence_type": "forward_kl"},
    "robust js": {"loss_type": ["robust"], "label_smoothing": 0.1, "f_divergence_type": "js_divergence"},
    "exo_pair alpha": {"loss_type": ["exo_pair"], "label_smoothing": 1e-3, "f_divergence_type": "alpha_divergence"},
    "discopop forward_kl": {"loss_type": ["discopop"], "f_divergence_type": "forward_kl"},
    "sigmoid_norm alpha": {"loss_type": ["sigmoid_norm"], "f_divergence_type": "alpha_divergence"},
    "sigmoid ld 0.5": {"loss_type": ["sigmoid"], "ld_alpha": 0.5},
    "ipo ld 0.3": {"loss_type": ["ipo"], "ld_alpha": 0.3},
    "apo_zero ld 0": {"loss_type": ["apo_zero"], "ld_alpha": 0.0},
    "sigmoid wpo": {"loss_type": ["sigmoid"], "use_weighting": True},
    "nca_pair wpo": {"loss_type": ["nca_pair"], "use_weighting": True},
    "robust wpo ld": {"loss_type": ["robust"], "label_smoothing": 0.1, "use_weighting": True, "ld_alpha": 0.5},
    "mpo mix": {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
}


@pytest.mark.parametrize("case", list(CASES))
def test_trl_and_ours_give_the_same_loss_and_gradient(case, tmp_path):
    config = trl_dpo.DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, beta=0.3, **CASES[case])
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    policy = -torch.rand(2 * B, T - 1, generator=g, dtype=torch.float32) * 3  # log-probs in (-3, 0]
    reference = policy.detach() + 0.4 * torch.randn(2 * B, T - 1, generator=g)  # apart from the policy
    squares = policy.detach() - torch.rand(2 * B, T - 1, generator=g)  # log sum_v p^2 <= log max p
    results = []
    for loss_of in (trl_loss, our_loss):
        leaf = policy.clone().requires_grad_()
        loss = loss_of(leaf, reference, squares, config=config)
        (grad,) = torch.autograd.grad(loss, leaf)
        results.append((loss.detach(), grad))
    (trl_value, trl_grad), (our_value, our_grad) = results
    torch.testing.assert_close(our_value, trl_value, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_grad, trl_grad, atol=1e-6, rtol=1e-4)
