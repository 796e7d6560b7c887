"""Losses against numbers worked out by hand, float64 gradient checks, and compute_loss (the registry's
declarations are checked against behaviour in test_loss_registry.py)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch.testing import assert_close

from pipeline.training.losses import LOSSES, KtoLogps, LossOutput, PairLogps, compute_loss, kto_loss

PAIRED = sorted(name for name, spec in LOSSES.items() if not spec.unpaired)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def softplus(x: float) -> float:
    """log(1 + e^x) = -logsigmoid(-x), written stably so the expected values of +-50 are exact."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def pairs(pi_w, pi_l, ref_w=None, ref_l=None, len_w=None, len_l=None) -> PairLogps:
    """PairLogps from plain lists; lengths are long tensors, as the scoring stage produces them."""
    return PairLogps(
        policy_chosen_logps=t(*pi_w),
        policy_rejected_logps=t(*pi_l),
        ref_chosen_logps=None if ref_w is None else t(*ref_w),
        ref_rejected_logps=None if ref_l is None else t(*ref_l),
        chosen_lengths=None if len_w is None else torch.tensor(len_w),
        rejected_lengths=None if len_l is None else torch.tensor(len_l),
    )


# Four pairs; with beta = 0.5 the DPO margins m = beta * h are 0.5, -1, +50, -50.
#   pair 0: (pi_w - ref_w) = -1 - -1.5 = 0.5, (pi_l - ref_l) = -2 - -1.5 = -0.5, h = 1
#   pair 1: -3 - -2 = -1, -1 - -2 = 1, h = -2
#   pair 2: -10 - -10 = 0, -110 - -10 = -100, h = 100
#   pair 3: -110 - -10 = -100, -10 - -10 = 0, h = -100
BETA = 0.5
H = [1.0, -2.0, 100.0, -100.0]
MARGINS = [BETA * h for h in H]  # [0.5, -1.0, 50.0, -50.0]
BATCH = pairs(
    pi_w=[-1.0, -3.0, -10.0, -110.0],
    pi_l=[-2.0, -1.0, -110.0, -10.0],
    ref_w=[-1.5, -2.0, -10.0, -10.0],
    ref_l=[-1.5, -2.0, -10.0, -10.0],
    len_w=[2, 3, 5, 10],
    len_l=[4, 1, 10, 5],
)


def check(out: LossOutput, expected_losses: list[float]) -> None:
    """Per-row values: a loss never averages (its declared reduction does, in compute_loss and the step)."""
    assert torch.isfinite(out.losses).all()
    assert_close(out.losses, t(*expected_losses))


# ---------------------------------------------------------------------------------------------------
# hand-worked values


def test_dpo_values_and_asymptotics():
    # -logsigmoid(m) = softplus(-m): log(1 + e^-0.5), log(1 + e^1), ~e^-50, ~50.
    out = LOSSES["dpo"].function(BATCH, beta=BETA)
    check(out, [math.log1p(math.exp(-0.5)), math.log1p(math.exp(1.0)), math.exp(-50.0), 50.0 + math.exp(-50.0)])
    assert_close(out.chosen_rewards, t(0.25, -0.5, 0.0, -50.0))
    assert_close(out.rejected_rewards, t(-0.25, 0.5, -50.0, 0.0))
    assert not out.chosen_rewards.requires_grad


def test_dpo_step_zero_is_log2():
    # policy == reference: every implicit reward is 0, the loss is -log sigmoid(0) = log 2.
    same = pairs(pi_w=[-3.0, -7.0], pi_l=[-4.0, -1.0], ref_w=[-3.0, -7.0], ref_l=[-4.0, -1.0])
    assert_close(compute_loss("dpo", same, beta=0.1).loss, t(math.log(2.0))[0])


def test_cdpo_values():
    # eps = 0.1: 0.9 softplus(-m) + 0.1 softplus(m).
    out = LOSSES["dpo"].function(BATCH, beta=BETA, label_smoothing=0.1)
    check(out, [0.9 * softplus(-m) + 0.1 * softplus(m) for m in MARGINS])
    # at m = +50: 0.1 * 50 = 5 (a confident pair pays for the chance its label is flipped)
    assert_close(out.losses[2], t(5.0)[0], atol=1e-12, rtol=0)


def test_ipo_values():
    # Per-token log-ratios u / len: chosen 0.5/2, -1/3, 0/5, -100/10; rejected -0.5/4, 1/1, -100/10, 0/5.
    # Margins 0.375, -4/3, 10, -10; beta = 0.5, target 1/(2 beta) = 1: (0.375 - 1)^2, (7/3)^2, 9^2, 11^2.
    out = LOSSES["ipo"].function(BATCH, beta=BETA)
    check(out, [0.390625, 49.0 / 9.0, 81.0, 121.0])


def test_hinge_values():
    # relu(1 - beta h) = relu(1 - 0.5), relu(1 + 1), relu(1 - 50), relu(1 + 50).
    check(LOSSES["hinge"].function(BATCH, beta=BETA), [0.5, 2.0, 0.0, 51.0])


def test_robust_values():
    # eps = 0.1: (0.9 softplus(-m) - 0.1 softplus(m)) / 0.8; at m = +50: -5/0.8 = -6.25, at -50: 45/0.8.
    out = LOSSES["robust"].function(BATCH, beta=BETA, label_smoothing=0.1)
    check(out, [(0.9 * softplus(-m) - 0.1 * softplus(m)) / 0.8 for m in MARGINS])
    assert_close(out.losses[2:], t(-6.25, 56.25), atol=1e-12, rtol=0)


def test_simpo_values():
    # beta = 2, gamma = 0.5. Means: pair 0: -6/3 = -2 vs -12/4 = -3, margin 2*(-2) - 2*(-3) - 0.5 = 1.5;
    # pair 1: -1/1 vs -1/2: 2*(-1) - 2*(-0.5) - 0.5 = -1.5;
    # pair 2: 0/1 vs -100/4 = -25: 0 + 50 - 0.5 = 49.5;  pair 3: -100/4 vs 0/1: -50 - 0.5 = -50.5.
    batch = pairs(
        pi_w=[-6.0, -1.0, 0.0, -100.0], pi_l=[-12.0, -1.0, -100.0, 0.0], len_w=[3, 1, 1, 4], len_l=[4, 2, 4, 1]
    )
    out = LOSSES["simpo"].function(batch, beta=2.0, gamma=0.5)
    check(out, [softplus(-1.5), softplus(1.5), softplus(-49.5), softplus(50.5)])
    assert_close(out.chosen_rewards, t(-4.0, -2.0, 0.0, -50.0))
    assert_close(out.rejected_rewards, t(-6.0, -1.0, -50.0, 0.0))


def test_orpo_values():
    # Means: chosen -2/4 = -0.5, rejected -6/3 = -2; log odds(p) = p - log(1 - e^p).
    # Pair 1 has rejected mean -50 (log odds ~ -50) and chosen mean -1e-9, near probability 1
    # (log odds ~ +20.7, huge but finite): its odds-ratio term is ~ e^-70.
    alpha = 0.1
    batch = pairs(pi_w=[-2.0, -1e-9], pi_l=[-6.0, -100.0], len_w=[4, 1], len_l=[3, 2])

    def log_odds(p: float) -> float:
        return p - math.log(-math.expm1(p))

    lo_w0, lo_l0 = -0.5 - math.log(1 - math.exp(-0.5)), -2.0 - math.log(1 - math.exp(-2.0))
    lo_w1, lo_l1 = log_odds(-1e-9), log_odds(-50.0)
    out = LOSSES["orpo"].function(batch, beta=0.1, alpha=alpha)
    check(out, [0.5 + alpha * softplus(-(lo_w0 - lo_l0)), 1e-9 + alpha * softplus(-(lo_w1 - lo_l1))])
    assert_close(out.chosen_rewards, t(-0.05, -1e-10))


def test_orpo_and_unlikelihood_finite_at_probability_one():
    # A mean log-prob of exactly 0 has infinite odds; the clamp keeps loss and gradient finite.
    for name in ("orpo", "unlikelihood"):
        logps = t(0.0, -3.0).requires_grad_()
        batch = PairLogps(
            policy_chosen_logps=t(-1.0, -3.0),
            policy_rejected_logps=logps,
            chosen_lengths=torch.tensor([2, 3]),
            rejected_lengths=torch.tensor([2, 3]),
        )
        out = LOSSES[name].function(batch, beta=0.1)
        out.losses.sum().backward()
        assert torch.isfinite(out.losses).all() and torch.isfinite(logps.grad).all(), name


def test_rpo_values():
    # dpo + alpha * (-pi_w / len_w); chosen means -1/2, -3/3, -10/5, -110/10.
    out = LOSSES["rpo"].function(BATCH, beta=BETA, alpha=0.5)
    nll = [0.5, 1.0, 2.0, 11.0]
    check(out, [softplus(-m) + 0.5 * n for m, n in zip(MARGINS, nll)])


def test_sft_values():
    # per pair: the summed NLL 2, 9; reduced over chosen tokens: (2 + 9) / (1 + 3) = 2.75, the token mean.
    batch = pairs(pi_w=[-2.0, -9.0], pi_l=[-5.0, -5.0], len_w=[1, 3], len_l=[2, 2])
    out = LOSSES["sft"].function(batch, beta=0.1)
    assert_close(out.losses, t(2.0, 9.0))
    assert_close(compute_loss("sft", batch, beta=0.1).loss, t(2.75)[0])
    assert_close(out.chosen_rewards, t(-0.2, -0.9))


def test_unlikelihood_values():
    # -pi_w/len_w - alpha log(1 - e^(pi_l/len_l)); pair 0: 1 - log(1 - e^-1);
    # pair 1: rejected mean -50, its term ~ e^-50: 3 + e^-50.
    batch = pairs(pi_w=[-2.0, -9.0], pi_l=[-3.0, -100.0], len_w=[2, 3], len_l=[3, 2])
    out = LOSSES["unlikelihood"].function(batch, beta=0.1, alpha=1.0)
    check(out, [1.0 - math.log(1.0 - math.exp(-1.0)), 3.0 + math.exp(-50.0)])


def test_kto_values():
    # r = policy - ref = [0.5, -1, 0, 50]; kl diffs [0.2, 0.4, 0.0] -> z = 0.2; beta = 1, lambda_D = 1, lambda_U = 2.
    batch = KtoLogps(
        policy_logps=t(-1.0, -2.0, -3.0, -10.0),
        ref_logps=t(-1.5, -1.0, -3.0, -60.0),
        labels=torch.tensor([True, False, True, False]),
        kl_policy_logps=t(-2.0, -2.0, -2.0),
        kl_ref_logps=t(-2.2, -2.4, -2.0),
    )
    out = kto_loss(batch, beta=1.0, desirable_weight=1.0, undesirable_weight=2.0)
    expected = [
        1 - sigmoid(0.5 - 0.2),  # desirable: 1 - sigmoid(beta (r - z))
        2 * (1 - sigmoid(0.2 - -1.0)),  # undesirable: lambda_U (1 - sigmoid(beta (z - r)))
        1 - sigmoid(0.0 - 0.2),
        2 * (1 - sigmoid(0.2 - 50.0)),  # an undesirable example the policy made far likelier: ~2
    ]
    check(out, expected)
    assert_close(out.chosen_rewards, t(0.5, 0.0))  # desirable examples only
    assert_close(out.rejected_rewards, t(-1.0, 50.0))
    assert LOSSES["kto"].function is kto_loss


def test_kto_reference_point_clamped_and_detached():
    # mean kl diff is -1 < 0, so z = 0: desirable loss 1 - sigmoid(r) with r = 1.
    kl_policy = t(-3.0, -3.0).requires_grad_()
    policy = t(-1.0).requires_grad_()
    batch = KtoLogps(
        policy_logps=policy,
        ref_logps=t(-2.0),
        labels=torch.tensor([True]),
        kl_policy_logps=kl_policy,
        kl_ref_logps=t(-2.0, -2.0),
    )
    out = kto_loss(batch, beta=1.0)
    assert_close(out.losses, t(1 - sigmoid(1.0)))
    out.losses.sum().backward()
    assert kl_policy.grad is None  # z is detached: no gradient through the reference point
    assert_close(policy.grad, t(-sigmoid(1.0) * (1 - sigmoid(1.0))))


# ---------------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("name", PAIRED)
def test_gradcheck(name):
    # Points away from hinge's kink (beta h = 1) and from orpo's clamp (mean log-prob 0).
    values = (
        [-1.0, -3.0, -4.0],
        [-2.0, -1.0, -6.5],
        [-1.5, -2.0, -5.0],
        [-1.2, -2.5, -5.0],
    )  # pi_w, pi_l, ref_w, ref_l
    # A batch-wise loss (AOT) matches each row with another row's detached value of the same rank: only
    # its sum over rows is the sorted loss, and it trains the policy alone (the reference is data).
    batch_wise = LOSSES[name].batch_wise
    inputs = tuple(t(*v).requires_grad_(not batch_wise or i < 2) for i, v in enumerate(values))
    lengths = torch.tensor([2, 3, 5]), torch.tensor([4, 1, 3])

    def f(pi_w, pi_l, ref_w, ref_l):
        batch = PairLogps(
            policy_chosen_logps=pi_w,
            policy_rejected_logps=pi_l,
            ref_chosen_logps=ref_w,
            ref_rejected_logps=ref_l,
            chosen_lengths=lengths[0],
            rejected_lengths=lengths[1],
        )
        params = {"label_smoothing": 0.2} if "label_smoothing" in LOSSES[name].hyperparameters else {}
        out = LOSSES[name].function(batch, beta=0.7, **params)
        return out.losses.sum() if batch_wise else (out.losses.sum(), out.losses)

    assert torch.autograd.gradcheck(f, inputs)


def test_dpo_gradient_wrt_policy_chosen():
    # d/d pi_w of mean_b -logsigmoid(r_w - r_l) = -beta sigmoid(r_l - r_w) / B.
    pi_w = BATCH.policy_chosen_logps.clone().requires_grad_()
    batch = replace(BATCH, policy_chosen_logps=pi_w)
    out = compute_loss("dpo", batch, beta=BETA)
    out.loss.backward()
    expected = t(*[-BETA * sigmoid(-m) / len(MARGINS) for m in MARGINS])
    assert_close(pi_w.grad, expected)
    assert_close(pi_w.grad, -BETA * torch.sigmoid(out.rejected_rewards - out.chosen_rewards) / 4)


def test_ipo_minimum_at_half_inverse_beta():
    # beta = 0.25: the target margin is h = 1/(2 beta) = 2; loss 0 and gradient 0 there, larger either side.
    beta = 0.25

    def loss_at(h: float) -> tuple[torch.Tensor, torch.Tensor]:
        pi_w = t(h - 4.0).requires_grad_()  # pi_w - ref_w = h, pi_l - ref_l = 0
        batch = pairs(pi_w=[0.0], pi_l=[-1.0], ref_w=[-4.0], ref_l=[-1.0], len_w=[1], len_l=[1])
        batch = replace(batch, policy_chosen_logps=pi_w)
        loss = LOSSES["ipo"].function(batch, beta=beta).losses.sum()
        loss.backward()
        return loss.detach(), pi_w.grad

    at_min, grad_at_min = loss_at(2.0)
    assert_close(at_min, t(0.0)[0])
    assert_close(grad_at_min, t(0.0))
    for h, expected in ((1.5, 0.25), (2.5, 0.25), (0.0, 4.0)):
        loss, _ = loss_at(h)
        assert_close(loss, t(expected)[0])
        assert loss > at_min


def test_float32_extremes_finite():
    # +-1000 margins in float32: no inf or NaN in any loss or gradient.
    for name in PAIRED:
        pi_w = torch.tensor([-1.0, -2001.0], requires_grad=True)
        batch = PairLogps(
            policy_chosen_logps=pi_w,
            policy_rejected_logps=torch.tensor([-2001.0, -1.0]),
            ref_chosen_logps=torch.tensor([-1.0, -1.0]),
            ref_rejected_logps=torch.tensor([-1.0, -1.0]),
            chosen_lengths=torch.tensor([1, 1]),
            rejected_lengths=torch.tensor([1, 1]),
        )
        params = {"label_smoothing": 0.1} if name == "exo_pair" else {}
        out = LOSSES[name].function(batch, beta=1.0, **params)
        out.losses.sum().backward()
        assert torch.isfinite(out.losses).all() and torch.isfinite(pi_w.grad).all(), name


# ---------------------------------------------------------------------------------------------------
# reductions and compute_loss


@pytest.mark.parametrize("name", ["dpo", "robust"])
def test_zero_label_smoothing_is_dpo(name):
    plain = LOSSES["dpo"].function(BATCH, beta=BETA)
    smoothed = LOSSES[name].function(BATCH, beta=BETA, label_smoothing=0.0)
    assert_close(smoothed.losses, plain.losses)


def test_robust_rejects_half_or_more():
    for eps in (0.5, 0.7):
        with pytest.raises(ValueError, match=r"train\.label_smoothing: .*robust needs 0 <= label_smoothing < 0\.5"):
            compute_loss("robust", BATCH, beta=BETA, label_smoothing=eps)


def test_missing_field_is_named():
    no_ref = replace(BATCH, ref_chosen_logps=None)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        LOSSES["dpo"].function(no_ref, beta=BETA)
    no_len = replace(BATCH, chosen_lengths=None)
    with pytest.raises(ValueError, match="chosen_lengths"):
        LOSSES["simpo"].function(no_len, beta=BETA)


def test_compute_loss_weighted_sum():
    # each term reduced by its own declaration: dpo's mean over pairs, sft's mean over chosen tokens.
    mixed = compute_loss({"dpo": 1.0, "sft": 0.5}, BATCH, beta=BETA)
    dpo = LOSSES["dpo"].function(BATCH, beta=BETA)
    sft_token_mean = (1.0 + 3.0 + 10.0 + 110.0) / (2 + 3 + 5 + 10)
    assert_close(mixed.loss, dpo.losses.mean() + 0.5 * sft_token_mean)
    assert [(spec.name, weight) for spec, weight, _ in mixed.terms] == [("dpo", 1.0), ("sft", 0.5)]
    # rewards are the first loss's
    assert_close(mixed.chosen_rewards, dpo.chosen_rewards)
    assert_close(mixed.rejected_rewards, dpo.rejected_rewards)


def test_compute_loss_passes_only_accepted_params():
    # simpo takes neither label_smoothing nor alpha; dpo takes no gamma.
    by_name = compute_loss("simpo", BATCH, beta=2.0, label_smoothing=0.1, gamma=0.3, alpha=0.2)
    assert_close(by_name.terms[0][2].losses, LOSSES["simpo"].function(BATCH, beta=2.0, gamma=0.3).losses)
    by_name = compute_loss("dpo", BATCH, beta=BETA, label_smoothing=0.1, gamma=0.3)
    assert_close(by_name.terms[0][2].losses, LOSSES["dpo"].function(BATCH, beta=BETA, label_smoothing=0.1).losses)


def test_compute_loss_unknown_name():
    with pytest.raises(ValueError, match=r"known losses: .*dpo"):
        compute_loss("dpoo", BATCH, beta=BETA)
    with pytest.raises(ValueError, match="'nope'"):
        compute_loss({"dpo": 1.0, "nope": 1.0}, BATCH, beta=BETA)


def test_kto_refuses_negative_weights_and_an_empty_kl_estimate():
    batch = KtoLogps(
        policy_logps=t(-1.0),
        ref_logps=t(-1.0),
        labels=torch.tensor([True]),
        kl_policy_logps=t(-2.0),
        kl_ref_logps=t(-2.0),
    )
    with pytest.raises(ValueError, match="undesirable_weight >= 0"):
        kto_loss(batch, beta=0.1, undesirable_weight=-1.0)
    with pytest.raises(ValueError, match="kl_policy_logps is empty"):
        kto_loss(replace(batch, kl_policy_logps=t(), kl_ref_logps=t()), beta=0.1)


def test_compute_loss_kto_batch_type_checked():
    with pytest.raises(ValueError, match="KtoLogps"):
        compute_loss("kto", BATCH, beta=BETA)
