"""KTO on unpaired data: the mismatched pairs behind its reference point, scored once, trained on.

KTO (Ethayarajh et al. 2024) compares each example's log-ratio r = log pi(y|x) - log pi_ref(y|x) with
a reference point z = max(0, E[log pi(y'|x) - log pi_ref(y'|x)]), estimated on completions y' that
belong to OTHER prompts. The reference model is not in training memory here, so the mismatch is
fixed before scoring:

- score stage: `with_kl_completions` gives row i the completion of row `kl_partners(n)[i]`; the scorer
  writes log pi_ref of that mismatched pair as `ref_kl_logps` (schema SCORED_KTO).
- train stage: `kl_logps` scores the same mismatched pairs under the policy for a whole optimizer step
  (no gradient: z is detached), over every worker; `micro_batch_loss` then gives each micro-batch that
  step's z, so accumulated micro-batches and several workers reproduce the one-big-batch gradient.
"""

from __future__ import annotations


import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch


KL_PAIRING_SEED = 0  # fixed: the same tokenized split always gets the same mismatched pairs


def kl_partners(n: int, *, seed: int = KL_PAIRING_SEED) -> np.ndarray:
    """partner[i]: the row whose completion is paired with row i's prompt; (n,) int64.

    A seeded permutation p of the rows is walked as one cycle: row p[k] borrows the completion of row
    p[k + 1 mod n]. One n-cycle means no row is ever its own partner (for n > 1) and every completion
    is borrowed exactly once. n == 1 has no other completion to borrow: ValueError.
    """
    if n < 0:
        raise ValueError(f"kl_partners needs n >= 0, got {n}")
    if n == 1:
        raise ValueError(
            "KTO's reference point pairs each prompt with ANOTHER example's completion, so a split needs "
            "at least 2 unpaired examples (or none); got 1"
        )
    order = np.random.default_rng(seed).permutation(n)
    partners = np.empty(n, dtype=np.int64)
    partners[order] = np.roll(order, -1)
    return partners


def with_kl_completions(table: pa.Table, *, max_length: int, seed: int = KL_PAIRING_SEED) -> pa.Table:
    """Add kl_partner_id and kl_completion_ids to tokenized unpaired rows (pure; no model).

    Row i's kl_completion_ids is the completion (chosen_ids) of row kl_partners(n)[i], cut so that
    this row's prompt plus it fits in `max_length` tokens (the tokenize stage's limit; the prompt
    always leaves room for one token).
    """
    if table.num_rows and pc.any(pc.invert(pc.is_valid(table["label"]))).as_py():
        raise ValueError("with_kl_completions: every row must be unpaired (label set); found paired rows")
    partners = kl_partners(table.num_rows, seed=seed)
    prompts = table["prompt_ids"].to_pylist()
    completions = table["chosen_ids"].to_pylist()
    ids = table["id"].to_pylist()
    kl_ids = [completions[j][: max(1, max_length - len(p))] for p, j in zip(prompts, partners)]
    return (
        table.append_column("kl_partner_id", pa.array([ids[j] for j in partners], pa.string()))
        .append_column("kl_completion_ids", pa.array(kl_ids, pa.list_(pa.int32())))
    )


# ------------------------------------------------------------------------------------------ train stage


def kl_logps(model, batches: list[dict], *, train, pad_id: int, device: torch.device, world: int = 1):
    """(policy, ref) log-probs of the step's mismatched pairs, each (M,) float32 with M = rows in the step.

    `batches` are this worker's micro-batches of one optimizer step (numpy dicts of SCORED_KTO rows).
    The policy pass runs without gradient: z is detached, so building a graph for it is waste. With
    world > 1 the pairs of every worker are gathered, so every worker uses the same z, that of the
    whole step; workers hold the same number of rows per step (train.batch_size / num_workers).
    """
    from pipeline.stages.train import policy_sequence_logps

    policy, tokens = [], 0
    with torch.no_grad():
        for batch in batches:
            logps, _, batch_tokens = policy_sequence_logps(
                model, batch["prompt_ids"], batch["kl_completion_ids"], train=train, pad_id=pad_id, device=device
            )
            tokens += batch_tokens
            policy.append(logps.float())
    ref = torch.tensor(np.concatenate([np.asarray(b["ref_kl_logps"], dtype=np.float64) for b in batches]),
                       dtype=torch.float32, device=device)
    policy = torch.cat(policy)
    if world > 1:
        policy, ref = (_all_gather(t, world) for t in (policy, ref))
    return policy, ref, tokens


def _all_gather(tensor: torch.Tensor, world: int) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(world)]
    torch.distributed.all_gather(parts, tensor)
    return torch.cat(parts)


def micro_batch_loss(model, batch: dict, *, train, pad_id: int, device: torch.device, kl_policy: torch.Tensor,
                     kl_ref: torch.Tensor, scale: float):
    """Forward one micro-batch of unpaired rows; return (loss to backprop, metric sums (8,), token count).

    kl_policy / kl_ref: the step's mismatched-pair log-probs from `kl_logps`. Metric sums, in order:
    loss, desirable rewards, undesirable rewards, desirable count, undesirable count, desirable
    policy log-probs, undesirable policy log-probs, row count (see `metrics_row`).
    """
    from pipeline.model.losses import KtoLogps, compute_loss

    from pipeline.stages.train import policy_sequence_logps

    # Packed or padded, chunked or not, as train says: the same function the paired losses use.
    policy, _, tokens = policy_sequence_logps(model, batch["prompt_ids"], batch["chosen_ids"], train=train, pad_id=pad_id, device=device)
    labels = torch.as_tensor(np.asarray(batch["label"], dtype=bool), device=device)
    logps = KtoLogps(
        policy_logps=policy,
        ref_logps=torch.tensor(np.asarray(batch["ref_chosen_logps"], dtype=np.float64), device=device, dtype=torch.float32),
        labels=labels,
        kl_policy_logps=kl_policy,
        kl_ref_logps=kl_ref,
    )
    out = compute_loss(
        train.loss if isinstance(train.loss, str) else dict(train.loss), logps, beta=train.beta,
        desirable_weight=train.desirable_weight, undesirable_weight=train.undesirable_weight,
    )
    loss = out.losses.sum() * scale  # over the rows of the whole step, as in the paired trainer
    policy = policy.detach()
    sums = torch.stack([
        out.losses.detach().sum(),
        out.chosen_rewards.sum(),
        out.rejected_rewards.sum(),
        labels.sum().to(policy.dtype),
        (~labels).sum().to(policy.dtype),
        policy[labels].sum(),
        policy[~labels].sum(),
        torch.tensor(float(len(out.losses)), device=device),
    ]).double()
    return loss, sums, tokens


def metrics_row(totals: torch.Tensor, *, kl: float) -> dict:
    """The step's metrics from summed `micro_batch_loss` sums: means per class; `kl` is the step's z.

    rewards/chosen and logps/chosen average the desirable rows, the /rejected ones the undesirable
    rows (None when the step had none). rewards/accuracies has no meaning without pairs: None.
    """
    desirable, undesirable = totals[3].item(), totals[4].item()

    def mean(total: float, count: float):
        return total / count if count else None

    chosen, rejected = mean(totals[1].item(), desirable), mean(totals[2].item(), undesirable)
    return {
        "loss": totals[0].item() / totals[7].item(),
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracies": None,
        "rewards/margins": None if chosen is None or rejected is None else chosen - rejected,
        "logps/chosen": mean(totals[5].item(), desirable),
        "logps/rejected": mean(totals[6].item(), undesirable),
        "kl": kl,
    }
