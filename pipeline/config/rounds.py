"""The sections of on-policy rounds (`dpo iterate`): the loop (`rounds`) and its two stages (`generate`, `label`).

Round t samples `rounds.samples_per_prompt` completions for `rounds.prompts` fresh prompts of the prompt set
(`data.path`) from pi_{t-1} (generate), scores each completion (label), pairs the best with the worst by the
`scored` rules (`data.pairing`, `data.min_score_gap`), then tokenizes, scores under the reference and trains
from pi_{t-1} as `dpo run` does. Each section checks here what it alone can know; what needs the registered
rewards and judges is checked by `pipeline.rounds.refusals.check_rounds`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config.checks import ConfigError, check_at_least, check_choice, check_gpus_per_actor

REFERENCES = ("initial", "previous")
LABELLERS = ("reward", "reward_model", "judge")
LOCAL_JUDGE = "local"  # label.judge: a chat model of our own (label.model) in a sampler actor
JUDGE_TASKS = ("summarization", "dialogue", "generic")  # the API judge's prompts, which the local judge shares


@dataclass(frozen=True)
class RoundsConfig:
    count: int = 0  # rounds to run; `dpo iterate` needs at least 1 (0: the config has no rounds)
    prompts: int = 256  # fresh prompts per round (the pool wraps around when the prompt set runs out)
    samples_per_prompt: int = 4  # completions per prompt: the labeller's best and worst become a pair
    # The reference every round's pairs are scored under: initial is pi_0, the starting model (RLHFlow's and
    # OpenRLHF's iterative DPO keep the SFT model); previous is pi_{t-1}, the policy the round starts from.
    reference: str = "initial"
    # Prompts held out of every round: the evaluation across rounds samples them, so no round trained on them.
    eval_prompts: int = 64
    seed: int = 0  # orders the prompt set: which prompts are held out and which round gets which

    def __post_init__(self):
        check_at_least(self.count, 0, path="rounds.count")
        check_at_least(self.prompts, 1, path="rounds.prompts")
        check_at_least(self.samples_per_prompt, 2, path="rounds.samples_per_prompt")
        check_at_least(self.eval_prompts, 1, path="rounds.eval_prompts")
        check_choice(self.reference, REFERENCES, path="rounds.reference")


@dataclass(frozen=True)
class GenerateConfig:
    # hf | vllm | auto (vllm where it is installed and faster: on GPUs), as evaluate.engine
    engine: str = "hf"
    temperature: float = 1.0  # on-policy samples at the policy's own distribution
    top_p: float = 1.0
    max_tokens: int = 64  # new tokens per completion, EOS included; prompt + this must fit tokenize.max_length
    seed: int = 0  # every round draws with seed + round, so a rerun draws the same completions
    batch_size: int = 64  # prompts per engine call
    num_actors: int = 1  # sampler actors in the Ray Data pool
    use_gpu: bool = False
    # GPUs per sampler actor (with use_gpu); above 1 (whole), the model spread over them: layer by layer
    # (transformers) or by vLLM's tensor parallelism in a placement group on one node. Resources only.
    gpus_per_actor: float = 1.0
    vllm_kv_cache_gib: float | None = None  # vLLM only, as evaluate.vllm_kv_cache_gib. Resources only.

    def __post_init__(self):
        check_gpus_per_actor(self.gpus_per_actor, path="generate.gpus_per_actor")
        check_choice(self.engine, ("hf", "vllm", "auto"), path="generate.engine")
        check_at_least(self.temperature, 0, path="generate.temperature")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"generate.top_p: {self.top_p:g}; must be in (0, 1]")
        check_at_least(self.max_tokens, 1, path="generate.max_tokens")
        check_at_least(self.batch_size, 1, path="generate.batch_size")
        check_at_least(self.num_actors, 1, path="generate.num_actors")
        check_at_least(self.seed, 0, path="generate.seed")


@dataclass(frozen=True)
class LabelConfig:
    # reward: a registered task reward (label.reward, e.g. the demo's vader); reward_model: a Hugging Face
    # sequence-classification model (label.model) in an actor pool; judge: a pairwise judge (label.judge)
    # ranks each prompt's completions by comparisons in both orders.
    kind: str = "reward"
    reward: str | None = None  # kind reward: its registered name
    # kind reward_model: an AutoModelForSequenceClassification (hub id or directory) with one output, scored
    # with its own tokenizer and chat template; kind judge with judge local: the judging chat model.
    model: str | None = None
    chat_template: str | None = None  # the reward model's (or the local judge's) template where its tokenizer has none
    max_length: int = 1024  # reward_model: tokens scored per completion; longer texts keep their end (counted)
    batch_size: int = 16  # reward_model: completions per forward pass
    dtype: str | None = None  # reward_model: None is bfloat16 on a GPU and float32 on the CPU
    num_actors: int = 1  # reward_model: actors in the Ray Data pool. Resources only.
    use_gpu: bool = False
    gpus_per_actor: float = 1.0  # reward_model and the local judge: GPUs per actor. Resources only.
    # kind judge: api (any OpenAI-compatible endpoint, set up by label.judge_api), local (label.model in a
    # sampler actor, asked the API judge's prompt), or a registered judge (e.g. vader)
    judge: str = "api"
    judge_api: dict[str, Any] = field(default_factory=dict)  # ApiJudgeConfig keys
    judge_task: str = "generic"  # the local judge's prompt: summarization | dialogue | generic
    judge_engine: str = "hf"  # the local judge's sampler engine: hf | vllm | auto
    judge_max_tokens: int = 64  # the local judge's reply, which must end in "Preferred: A|B|Tie"

    def __post_init__(self):
        check_choice(self.kind, LABELLERS, path="label.kind")
        check_gpus_per_actor(self.gpus_per_actor, path="label.gpus_per_actor")
        check_choice(self.judge_task, JUDGE_TASKS, path="label.judge_task")
        check_choice(self.judge_engine, ("hf", "vllm", "auto"), path="label.judge_engine")
        if self.dtype is not None:
            check_choice(self.dtype, ("float32", "bfloat16", "float16"), path="label.dtype")
        for key in ("max_length", "batch_size", "num_actors", "judge_max_tokens"):
            check_at_least(getattr(self, key), 1, path=f"label.{key}")
