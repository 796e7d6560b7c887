"""The losses TRL ships (and DPOP, BCO's running mean, f-DPO, LD-DPO, WPO) against values worked out by
hand from each paper's formula, on two or three pairs (the derivation is in each test's docstring).

The batch used by most tests, beta = 1/2 (u = pi - ref, r = beta u, h = u_w - u_l, m = beta h):

    pair 0: pi_w = -4, ref_w = -5 -> u_w = 1;   pi_l = -6, ref_l = -5 -> u_l = -1;  len_w = 2, len_l = 4
    pair 1: pi_w = -7, ref_w = -5 -> u_w = -2;  pi_l = -4, ref_l = -5 -> u_l = 1;   len_w = 4, len_l = 2
    r_w = (0.5, -1), r_l = (-0.5, 0.5), h = (2, -3), m = (1, -1.5)
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.testing import assert_close

from pipeline.training.losses import LOSSES, PairLogps, RewardMean, StepPairs, compute_loss

BETA = 0.5


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def softplus(x: float) -> float:
    """log(1 + e^x) = -logsigmoid(-x)."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


BATCH = PairLogps(
    policy_chosen_logps=t(-4.0, -7.0),
    policy_rejected_logps=t(-6.0, -4.0),
    ref_chosen_logps=t(-5.0, -5.0),
    ref_rejected_logps=t(-5.0, -5.0),
    chosen_lengths=t(2, 4),
    rejected_lengths=t(4, 2),
)
U_W, U_L = (1.0, -2.0), (-1.0, 1.0)
R_W, R_L = (0.5, -1.0), (-0.5, 0.5)
M = (1.0, -1.5)


def losses(name: str, batch: PairLogps = BATCH, **params) -> torch.Tensor:
    return LOSSES[name].function(batch, **{"beta": BETA, **params}).losses


def test_sigmoid_norm_divides_each_log_ratio_by_its_length():
    """Length-normalised DPO: -logsigmoid(beta (u_w / len_w - u_l / len_l)).
    pair 0: 1/2 - (-1/4) = 0.75, times beta: 0.375;  pair 1: -2/4 - 1/2 = -1, times beta: -0.5."""
    assert_close(losses("sigmoid_norm"), t(softplus(-0.375), softplus(0.5)))


def test_exo_pair_is_the_reverse_kl_from_the_policy_pair_distribution_to_the_smoothed_labels():
    """EXO (Ji et al. 2024, eq. 16): KL(q || p), q = (sigmoid(m), sigmoid(-m)), p = (1 - eps, eps).
    With eps = 0.1: q_w log(q_w / 0.9) + q_l log(q_l / 0.1), at m = 1 and m = -1.5."""
    eps = 0.1
    expected = [sigmoid(m) * math.log(sigmoid(m) / (1 - eps)) + sigmoid(-m) * math.log(sigmoid(-m) / eps) for m in M]
    assert_close(losses("exo_pair", label_smoothing=eps), t(*expected))


def test_discopop_blends_the_logistic_and_the_exponential_loss_by_the_margin():
    """DiscoPOP's LRML (Lu et al. 2024): (1 - sigmoid(m / tau)) softplus(-m) + sigmoid(m / tau) e^-m.
    tau = 0.5 so both parts count: m = 1 -> sigmoid(2); m = -1.5 -> sigmoid(-3)."""
    tau = 0.5
    expected = [(1 - sigmoid(m / tau)) * softplus(-m) + sigmoid(m / tau) * math.exp(-m) for m in M]
    assert_close(losses("discopop", discopop_tau=tau), t(*expected))


def test_discopop_stays_finite_where_its_parts_overflow():
    """At m = -200 (float32) e^-m overflows and sigmoid(m / tau) underflows; their product is e^(log sigmoid - m)."""
    far = PairLogps(
        policy_chosen_logps=torch.tensor([-400.0]),
        policy_rejected_logps=torch.tensor([0.0]),
        ref_chosen_logps=torch.tensor([0.0]),
        ref_rejected_logps=torch.tensor([0.0]),
    )
    assert_close(losses("discopop", far), torch.tensor([200.0]))  # the logistic part alone: softplus(200)


def test_dpop_penalises_a_chosen_log_ratio_below_zero():
    """DPOP (Pal et al. 2024): -logsigmoid(beta (h - lambda max(0, -u_w))), lambda = 2.
    pair 0: u_w = 1 >= 0, no penalty: softplus(-0.5 * 2) = softplus(-1);
    pair 1: u_w = -2, penalty 4: softplus(-0.5 (-3 - 4)) = softplus(3.5)."""
    assert_close(losses("dpop", dpop_lambda=2.0), t(softplus(-1.0), softplus(3.5)))
    assert_close(losses("dpop", dpop_lambda=0.0), losses("dpo"))  # lambda = 0 is DPO


def test_nca_pair_classifies_the_chosen_response_against_noise():
    """NCA (Chen et al. 2024): -logsigmoid(r_w) - 1/2 logsigmoid(-r_w) - 1/2 logsigmoid(-r_l)
    = softplus(-r_w) + softplus(r_w) / 2 + softplus(r_l) / 2."""
    expected = [softplus(-w) + softplus(w) / 2 + softplus(lo) / 2 for w, lo in zip(R_W, R_L)]
    assert_close(losses("nca_pair"), t(*expected))


def test_bco_pair_shifts_both_rewards_by_its_running_mean():
    """BCO (Jung et al. 2024): -logsigmoid(r_w - delta) - logsigmoid(-(r_l - delta)), delta = 0.25 here;
    the state takes the sum of the four rewards, 0.5 - 1 - 0.5 + 0.5 = -0.5, over 4."""
    out = LOSSES["bco_pair"].function(BATCH, beta=BETA, state=RewardMean(mean=0.25, steps=3))
    assert_close(out.losses, t(*[softplus(-(w - 0.25)) + softplus(lo - 0.25) for w, lo in zip(R_W, R_L)]))
    assert_close(out.state_sums, t(-0.5, 4.0))


def test_bcos_running_mean_is_the_mean_of_the_step_means():
    """Steps with reward means 1, then -0.5 (sum -2 over 4), then 0.5: delta 1, 0.25, 1/3."""
    state = RewardMean().updated(2.0, 2.0)
    assert (state.mean, state.steps) == (1.0, 1)
    state = state.updated(-2.0, 4.0)
    assert (state.mean, state.steps) == (0.25, 2)
    assert state.updated(1.0, 2.0).mean == pytest.approx(1.0 / 3.0)
    assert state.updated(0.0, 0.0) == state  # a step without rewards leaves it


def test_sppo_hard_regresses_each_log_ratio_onto_its_own_target():
    """SPPO, hard labels (Wu et al. 2024, eq. 4.7 with P = 1 / 0): (u_w - 1/(2 beta))^2 + (u_l + 1/(2 beta))^2,
    target 1 at beta = 1/2: pair 0: (1 - 1)^2 + (-1 + 1)^2 = 0; pair 1: (-2 - 1)^2 + (1 + 1)^2 = 13."""
    assert_close(losses("sppo_hard"), t(0.0, 13.0))


def test_apo_zero_and_apo_down():
    """APO (D'Oosterlinck et al. 2024): zero, eq. 7: (1 - sigmoid(r_w)) + sigmoid(r_l);
    down, eq. 8: sigmoid(r_w) + (1 - sigmoid(r_w - r_l))."""
    zero = [1 - sigmoid(w) + sigmoid(lo) for w, lo in zip(R_W, R_L)]
    down = [sigmoid(w) + 1 - sigmoid(w - lo) for w, lo in zip(R_W, R_L)]
    assert_close(losses("apo_zero"), t(*zero))
    assert_close(losses("apo_down"), t(*down))


# Three pairs for AOT, beta = 1: policy margins a = pi_w - pi_l = (1, -2, 4), reference margins
# b = ref_w - ref_l = (0.5, 1, -1).
AOT = PairLogps(
    policy_chosen_logps=t(-1.0, -4.0, 0.0),
    policy_rejected_logps=t(-2.0, -2.0, -4.0),
    ref_chosen_logps=t(-1.5, -2.0, -3.0),
    ref_rejected_logps=t(-2.0, -3.0, -2.0),
)


def test_aot_matches_the_policy_margins_with_the_reference_margins_quantile_by_quantile():
    """AOT paired (Melnyk et al. 2024): sort a = (1, -2, 4) -> (-2, 1, 4) and b = (0.5, 1, -1) -> (-1, 0.5, 1);
    d_k = (-1, 0.5, 3). Row 0 (a = 1, rank 1) carries softplus(-0.5), row 1 (rank 0) softplus(1), row 2
    softplus(-3); their mean is the sorted loss. With eps = 0.2 each term is 0.8 softplus(-d) + 0.2 softplus(d)."""
    out = LOSSES["aot"].function(AOT, beta=1.0)
    assert_close(out.losses, t(softplus(-0.5), softplus(1.0), softplus(-3.0)))
    smoothed = LOSSES["aot"].function(AOT, beta=1.0, label_smoothing=0.2).losses
    assert_close(smoothed, t(*[0.8 * softplus(-d) + 0.2 * softplus(d) for d in (0.5, -1.0, 3.0)]))


def test_aot_unpaired_matches_chosen_and_rejected_log_ratios_by_rank():
    """AOT unpaired: u_w = (0.5, -2, 3) sorted (-2, 0.5, 3); u_l = (0, 1, -2) sorted (-2, 0, 1);
    d_k = (0, 0.5, 2). Row i's value is its chosen log-ratio's term: rows (0.5 rank 1, -2 rank 0, 3 rank 2)
    -> softplus(-0.5), softplus(0), softplus(-2). The gradient reaches u_l through each rejected log-ratio's
    own term: d/d pi_l of the sum = sigmoid(-d) at the rejected's rank: u_l = 0 (rank 1) -> sigmoid(-0.5),
    1 (rank 2) -> sigmoid(-2), -2 (rank 0) -> sigmoid(0)."""
    rejected = AOT.policy_rejected_logps.clone().requires_grad_()
    batch = PairLogps(**{**AOT.__dict__, "policy_rejected_logps": rejected})
    out = LOSSES["aot_unpaired"].function(batch, beta=1.0)
    assert_close(out.losses.detach(), t(softplus(-0.5), softplus(0.0), softplus(-2.0)))
    out.losses.sum().backward()
    assert_close(rejected.grad, t(sigmoid(-0.5), sigmoid(-2.0), sigmoid(0.0)))


def test_aot_over_a_step_matches_rows_across_micro_batches():
    """Rows 1 and 2 of AOT as a micro-batch of a step holding all three: the same values as rows 1 and 2 of
    the whole batch, because ranks are taken over the step (`StepPairs`, offset 1)."""
    step = StepPairs(AOT.policy_chosen_logps, AOT.policy_rejected_logps, AOT.ref_chosen_logps, AOT.ref_rejected_logps)
    part = PairLogps(**{k: v[1:] for k, v in AOT.__dict__.items() if v is not None})
    for name in ("aot", "aot_unpaired"):
        whole = LOSSES[name].function(AOT, beta=1.0).losses
        at = lambda offset: PairLogps(**{**part.__dict__, "step": dataclasses.replace(step, offset=offset)})
        assert_close(LOSSES[name].function(at(1), beta=1.0).losses, whole[1:], msg=name)
        assert not torch.allclose(LOSSES[name].function(at(0), beta=1.0).losses, whole[1:])  # the offset matters


# f-DPO: f'(u) of the paper's Table 1 for u = pi / ref = e^(log-ratio); a margin is f'(u_w) - f'(u_l).
F_PRIME = {
    "reverse_kl": lambda x: x,  # log u (+1, which cancels)
    "forward_kl": lambda x: -math.exp(-x),  # -1/u
    "js_divergence": lambda x: math.log(2 * math.exp(x) / (1 + math.exp(x))),  # log(2u / (1 + u))
    "alpha_divergence": lambda x: (1 - math.exp(-0.5 * x)) / 0.5,  # (1 - u^-alpha) / alpha, alpha = 1/2
}


@pytest.mark.parametrize("divergence", list(F_PRIME))
def test_f_divergence_dpo_uses_f_prime_of_the_likelihood_ratio(divergence):
    """f-DPO (Wang et al. 2023, eq. 9): -logsigmoid(beta (f'(u_w) - f'(u_l))), u = pi / ref, from Table 1's f'.
    Constants in f' cancel in the difference (TRL writes forward KL as 1 - 1/u). The alpha-divergence's
    alpha = 1/2 is f_alpha_divergence_coef = 1 - alpha = 1/2."""
    f = F_PRIME[divergence]
    expected = [softplus(-BETA * (f(w) - f(lo))) for w, lo in zip(U_W, U_L)]
    assert_close(losses("dpo", f_divergence_type=divergence), t(*expected))


def test_alpha_divergence_coefficient_follows_trls_parameter():
    """c = 0.3 is the paper's alpha = 0.7: f'(u) = (1 - u^-0.7) / 0.7; c -> 1 is reverse KL (plain DPO)."""
    f = lambda x: (1 - math.exp(-0.7 * x)) / 0.7
    expected = [softplus(-BETA * (f(w) - f(lo))) for w, lo in zip(U_W, U_L)]
    params = dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)
    assert_close(losses("dpo", **params), t(*expected))
    near_one = dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)
    assert_close(losses("dpo", **near_one), losses("dpo"))


def test_ld_alpha_damps_the_tokens_past_the_shorter_response():
    """LD-DPO (Liu et al. 2024): logp = logp(first l_p tokens) + alpha logp(the rest), l_p = min(len_w, len_l).
    Pair 0 has len_w = 2 < len_l = 4, so the chosen response is all prefix; the rejected one's first two
    tokens carry -2.5 of its -6 under the policy and -3 of its -5 under the reference. alpha = 0.5:
    pi_l = -2.5 + 0.5 (-3.5) = -4.25, ref_l = -3 + 0.5 (-2) = -4, u_l = -0.25, u_w = 1: m = 0.5 * 1.25.
    Pair 1 (len_l = 2 < len_w = 4) mirrored: the chosen prefix -3 of -7 (ref -2 of -5):
    pi_w = -3 + 0.5 (-4) = -5, ref_w = -2 + 0.5 (-3) = -3.5, u_w = -1.5, u_l = 1: m = 0.5 * -2.5."""
    batch = PairLogps(
        **{k: v for k, v in BATCH.__dict__.items() if v is not None},
        policy_chosen_prefix_logps=t(-4.0, -3.0),
        policy_rejected_prefix_logps=t(-2.5, -4.0),
        ref_chosen_prefix_logps=t(-5.0, -2.0),
        ref_rejected_prefix_logps=t(-3.0, -5.0),
    )
    out = compute_loss("sigmoid", batch, beta=BETA, ld_alpha=0.5)
    assert_close(out.terms[0][2].losses, t(softplus(-0.625), softplus(1.25)))
    assert_close(compute_loss("dpo", batch, beta=BETA, ld_alpha=1.0).loss, compute_loss("dpo", BATCH, beta=BETA).loss)


def test_use_weighting_scales_each_pair_by_its_aligned_probability_without_gradient():
    """WPO (Zhou et al. 2024, eq. 2): w = exp(a_w / len_w) exp(a_l / len_l), a = sum_t log(pi_t / sum_v pi^2).
    With sum_t log sum_v pi^2 = (-3, -5) chosen and (-4, -3) rejected:
    pair 0: a_w = -4 + 3 = -1 over 2, a_l = -6 + 4 = -2 over 4: w = e^(-0.5 - 0.5) = e^-1;
    pair 1: a_w = -7 + 5 = -2 over 4, a_l = -4 + 3 = -1 over 2: w = e^-1 too. The loss is w times DPO's,
    and its gradient is w times DPO's gradient (w is a constant)."""
    policy = BATCH.policy_chosen_logps.clone().requires_grad_()
    fields = {k: v for k, v in BATCH.__dict__.items() if v is not None}
    batch = PairLogps(
        **{**fields, "policy_chosen_logps": policy},
        policy_chosen_sq_logps=t(-3.0, -5.0),
        policy_rejected_sq_logps=t(-4.0, -3.0),
    )
    weighted = compute_loss("dpo", batch, beta=BETA, use_weighting=True)
    dpo = [softplus(-m) for m in M]
    assert_close(weighted.terms[0][2].losses.detach(), t(*dpo) * math.exp(-1.0))
    (grad,) = torch.autograd.grad(weighted.loss, policy)
    plain = compute_loss("dpo", PairLogps(**{**fields, "policy_chosen_logps": policy}), beta=BETA)
    (plain_grad,) = torch.autograd.grad(plain.loss, policy)
    assert_close(grad, plain_grad * math.exp(-1.0))
