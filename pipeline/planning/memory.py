"""How much memory a training run takes on each GPU, from the model's config.json alone (no weights).

`plan_rows` gives, for ddp, fsdp (with and without CPU offload) and LoRA under each, the bytes per GPU
of weights, gradients, optimizer state and activations at the configured micro-batch, length and
number of workers, and the fewest GPUs of a given size that hold the run. `dpo plan` prints it and the
train stage refuses a GPU run that cannot fit before any worker starts.

What each strategy keeps on a GPU (N parameters, W workers; the run's GPU precision: bf16 compute):
    ddp     fp32 weights 4N, and the bf16 copies autocast keeps for backward 2N (one layer's with
            gradient checkpointing); fp32 gradients 4N, plus DDP's bucket copy 4N when W > 1; AdamW 8N.
    fsdp    fp32 shards 4N/W, gradient shards 4N/W, AdamW 8N/W (on the host with CPU offload, beside
            nothing on the GPU); unsharded bf16: the root (embeddings, output layer, final norm, which
            FSDP2 keeps gathered from forward to backward) and two decoder layers in flight (the one
            computing and the one prefetched); one layer's unsharded gradients in bf16 and their fp32
            copy for the reduce-scatter.
    lora    the base in bf16 and frozen (2N, or 2N/W sharded); adapters, their gradients and AdamW
            state in fp32, counted like the full model's under the same strategy.
Activations are what autograd saves per token, per decoder layer and for the output layer, in the
precision the strategy computes in. The per-layer coefficients were read off transformers' Llama
layers with saved-tensor hooks (tests/unit/test_memory_plan.py measures them again on CPU under the same
dtypes); on top come one layer's activation gradients in backward and, without chunked log-probs,
the (tokens, vocab) logits with their fp32 copy. torch.compile and packing are not counted (both
save memory: the plan errs on the safe side).

The peak adds gradients and activations when micro-batches accumulate (the gradients live through
the next forward); with one micro-batch a step, gradients are freed before the forward and grow as
activations are freed in backward, so the peak takes the larger of the two. A GPU's usable memory is
USABLE_FRACTION of it: the CUDA context, NCCL's buffers and the allocator's fragmentation take the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Config, LoraConfig, TrainConfig
from pipeline.model.pretrained import read_model_config
from pipeline.training.losses import reads_rejected

GIB = 1024**3
USABLE_FRACTION = 0.9
MAX_GPUS = 4096  # the fewest-GPUs search stops here: beyond, "does not fit"
LLAMA_STYLE = ("llama", "mistral", "qwen2")  # decoders whose layers the activation model was measured on


class CapacityError(ValueError):
    """A model config the plan cannot read, or LoRA targets the model does not have."""


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama-style decoder that decide its memory (read from config.json)."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False
    qkv_bias: bool = False  # qwen2: q, k and v have biases
    o_bias: bool = False  # llama's attention_bias puts one on o_proj too
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        """Read a transformers config.json dict; missing optional keys take transformers' defaults."""
        model_type = config.get("model_type")
        if model_type not in LLAMA_STYLE:
            raise CapacityError(
                f"the capacity plan models Llama-style decoders (model_type {', '.join(LLAMA_STYLE)}); "
                f"this model's config.json has model_type {model_type!r}"
            )
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            attention_bias = bool(config.get("attention_bias", False))
            return cls(
                model_type=model_type,
                hidden=hidden,
                intermediate=int(config["intermediate_size"]),
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab=int(config["vocab_size"]),
                tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=attention_bias or model_type == "qwen2",
                o_bias=attention_bias,
                mlp_bias=bool(config.get("mlp_bias", False)),
            )
        except KeyError as err:
            raise CapacityError(f"config.json has no {err.args[0]}: the capacity plan needs it") from None

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer."""
        h, i = self.hidden, self.intermediate
        hq, hkv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (h, hq),
            "k_proj": (h, hkv),
            "v_proj": (h, hkv),
            "o_proj": (hq, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer: its linears, their biases, two norms."""
        weights = sum(i * o for i, o in self.linears().values())
        hq, hkv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        biases = (hq + 2 * hkv) * self.qkv_bias + self.hidden * self.o_bias
        biases += (2 * self.intermediate + self.hidden) * self.mlp_bias
        return weights + biases + 2 * self.hidden

    @property
    def head_params(self) -> int:
        """The output layer's own parameters (none when it is tied to the embeddings)."""
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def root_params(self) -> int:
        """What is outside the decoder layers: embeddings, final norm, output layer."""
        return self.vocab * self.hidden + self.hidden + self.head_params

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    def lora_targets(self, lora: LoraConfig) -> dict[str, tuple[int, int]]:
        """The linears of one layer that `lora` adapts; an error names targets the model lacks."""
        if lora.target_modules == "all-linear":
            return self.linears()
        linears = self.linears()
        unknown = [t for t in lora.target_modules if t not in linears]
        if unknown:
            raise CapacityError(
                f"train.lora.target_modules: {', '.join(unknown)} not in a {self.model_type} "
                f"decoder layer (its linears: {', '.join(linears)})"
            )
        return {name: shape for name, shape in linears.items() if name in lora.target_modules}

    def lora_layer_params(self, lora: LoraConfig) -> int:
        """Adapter parameters of one layer: r x (in + out) per adapted linear."""
        return sum(lora.r * (i + o) for i, o in self.lora_targets(lora).values())


@dataclass(frozen=True)
class Setup:
    """How the run is distributed: the strategy, CPU offload (fsdp only) and LoRA (None: full fine-tuning)."""

    strategy: str  # ddp | fsdp
    cpu_offload: bool = False
    lora: LoraConfig | None = None

    @property
    def label(self) -> str:
        name = self.strategy + (" + cpu offload" if self.cpu_offload else "")
        return f"lora r={self.lora.r} ({name})" if self.lora else name


@dataclass(frozen=True)
class Workload:
    """What one micro-batch puts through the model on one worker."""

    tokens: int  # sequences per micro-batch x their length (padded to the longest: the worst case)
    chunk_size: int | None  # chunked log-probs: output-layer logits this many positions at a time
    gradient_checkpointing: bool
    accumulates: bool  # more than one micro-batch per optimizer step

    @classmethod
    def of(cls, train: TrainConfig, *, max_length: int) -> Workload:
        """The workload of `train` at `max_length` tokens a sequence: a pair is two sequences (chosen and
        rejected), an sft or KTO row one (KTO's mismatched pass runs without gradients and saves nothing)."""
        per_row = 2 if reads_rejected(train.loss) else 1
        micro_batches = train.batch_size // max(1, train.num_workers * train.micro_batch_size)
        return cls(
            tokens=per_row * train.micro_batch_size * max_length,
            chunk_size=train.logps_chunk_size if train.chunked_logps else None,
            gradient_checkpointing=train.gradient_checkpointing,
            accumulates=micro_batches > 1,
        )


@dataclass(frozen=True)
class Memory:
    """Bytes on one GPU (and, with CPU offload, on the host per worker)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    accumulates: bool
    host: int = 0

    @property
    def peak(self) -> int:
        working = self.gradients + self.activations if self.accumulates else max(self.gradients, self.activations)
        return self.weights + self.optimizer + working


def layer_activations(shape: ModelShape, *, precision: str, lora: LoraConfig | None = None) -> int:
    """Bytes one decoder layer saves for backward per token.

    precision: "autocast" (fp32 weights under bf16 autocast: ddp), "bf16" (bf16 weights: fsdp's
    mixed precision) or "frozen" (a frozen bf16 base: lora, whose adapters add their inputs).
    Per token: RMSNorm keeps its input in fp32 (and its bf16 output where its weight trains); each
    trained linear keeps its input (under autocast, each its own bf16 cast); attention keeps q, k, v,
    its output and a float per head; the MLP keeps gate, up, their product (and down's input).
    """
    h, i = shape.hidden, shape.intermediate
    hq, hkv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attention = 2 * (hq + 2 * hkv) + 2 * hq + 4 * shape.heads
    if precision == "autocast":
        return 2 * 8 * h + 2 * (3 * h + 2 * h) + attention + 8 * i
    if precision == "bf16":
        return 2 * 6 * h + 2 * (h + h) + attention + 8 * i
    if precision == "frozen":
        adapters = 0
        if lora is not None:
            # A bf16 copy of each adapted input, and with dropout its mask (4 bytes as the CPU keeps it;
            # CUDA's fused kernel keeps 1: the plan takes the larger).
            per_input = 2 + (4 if lora.dropout > 0 else 0)
            adapters = sum(per_input * fan_in + 2 * lora.r for fan_in, _ in shape.lora_targets(lora).values())
        return 2 * 4 * h + attention + 6 * i + adapters
    raise ValueError(f"precision: {precision!r} is not autocast, bf16 or frozen")


def saved_activations(shape: ModelShape, work: Workload, *, precision: str, lora: LoraConfig | None = None) -> int:
    """Bytes autograd saves for backward over one micro-batch: the decoder layers (only their inputs with
    gradient checkpointing, plus the one being recomputed), the final norm and the output layer's input,
    and the logits in bf16 (gather keeps them) and their fp32 copy (logsumexp's input); with chunked
    log-probs only the hidden states at response positions."""
    layer = layer_activations(shape, precision=precision, lora=lora)
    h = shape.hidden
    residual = 4 if precision == "autocast" else 2  # the residual stream's bytes: fp32 under autocast
    head = {"autocast": 10 * h, "bf16": 8 * h, "frozen": 4 * h}[precision]
    logits = 2 * h if work.chunk_size else 6 * shape.vocab
    layers = (shape.layers * residual * h + layer) if work.gradient_checkpointing else shape.layers * layer
    return work.tokens * (layers + head + logits)


def activations(shape: ModelShape, work: Workload, *, precision: str, lora: LoraConfig | None = None) -> int:
    """Bytes of activations at the peak of one micro-batch: what is saved, one layer's activation
    gradients in backward, and the output layer's transient logits."""
    layer = layer_activations(shape, precision=precision, lora=lora)
    # Beside the 6 saved bytes a logit, the head's backward holds 10 more (the gradients of the fp32
    # copy and of the bf16 logits, a fp32 temporary): 16 in all matches the 1.1B benchmark's gap
    # between full and chunked logits on the H100. Chunked: one chunk at a time.
    transient = (min(work.chunk_size, work.tokens) * 16 if work.chunk_size else work.tokens * 10) * shape.vocab
    return saved_activations(shape, work, precision=precision, lora=lora) + work.tokens * layer + transient


def estimate(shape: ModelShape, setup: Setup, work: Workload, *, workers: int) -> Memory:
    """Bytes per GPU of `setup` for `shape` on `workers` GPUs (see the module docstring)."""
    lora = setup.lora
    layer_lora = shape.lora_layer_params(lora) if lora else 0
    trained = shape.layers * layer_lora if lora else shape.params
    if setup.strategy == "ddp":
        return _ddp(shape, work, workers=workers, lora=lora, trained=trained)
    if setup.strategy != "fsdp":
        raise ValueError(f"strategy: {setup.strategy!r} is not ddp or fsdp")
    precision = "frozen" if lora else "bf16"
    # fp32 shards of what trains; a LoRA base is sharded in bf16.
    shards = (2 * shape.params if lora else 0) + 4 * trained
    states = 4 * trained + 8 * trained  # gradient shards and AdamW's two moments
    root_trains = 0 if lora else shape.root_params
    gathered = 2 * shape.root_params + 2 * 2 * (shape.layer_params + layer_lora)  # bf16: root, two layers
    gathered_grads = 6 * (layer_lora if lora else shape.layer_params) + 2 * root_trains  # bf16 and fp32 copy
    on_gpu = 0 if setup.cpu_offload else 1
    return Memory(
        weights=gathered + on_gpu * _ceil(shards, workers),
        gradients=gathered_grads + on_gpu * _ceil(4 * trained, workers),
        optimizer=on_gpu * _ceil(8 * trained, workers),
        activations=activations(shape, work, precision=precision, lora=lora),
        accumulates=work.accumulates,
        host=(1 - on_gpu) * _ceil(shards + states, workers),
    )


def _ddp(shape: ModelShape, work: Workload, *, workers: int, lora: LoraConfig | None, trained: int) -> Memory:
    """DDP: every GPU holds the whole model; see the module docstring."""
    buckets = 2 if workers > 1 else 1  # DDP's reducer keeps its own copy of the gradients
    if lora:
        weights, precision = 2 * shape.params + 4 * trained, "frozen"
    else:
        cast = shape.layer_params if work.gradient_checkpointing else shape.layers * shape.layer_params
        weights, precision = 4 * shape.params + 2 * (cast + shape.head_params), "autocast"
    return Memory(
        weights=weights,
        gradients=buckets * 4 * trained,
        optimizer=8 * trained,
        activations=activations(shape, work, precision=precision, lora=lora),
        accumulates=work.accumulates,
    )


def _ceil(total: int, parts: int) -> int:
    return -(-total // parts)


def usable_bytes(gpu_gib: float) -> int:
    return int(gpu_gib * GIB * USABLE_FRACTION)


def fewest_gpus(shape: ModelShape, setup: Setup, work: Workload, *, gpu_gib: float) -> int | None:
    """The fewest GPUs of `gpu_gib` that hold the run (ddp: 1 or none), None when no count up to MAX_GPUS does."""
    limit = usable_bytes(gpu_gib)
    if setup.strategy == "ddp":
        return 1 if estimate(shape, setup, work, workers=1).peak <= limit else None
    # Per-GPU memory falls as workers grow: bisect for the first count that fits.
    if estimate(shape, setup, work, workers=MAX_GPUS).peak > limit:
        return None
    low, high = 1, MAX_GPUS
    while low < high:
        mid = (low + high) // 2
        if estimate(shape, setup, work, workers=mid).peak <= limit:
            high = mid
        else:
            low = mid + 1
    return low


def setups(train: TrainConfig) -> list[Setup]:
    """The rows of a plan: ddp, fsdp, fsdp with CPU offload, and LoRA (the configured one, or the
    defaults) under ddp and fsdp."""
    lora = train.lora or LoraConfig()
    rows = [
        Setup("ddp"),
        Setup("fsdp"),
        Setup("fsdp", cpu_offload=True),
        Setup("ddp", lora=lora),
        Setup("fsdp", lora=lora),
    ]
    configured = configured_setup(train)
    return rows if configured in rows else [*rows, configured]


def configured_setup(train: TrainConfig) -> Setup:
    return Setup(train.strategy, cpu_offload=train.cpu_offload, lora=train.lora)


def for_run(config: Config) -> tuple[ModelShape, Workload]:
    """The shape of `config`'s model (its config.json) and the workload its train and tokenize sections set."""
    try:
        model_config = read_model_config(config.model.path)
    except (OSError, ValueError) as err:  # a missing file, or the hub's errors (offline, no such repo)
        raise CapacityError(f"model.path {config.model.path}: cannot read its config.json ({err})") from None
    shape = ModelShape.from_config(model_config)
    return shape, Workload.of(config.train, max_length=config.tokenize.max_length)
