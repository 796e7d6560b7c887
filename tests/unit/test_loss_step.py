"""What trains is what each loss documents, through `train_step` on a tiny model: the declared reduction
over the whole step (sft's token mean across uneven micro-batches, a weighted mix), every loss's value at
step 0 (policy == reference, with the reference scored by the score stage's own scorer, prefix log-probs
included), the gradient's sign, AOT's step-wide sort under micro-batching, and BCO's running state
(updated by an applied step only, restored from a checkpoint)."""

from __future__ import annotations

import copy
import math

import pyarrow as pa
import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.model.pretrained import load_model
from pipeline.model.scoring import score_pairs
from pipeline.runtime.checkpoint_layout import read_objective_state
from pipeline.runtime.checkpoints import write_checkpoint
from pipeline.training.losses import LOSSES, PairLogps
from pipeline.training.objectives import objective_for
from pipeline.training.step import train_step
from tests.helpers.micro_batches import pair_rows, split

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def hand_logp(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log pi(response | prompt) of one unpadded sequence, with gradient, from log_softmax of the logits."""
    ids = torch.tensor([list(prompt) + list(response)])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(logprobs[len(prompt) + k - 1, token] for k, token in enumerate(response))


def sgd_step(model, batches: list[dict], train: TrainConfig):
    """One train_step with plain SGD at lr 1 and no clipping: the weights move by minus the gradient."""
    trained = copy.deepcopy(model)
    objective = objective_for(train, pad_id=1, device=CPU, with_reference=True)
    result = train_step(
        trained, torch.optim.SGD(trained.parameters(), lr=1.0), batches, objective=objective, lr=1.0, max_grad_norm=0
    )
    moved = [before.detach() - after.detach() for before, after in zip(model.parameters(), trained.parameters())]
    return result, moved, objective


def documented_gradient(model, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters()), allow_unused=False))


def test_sft_trains_the_token_mean_of_the_whole_step_over_uneven_micro_batches(model):
    """sft documents -(sum_b pi_w) / (sum_b len_w) over the step. Two micro-batches with different token
    counts: the logged loss and the update are those of that formula, not a mean of micro-batch means."""
    rows = pair_rows(6, seed=4)
    batches = [split(rows, 4)[0], split(rows, 4)[1]]  # 4 rows, then 2
    assert sum(len(c) for c in batches[0]["chosen_ids"]) / 4 != sum(len(c) for c in batches[1]["chosen_ids"]) / 2
    result, moved, _ = sgd_step(model, batches, TrainConfig(loss="sft", beta=0.1))
    tokens = sum(len(c) for c in rows["chosen_ids"])
    documented = -sum(hand_logp(model, p, c) for p, c in zip(rows["prompt_ids"], rows["chosen_ids"])) / tokens
    assert result.loss_metrics["loss"] == pytest.approx(documented.item(), abs=1e-5)
    for got, want in zip(moved, documented_gradient(model, documented)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_a_weighted_mix_trains_each_loss_with_its_own_reduction(model):
    """{dpo: 1, sft: 0.1}: the mean over pairs of DPO's loss plus 0.1 times the chosen tokens' mean NLL."""
    rows = pair_rows(6, seed=5)
    batches = split(rows, 3)
    result, moved, _ = sgd_step(model, batches, TrainConfig(loss={"dpo": 1.0, "sft": 0.1}, beta=0.1))
    chosen = [hand_logp(model, p, c) for p, c in zip(rows["prompt_ids"], rows["chosen_ids"])]
    rejected = [hand_logp(model, p, r) for p, r in zip(rows["prompt_ids"], rows["rejected_ids"])]
    margins = [
        0.1 * ((w - rw) - (lo - rl))
        for w, lo, rw, rl in zip(chosen, rejected, rows["ref_chosen_logps"], rows["ref_rejected_logps"])
    ]
    dpo = sum(torch.nn.functional.softplus(-m) for m in margins) / 6
    sft = -sum(chosen) / sum(len(c) for c in rows["chosen_ids"])
    documented = dpo + 0.1 * sft
    assert result.loss_metrics["loss"] == pytest.approx(documented.item(), abs=1e-5)
    for got, want in zip(moved, documented_gradient(model, documented)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def scored_at_step_zero(model, rows: dict) -> dict:
    """`rows` with reference log-probs (and prefix log-probs) scored by the score stage's scorer under
    `model` itself: the policy at step 0."""
    table = pa.table({k: rows[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")})
    scored = score_pairs(model, table, pad_id=1, micro_batch=4, device="cpu", prefix="ref_", prefix_logps=True)
    return {**rows, **{name: scored[name].to_pylist() for name in scored.column_names if name.startswith("ref_")}}


BETA = 0.5
# Each loss's value when policy == reference (every log-ratio 0), from its formula.
LOG2 = math.log(2.0)
EPS = 0.1  # label_smoothing, for the losses that read it
STEP_ZERO = {
    "dpo": LOG2,  # -(1 - eps) logsigmoid(0) - eps logsigmoid(0)
    "sigmoid_norm": LOG2,
    "robust": LOG2,  # ((1 - eps) log 2 - eps log 2) / (1 - 2 eps)
    "dpop": LOG2,
    "aot": LOG2,
    "aot_unpaired": LOG2,
    "hinge": 1.0,  # relu(1 - 0)
    "ipo": (1 / (2 * BETA)) ** 2,  # (0 - 1/(2 beta))^2
    "sppo_hard": 2 * (1 / (2 * BETA)) ** 2,
    "nca_pair": 2 * LOG2,  # log 2 + log 2 / 2 + log 2 / 2
    "bco_pair": 2 * LOG2,  # delta = 0 at the first step
    "apo_zero": 1.0,  # (1 - 1/2) + 1/2
    "apo_down": 1.0,
    "discopop": (LOG2 + 1) / 2,  # (1 - 1/2) log 2 + (1/2) e^0
    "exo_pair": 0.5 * math.log(0.5 / (1 - EPS)) + 0.5 * math.log(0.5 / EPS),  # KL((1/2, 1/2) || (1 - eps, eps))
}


@pytest.mark.parametrize("name", sorted(STEP_ZERO))
def test_every_loss_at_step_zero_has_its_formulas_value(model, name):
    """The scorer's reference log-probs and the trainer's policy log-probs agree at step 0, so each loss
    takes its closed-form value there: log 2 for the DPO family (the shared log-prob function's check)."""
    rows = scored_at_step_zero(model, pair_rows(4, seed=6))
    smoothing = EPS if "label_smoothing" in LOSSES[name].hyperparameters else 0.0
    train = TrainConfig(loss=name, beta=BETA, label_smoothing=smoothing)
    result, _, _ = sgd_step(model, split(rows, 2), train)
    assert result.loss_metrics["loss"] == pytest.approx(STEP_ZERO[name], abs=1e-5)
    assert result.loss_metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        {"ld_alpha": 0.5},  # the scorer's and the trainer's prefix sums agree too
        {"f_divergence_type": "forward_kl"},
        {"f_divergence_type": "js_divergence"},
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    ],
)
def test_dpo_with_each_option_is_log2_at_step_zero(model, options):
    rows = scored_at_step_zero(model, pair_rows(4, seed=7))
    result, _, _ = sgd_step(model, split(rows, 2), TrainConfig(loss="sigmoid", beta=BETA, **options))
    assert result.loss_metrics["loss"] == pytest.approx(LOG2, abs=1e-5)


def test_wpo_weights_dpos_log2_by_the_policys_aligned_probability(model):
    """At step 0 each pair's loss is log 2 times its weight w = exp(a_w / len_w + a_l / len_l), with
    a = sum_t (log pi(y_t) - log sum_v pi(v)^2) from the full softmax, worked out here row by row."""
    rows = scored_at_step_zero(model, pair_rows(4, seed=8))
    result, _, _ = sgd_step(model, [rows], TrainConfig(loss="dpo", beta=BETA, use_weighting=True))
    weights = []
    with torch.no_grad():
        for prompt, chosen, rejected in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"]):
            w = 0.0
            for response in (chosen, rejected):
                ids = torch.tensor([list(prompt) + list(response)])
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
                aligned = [
                    logprobs[len(prompt) + k - 1, token] - torch.logsumexp(2 * logprobs[len(prompt) + k - 1], dim=-1)
                    for k, token in enumerate(response)
                ]
                w += float(sum(aligned)) / len(response)
            weights.append(math.exp(w))
    assert result.loss_metrics["loss"] == pytest.approx(LOG2 * sum(weights) / 4, rel=1e-4)


def step_zero_batch() -> tuple[PairLogps, torch.Tensor, torch.Tensor]:
    """Two pairs with policy == reference, the policy's log-probs (leaves with gradient) beside."""
    pi_w = torch.tensor([-3.0, -5.0], dtype=torch.float64, requires_grad=True)
    pi_l = torch.tensor([-4.0, -2.0], dtype=torch.float64, requires_grad=True)
    batch = PairLogps(
        policy_chosen_logps=pi_w,
        policy_rejected_logps=pi_l,
        ref_chosen_logps=pi_w.detach().clone(),
        ref_rejected_logps=pi_l.detach().clone(),
        chosen_lengths=torch.tensor([3.0, 4.0]),
        rejected_lengths=torch.tensor([2.0, 5.0]),
    )
    return batch, pi_w, pi_l


@pytest.mark.parametrize("name", sorted(n for n, s in LOSSES.items() if not s.unpaired and n != "discopop"))
def test_every_paired_loss_at_step_zero_pushes_the_margin_up(name):
    """d loss / d pi_w - d loss / d pi_l < 0 where policy == reference: a descent step widens the margin.
    The chosen log-prob's gradient is never positive there (APO-down's, which lowers the chosen response
    later, is zero) and the rejected one's never negative. (DiscoPOP is the exception: next test.)"""
    batch, pi_w, pi_l = step_zero_batch()
    params = {"label_smoothing": 0.1} if "label_smoothing" in LOSSES[name].hyperparameters else {}
    loss = LOSSES[name].function(batch, beta=BETA, **params).losses.sum()
    grad_w, grad_l = torch.autograd.grad(loss, [pi_w, pi_l], allow_unused=True)
    grad_l = torch.zeros_like(pi_l) if grad_l is None else grad_l  # sft never reads the rejected response
    assert (grad_w - grad_l < 0).all(), (name, grad_w, grad_l)
    assert (grad_w <= 1e-12).all() and (grad_l >= -1e-12).all(), name


def test_discopop_at_a_zero_margin_pushes_it_down_below_its_temperature():
    """DiscoPOP's loss f(m) = (1 - s) softplus(-m) + s e^-m, s = sigmoid(m / tau), is not monotone near 0:
    f'(0) = -s'(0) log 2 - (1/2)(1/2) + s'(0) - 1/2 = (1 - log 2) / (4 tau) - 3/4, with s'(0) = 1 / (4 tau);
    at tau = 0.05 that is +0.784 (the margin is pushed down), at tau = 1 it is -0.673. d/d pi_w = beta f'."""
    for tau in (0.05, 1.0):
        batch, pi_w, _ = step_zero_batch()
        LOSSES["discopop"].function(batch, beta=BETA, discopop_tau=tau).losses.sum().backward()
        expected = BETA * ((1 - LOG2) / (4 * tau) - 0.75)
        assert pi_w.grad is not None
        torch.testing.assert_close(pi_w.grad, torch.full((2,), expected, dtype=torch.float64))


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
def test_a_batch_wise_loss_gives_the_one_batch_step_under_micro_batching(model, name):
    """AOT sorts the whole step's pairs: three micro-batches of two give the loss, metrics and update of
    one batch of six (the objective gathers the step's pairs first)."""
    rows = pair_rows(6, seed=9)
    train = TrainConfig(loss=name, beta=0.1)
    (whole, whole_moved, _), (parts, parts_moved, _) = (
        sgd_step(model, [rows], train),
        sgd_step(model, split(rows, 2), train),
    )
    for key, value in whole.loss_metrics.items():
        assert parts.loss_metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    for a, b in zip(whole_moved, parts_moved):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)


def test_bcos_running_mean_moves_with_applied_steps_and_survives_a_checkpoint(model, tmp_path):
    """After a step the state holds the step's mean implicit reward (beta (pi - ref) over both responses of
    every pair, worked out by hand); a checkpoint keeps it and a new objective restores it."""
    rows = pair_rows(4, seed=10)
    train = TrainConfig(loss="bco_pair", beta=0.1)
    _, _, objective = sgd_step(model, split(rows, 2), train)
    rewards = []
    with torch.no_grad():
        for prompt, chosen, rejected, ref_w, ref_l in zip(
            rows["prompt_ids"],
            rows["chosen_ids"],
            rows["rejected_ids"],
            rows["ref_chosen_logps"],
            rows["ref_rejected_logps"],
        ):
            rewards += [
                0.1 * (float(hand_logp(model, prompt, chosen)) - ref_w),
                0.1 * (float(hand_logp(model, prompt, rejected)) - ref_l),
            ]
    state = objective.states["bco_pair"]
    assert state.steps == 1 and state.mean == pytest.approx(sum(rewards) / 8, abs=1e-5)

    write_checkpoint(
        tmp_path,
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        rank=0,
        step=1,
        history=[],
        objective_state=objective.state_dict(),
    )
    restored = objective_for(train, pad_id=1, device=CPU, with_reference=True)
    restored.load_state_dict(read_objective_state(tmp_path))
    assert restored.states == objective.states


def test_a_skipped_step_leaves_the_running_state(model):
    """A step whose loss is not finite is not applied (train.nonfinite: skip): its rewards do not count."""
    rows = pair_rows(4, seed=11)
    rows["ref_chosen_logps"] = [float("nan")] * 4
    result, _, objective = sgd_step(model, [rows], TrainConfig(loss="bco_pair", beta=0.1))
    assert not result.updated and objective.states["bco_pair"].steps == 0
