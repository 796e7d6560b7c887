"""The experiment config's sections: typed, frozen dataclasses whose comments give each default's reason.

A section checks what only it can know (`__post_init__`); reading YAML into these is `typed_yaml.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline.config.checks import ConfigError, check_gpus_per_actor
from pipeline.config.rounds import GenerateConfig, LabelConfig, RoundsConfig


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # JSONL / Parquet / datasets dir / hub name; local path or pyarrow filesystem URI
    # The split of a hub dataset or of a save_to_disk DatasetDict folder to read; None reads "train". Inputs
    # without splits (files, one saved dataset) refuse a split they do not hold.
    split: str | None = None
    # A split of the same dataset to evaluate on (e.g. "test_prefs"), in place of holding prompts out by hash:
    # its rows all go to eval, `split`'s to train, and eval_fraction is not used. A pair in both is held out.
    eval_split: str | None = None
    format: str = "auto"  # auto | standard | conversational | implicit_prompt | unpaired | scored
    columns: dict[str, str] = field(default_factory=dict)  # our name -> the user's column name
    chat_template: str | None = None  # Jinja template for tokenizers that have none
    eval_fraction: float = 0.05  # held out by id hash, so the split is stable when rows are added
    pairing: str = "best_vs_worst"  # how scored completions become pairs
    min_score_gap: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""  # hub id or directory: the policy starts here
    ref_path: str | None = None  # the reference; None means the same weights as `path`
    trust_remote_code: bool = False  # off unless the user turns it on: remote code runs on every worker
    dtype: str = "float32"  # weights' dtype for scoring and sampling; training keeps fp32 master weights
    # transformers' name (sdpa, flex_attention, flash_attention_2); None: its default
    attn_implementation: str | None = None

    @property
    def reference(self) -> str:
        """The reference model: ref_path, or the policy's starting weights."""
        return self.ref_path or self.path


@dataclass(frozen=True)
class TokenizeConfig:
    max_prompt_length: int = 256  # prompts are cut from the left: the end of a prompt matters most
    max_length: int = 512  # prompt + response; responses are cut to fit
    strict: bool | list[str] = False  # True: any rejection is fatal; a list: those reasons are
    batch_size: int = 512
    # Output shards per split (rows go to a shard by their content hash, so any count gives the same rows in the
    # same order); None: one per 64 MiB of input.
    num_shards: int | None = None
    # Tokenizer actors in the Ray Data pool; None: one per CPU of the cluster but one, at least one. Resources only.
    num_actors: int | None = None


@dataclass(frozen=True)
class ScoreConfig:
    num_actors: int = 1  # reference-model replicas in the Ray Data actor pool
    batch_size: int = 16  # pairs per forward pass
    # Pairs per score shard, the unit of work an actor reads, scores and writes whole: a pool started again
    # after a lost node skips the units already written. Resources only: never reruns a finished stage.
    shard_rows: int = 4096
    use_gpu: bool = False
    # A fraction packs several small reference models on one GPU; a whole number above 1 spreads one
    # model too large for a GPU over that many (layers placed in turn on each, GPU only).
    gpus_per_actor: float = 1.0
    cpus_per_actor: float = 1.0
    # The train stage's speed switches, for the forward pass (same log-probs within float error; see README):
    packing: bool = False
    chunked_logps: bool = False
    logps_chunk_size: int = 1024
    compile: bool = False

    def __post_init__(self):
        check_gpus_per_actor(self.gpus_per_actor, path="score.gpus_per_actor")


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters through PEFT (Hu et al. 2021): the base stays frozen, each adapted linear W
    gains (alpha / r) B A with A (r, in) and B (out, r); B starts at zero, so step 0 is the base model."""

    r: int = 16  # the adapters' rank
    alpha: float = 32.0  # scale alpha / r; twice r is the usual choice
    dropout: float = 0.0  # on each adapter's input; 0 keeps the policy deterministic like the rest of training
    target_modules: str | list[str] = "all-linear"  # every linear of the decoder layers, or their names (q_proj, ...)
    merge: bool = True  # also export the merged weights, which evaluate and vLLM load like any model

    def __post_init__(self):
        if self.r < 1:
            raise ConfigError(f"train.lora.r: {self.r}; the rank must be at least 1")
        if self.alpha <= 0:
            raise ConfigError(f"train.lora.alpha: {self.alpha:g}; must be positive")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"train.lora.dropout: {self.dropout:g}; must be in [0, 1)")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            raise ConfigError(
                f"train.lora.target_modules: {self.target_modules!r}; give all-linear or a list of module names"
            )
        if not self.target_modules:
            raise ConfigError("train.lora.target_modules: empty; give all-linear or a list of module names")


STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class TrainConfig:
    # A name from pipeline.training.losses.LOSSES (or TRL's, e.g. sigmoid), a list of names (TRL's loss_type,
    # weighted by loss_weights), or name -> weight. See docs/losses.md.
    loss: str | list[str] | dict[str, float] = "dpo"
    loss_weights: list[float] | None = None  # TRL's: one weight per name of a list `loss`; None: 1.0 each
    beta: float = 0.1  # DPO's KL strength: the paper's default
    label_smoothing: float = 0.0  # cDPO's / rDPO's label-flip rate, EXO's epsilon (which must be > 0)
    gamma: float = 0.5  # SimPO's target reward margin
    alpha: float = 1.0  # the weight of the NLL / odds-ratio / unlikelihood term of rpo, orpo, unlikelihood
    desirable_weight: float = 1.0  # KTO's lambda_D; keep lambda_D n_D / (lambda_U n_U) in [1, 4/3] (the paper)
    undesirable_weight: float = 1.0  # KTO's lambda_U
    discopop_tau: float = 0.05  # DiscoPOP's temperature: the paper's value
    dpop_lambda: float = 50.0  # DPO-Positive's penalty on a chosen log-ratio below 0: Smaug's value
    # f-DPO's divergence (TRL's names): reverse_kl (DPO itself) | forward_kl | js_divergence | alpha_divergence
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5  # alpha_divergence only, TRL's parameter
    # LD-DPO: the weight in [0, 1] of the tokens past the shorter response's length; None: off. The score
    # stage then also writes the reference's log-probs of each response's first min(len_w, len_l) tokens.
    ld_alpha: float | None = None
    use_weighting: bool = False  # WPO: weight each pair by the policy's own (aligned) probability of it
    learning_rate: float = 5e-7
    max_steps: int | None = None  # wins over epochs when set
    epochs: int = 1
    batch_size: int = 32  # pairs per optimizer step, over all workers
    micro_batch_size: int = 8  # pairs per forward pass per worker; the rest is gradient accumulation
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # cosine | linear | constant, after warmup
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # keep below the node's CPUs: Ray Data needs slots to feed workers
    # ddp: every worker holds the whole model. fsdp: FSDP2 shards weights, gradients and optimizer
    # state over the workers (bf16 compute, fp32 master weights and gradient reduction on GPU).
    strategy: str = "ddp"
    # fsdp only: shards, gradients and optimizer state on the host (slower, far less GPU memory)
    cpu_offload: bool = False
    lora: LoraConfig | None = None  # None: full fine-tuning
    torch_threads: int = 0  # 0: leave torch's default
    chunked_logps: bool = False  # response positions only, lm_head chunk by chunk: no (N, T, V) fp32 logits
    logps_chunk_size: int = 1024
    compile: bool = False  # torch.compile each decoder block (GPU: the largest single speed-up we measured)
    # sequences end to end in one row, no padding (use model.attn_implementation: flex_attention on GPU)
    packing: bool = False
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    logging_steps: int = 1  # every logged step: a progress line, a metrics.jsonl row, the trackers
    # A checkpoint every this many steps, so a lost worker or node costs at most that much work: None is
    # about a tenth of the run (max(1, steps // 10)), 0 only at the end.
    checkpoint_steps: int | None = None
    max_failures: int = 3  # worker or node losses Ray Train recovers from within the job, from the last checkpoint
    # A step whose loss or gradient norm is NaN or infinite: "error" stops training naming the step and its
    # pairs; "skip" leaves the weights as they were for that step and counts it (metrics: nonfinite_skipped).
    nonfinite: str = "error"
    seed: int = 0
    # Experiment trackers, any of tensorboard | mlflow | wandb (pipeline/runtime/tracking.py). TensorBoard by
    # default: free, local, files in the run directory, nothing to sign up for or serve.
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    tracker_project: str = "raydpo"  # MLflow experiment and W&B project
    mlflow_tracking_uri: str | None = None  # None: a local file store at <run_dir>/mlruns

    def __post_init__(self):
        if self.lora is not None and not isinstance(self.lora, LoraConfig):
            # The YAML loader builds a LoraConfig; anything else is a caller's slip, never patched up here.
            raise ConfigError(f"train.lora: expected a LoraConfig (a mapping of r, alpha, ...), got {self.lora!r}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"train.strategy: {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.cpu_offload and self.strategy != "fsdp":
            raise ConfigError("train.cpu_offload: offloads FSDP's shards; it needs train.strategy: fsdp")


@dataclass(frozen=True)
class EvaluateConfig:
    # hf | vllm | auto (vllm where it is installed and faster: on GPUs; see README "Sampling engines")
    engine: str = "hf"
    # vLLM only: each sampler's KV cache in GiB; None is vLLM's share of GPU memory on a GPU and 1 GiB on
    # the CPU (where vLLM would otherwise reserve 90% of the machine's memory). Resources only.
    vllm_kv_cache_gib: float | None = None
    num_prompts: int = 64  # held-out prompts sampled per model and temperature
    samples_per_prompt: int = 1
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    max_tokens: int = 64
    top_p: float = 1.0
    # Evaluation judges only what it is told to judge: with neither a reward nor a judge it reports what needs
    # neither (held-out implicit-reward accuracy and margins, KL to the reference, samples side by side) and
    # names the judgments it skipped. A task reward by name (e.g. "vader"); None where the task has none.
    reward: str | None = None
    # A pairwise judge by name: api (any OpenAI-compatible chat endpoint, set up by judge_api) or a task's,
    # e.g. the demo's vader. None: no win rates. Never a default: a sentiment lexicon judging the user's data
    # would give win rates with intervals that look meaningful and mean nothing.
    judge: str | None = None
    # ApiJudgeConfig keys (pipeline/evaluation/api_judge/config.py)
    judge_api: dict[str, Any] = field(default_factory=dict)
    bootstrap_samples: int = 2000
    # Baselines beside the reference's samples (pipeline/evaluation/baselines.py). best_of_n: 0 is off; N draws N
    # reference samples per answer and keeps the one `reward` scores best (costs N times the sampling).
    best_of_n: int = 0
    judge_vs_chosen: bool = True  # also judge every model against the held-out pairs' chosen responses
    use_gpu: bool = False
    # GPUs per sampler and scorer actor (with use_gpu); above 1 (a whole number) a model too large for one
    # GPU is spread over them: layer by layer (transformers), or by tensor parallelism in a placement group
    # of that many one-GPU bundles on one node (vLLM). Resources only (never reruns evaluate).
    gpus_per_actor: float = 1.0
    # Sampler and scorer actors alive at once: every model is sampled side by side where the cluster
    # has room (one GPU each with use_gpu). Resources only: never reruns a finished evaluate.
    max_actors: int = 4
    seed: int = 0

    def __post_init__(self):
        check_gpus_per_actor(self.gpus_per_actor, path="evaluate.gpus_per_actor")


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: the RAY_ADDRESS env var if set, else an embedded local Ray
    num_cpus: int | None = None  # for the embedded local Ray only
    # A batch of a Ray Data pool (tokenize, score) or a call of an evaluate actor whose process dies
    # (killed, out of memory, its node lost) is redone on a restarted actor up to this many times; then the
    # stage fails naming the batch. An error raised by our own code is never retried: it would fail again.
    max_retries: int = 3


@dataclass(frozen=True)
class DemoConfig:
    """The built-in task (see pipeline/demo/prepare.py): makes data.path and model.path before the pipeline runs."""

    enabled: bool = False
    num_reviews: int = 4000  # SFT corpus for the reference model
    vocab_size: int = 1024
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    sft_steps: int = 400
    sft_learning_rate: float = 3e-3
    sft_batch_size: int = 32
    num_prompts: int = 512  # prompts sampled from the SFT model to build preference pairs
    samples_per_prompt: int = 4  # as in the paper's IMDb experiment
    max_new_tokens: int = 40
    min_reward_gap: float = 0.1


@dataclass(frozen=True)
class Config:
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    # On-policy rounds (`dpo iterate`, pipeline/config/rounds.py): the loop, and its generate and label stages.
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    label: LabelConfig = field(default_factory=LabelConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)
