"""One pyarrow schema per Parquet shard type. Stage outputs are checked against these."""

import pyarrow as pa

_ids = pa.list_(pa.int32())

# tokenize/{train,eval}/part-*.parquet. Unpaired (KTO) rows keep the completion in chosen_ids,
# leave rejected_ids empty and set label; paired rows have a null label.
TOKENIZED = pa.schema(
    [
        ("id", pa.string()),  # content hash: the same pair always gets the same id
        ("source", pa.string()),  # file:line or file#row it came from
        ("prompt_ids", _ids),
        ("chosen_ids", _ids),  # response tokens only, EOS included unless truncated
        ("rejected_ids", _ids),
        ("label", pa.bool_()),
        ("prompt_len", pa.int32()),
        ("chosen_len", pa.int32()),
        ("rejected_len", pa.int32()),
    ]
)

# score/{train,eval}/part-*.parquet: the tokenized rows plus frozen reference log-probs.
SCORED = pa.schema(
    list(TOKENIZED)
    + [
        pa.field("ref_chosen_logps", pa.float64()),  # sum over response tokens of log pi_ref
        pa.field("ref_rejected_logps", pa.float64()),
    ]
)

# score/{train,eval}/part-*.parquet when a loss reads each response's prefix log-prob (LD-DPO's
# train.ld_alpha): the scored rows plus the reference's sums over each response's first min(len_w, len_l)
# tokens, the tokens both responses of the pair have.
SCORED_PREFIX = pa.schema(
    list(SCORED)
    + [
        pa.field("ref_chosen_prefix_logps", pa.float64()),
        pa.field("ref_rejected_prefix_logps", pa.float64()),
    ]
)

# score/{train,eval}/part-*.parquet for unpaired (KTO) data: the scored rows plus the mismatched pair
# behind KTO's reference point. Each row's prompt is paired with ANOTHER row's completion (see
# pipeline.data.kto_pairs.kl_partners); the trainer scores the same pair under the policy, so the KL estimate
# z = max(0, mean(policy - ref)) over a batch needs no reference model in training memory.
SCORED_KTO = pa.schema(
    list(SCORED)
    + [
        pa.field("kl_partner_id", pa.string()),  # id of the row whose completion is borrowed
        pa.field("kl_completion_ids", _ids),  # that completion, cut to fit max_length after this row's prompt
        pa.field("ref_kl_logps", pa.float64()),  # sum over kl_completion_ids of log pi_ref(. | this row's prompt)
    ]
)

# evaluate/samples.parquet: one row per sampled completion.
SAMPLES = pa.schema(
    [
        ("model", pa.string()),  # policy | reference | a baseline's name
        ("temperature", pa.float64()),
        ("prompt_index", pa.int32()),
        ("sample_index", pa.int32()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("completion_ids", _ids),
        ("logps", pa.float64()),  # sum of the sampled tokens' log-probs under the sampling model
        ("ref_logps", pa.float64()),  # the same tokens under the reference, from the scorer
        ("kl", pa.float64()),  # logps - ref_logps: a one-sample estimate of KL(pi || pi_ref)
        ("reward", pa.float64()),  # the task's reward, null where the task has none
    ]
)

# evaluate/judgments.parquet: one row per (model, temperature, prompt) comparison against the baseline.
JUDGMENTS = pa.schema(
    [
        ("model", pa.string()),
        ("baseline", pa.string()),
        ("temperature", pa.float64()),
        ("prompt_index", pa.int32()),
        ("verdict_first", pa.string()),  # model's completion shown first
        ("verdict_second", pa.string()),  # model's completion shown second
        ("score", pa.float64()),  # 1 win, 0.5 tie or inconsistent, 0 loss
        ("length_diff", pa.int32()),  # model's completion tokens minus the baseline's
    ]
)

# prompts/{eval,pool}/part-*.parquet: a prompt set's kept prompts, in their seeded order (position 0, 1, ...).
PROMPTS = pa.schema(
    [
        ("id", pa.string()),  # content hash of the rendered prompt
        ("position", pa.int64()),  # place in the split's order
        ("prompt_json", pa.string()),  # the prompt as the row gave it: a JSON string or message list
        ("prompt_text", pa.string()),  # rendered with the chat template where it is a message list
        ("prompt_ids", _ids),  # BOS where the tokenizer adds one, as tokenize places it
    ]
)

# rounds/<t>/generate/part-*.parquet: a prompt of the round and its n sampled completions, in sample order.
GENERATED = pa.schema(
    list(PROMPTS)
    + [
        pa.field("texts", pa.list_(pa.string())),  # decoded, special tokens skipped
        pa.field("completion_ids", pa.list_(_ids)),  # generated ids; EOS last where the sample stopped
        pa.field("logps", pa.list_(pa.float64())),  # sum of log pi(token) under the sampling policy, one per sample
        pa.field("finish_reasons", pa.list_(pa.string())),  # stop (EOS) | length (max_tokens)
    ]
)
