"""Configuration dataclasses: one per concern, each field declared once.

Command-line flags are generated from these fields (`--kebab-case` of the field name) by
`megatron_selfroute.arguments`; modules receive their own sub-config, never a global `args`.
A field's `metadata["help"]` is its one-line description and the flag's help text.
"""
from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A bad flag value or combination; its message is one line naming the flags."""


def arg(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field carrying its flag help (and optional `choices`, `nargs`, `flag`)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


def _eval_pattern(node: ast.AST) -> Any:
    """Evaluate a pattern expression made only of int/list literals, + and *."""
    if isinstance(node, ast.Expression):
        return _eval_pattern(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.List):
        return [_eval_pattern(e) for e in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _eval_pattern(node.left), _eval_pattern(node.right)
        return left + right if isinstance(node.op, ast.Add) else left * right
    raise ValueError("only 0/1 lists, + and * are allowed")


def parse_layer_freq(freq: str | int, num_layers: int) -> list[int]:
    """Turn --moe-layer-freq (an int N, or a 0/1 pattern expression) into one flag per block."""
    text = str(freq).strip()
    if text.isdigit():
        n = int(text)
        if n < 1:
            raise ValueError(f"--moe-layer-freq {text} must be >= 1")
        return [1 if i % n == 0 else 0 for i in range(num_layers)]
    try:
        pattern = _eval_pattern(ast.parse(text, mode="eval"))
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"--moe-layer-freq {text!r} is not an int or a 0/1 pattern ({e})"
                         ) from None
    if not isinstance(pattern, list) or any(v not in (0, 1) for v in pattern):
        raise ValueError(f"--moe-layer-freq {text!r} must give a list of 0s and 1s")
    if len(pattern) != num_layers:
        raise ValueError(
            f"--moe-layer-freq {text!r} has {len(pattern)} entries but --num-layers is {num_layers}"
        )
    return pattern


@dataclass
class ModelConfig:
    """Transformer backbone shape and options (GPT-2 conventions by default)."""

    num_layers: int = arg(12, "Number of transformer blocks.")
    hidden_size: int = arg(768, "Hidden size D.")
    num_attention_heads: int = arg(12, "Attention heads; must divide --hidden-size.")
    ffn_hidden_size: Optional[int] = arg(None, "Dense MLP hidden size (default 4 x hidden).")
    seq_length: int = arg(1024, "Training sequence length.")
    max_position_embeddings: Optional[int] = arg(
        None, "Learned position table size (default --seq-length)."
    )
    vocab_size: Optional[int] = arg(
        None, "Unpadded vocabulary size (normally taken from the tokenizer)."
    )
    make_vocab_size_divisible_by: int = arg(
        128, "Pad the vocabulary to a multiple of this (Megatron; 50257 -> 50304)."
    )
    hidden_dropout: float = arg(0.0, "Dropout on residual branches and embeddings.")
    attention_dropout: float = arg(0.0, "Dropout on attention probabilities.")
    init_method_std: float = arg(0.02, "Std of the normal weight initialisation.")
    disable_bias_linear: bool = arg(False, "Bias-free linear layers (the paper's setting).")
    disable_bias_layernorm: bool = arg(
        False, "Bias-free LayerNorm (the paper's setting; gain only)."
    )
    layernorm_epsilon: float = arg(1e-5, "LayerNorm epsilon.")
    untie_embeddings_and_output_weights: bool = arg(
        False, "Separate output layer instead of the tied input embedding."
    )
    gelu_approximation: str = arg(
        "tanh", "GELU form: tanh (GPT-2) or none (exact erf).", choices=["tanh", "none"]
    )
    cross_entropy_chunk_size: Optional[int] = arg(
        None, "Compute the output layer and cross-entropy this many tokens at a time, "
        "recomputing each chunk's logits in backward, so the full [tokens, vocabulary] logits "
        "are never held (training and evaluation; default: the plain path)."
    )
    recompute_activations: bool = arg(
        False, "Megatron's selective recompute (= --recompute-granularity selective): recompute "
        "the --recompute-modules (default core attention) in backward. Before issue 19 this "
        "flag recomputed every block in full: use --recompute-granularity full for that."
    )
    recompute_granularity: Optional[str] = arg(
        None, "Activation recompute: full (whole blocks, per --recompute-method) or selective "
        "(the --recompute-modules inside each block).", choices=["full", "selective"])
    recompute_method: Optional[str] = arg(
        None, "With --recompute-granularity full: uniform (checkpoint groups of "
        "--recompute-num-layers consecutive blocks; default) or block (checkpoint only the first "
        "--recompute-num-layers blocks).", choices=["uniform", "block"])
    recompute_num_layers: Optional[int] = arg(
        None, "Blocks per recomputed group (uniform) or blocks recomputed (block); default 1 "
        "(uniform) or all blocks (block).")
    recompute_modules: list = arg(
        ["core_attn"], "Parts of each block recomputed under selective granularity.",
        nargs="*", choices=["core_attn", "layernorm", "mlp", "moe", "shared_experts"])

    @property
    def ffn_size(self) -> int:
        """Dense MLP hidden size, defaulting to 4 x hidden."""
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary rounded up to --make-vocab-size-divisible-by (extra rows never predicted)."""
        if self.vocab_size is None:
            raise ValueError("vocab size unknown: pass --vocab-size or a tokenizer")
        m = self.make_vocab_size_divisible_by
        return ((self.vocab_size + m - 1) // m) * m

    @property
    def positions(self) -> int:
        """Rows of the learned position table."""
        return self.max_position_embeddings or self.seq_length


@dataclass
class MoEConfig:
    """Mixture-of-Experts placement, routing and dispatch."""

    num_experts: Optional[int] = arg(None, "Experts per MoE layer; unset = dense model.")
    moe_router_topk: int = arg(2, "Experts per token k (the paper: 2).")
    moe_ffn_hidden_size: Optional[int] = arg(None, "Expert MLP hidden size (default FFN size).")
    moe_layer_freq: str = arg(
        "1",
        "MoE placement: N puts MoE in blocks i with i %% N == 0, or a 0/1 pattern per block "
        "such as '[0,1]*6' or '([1]*3+[0])*3'.",
    )
    router_type: str = arg("self", "Router: self | learned | fixed-random | random | hash.")
    moe_router_pre_softmax: bool = arg(
        False, "Softmax over all N experts, then top-k (default: softmax over the k selected)."
    )
    moe_router_score_function: str = arg(
        "softmax", "Expert scores: softmax (the paper) or sigmoid (DeepSeek-V3: top-k on "
        "sigmoid scores, weights normalised over the selected k).",
        choices=["softmax", "sigmoid"],
    )
    moe_router_enable_expert_bias: bool = arg(
        False, "Aux-loss-free balancing (DeepSeek-V3): a per-expert fp32 bias added for "
        "selection only, updated after each step from the step's token counts."
    )
    moe_router_bias_update_rate: float = arg(
        1e-3, "Expert-bias step: bias_e += rate x sign(mean load - load_e) per optimizer step."
    )
    moe_shared_expert_intermediate_size: Optional[int] = arg(
        None, "Hidden size of a shared expert: a dense MLP every token of an MoE block passes "
        "through, added to the routed output (unset = none)."
    )
    moe_aux_loss_coeff: float = arg(0.0, "Switch load-balancing loss coefficient (paper: 0).")
    moe_z_loss_coeff: float = arg(0.0, "Router z-loss coefficient.")
    self_route_dims: str = arg(
        "last",
        "Self-routing coordinates: last N (paper), first N, or per-layer disjoint blocks.",
        choices=["last", "first", "per-layer"],
    )
    fixed_random_shared: bool = arg(
        False, "fixed-random: one projection shared by all MoE layers."
    )
    fixed_random_init: str = arg(
        "gaussian", "fixed-random projection: gaussian N(0, std) rows, or orthogonal rows of "
        "norm std x sqrt(hidden) (a random rotation of a coordinate readout).",
        choices=["gaussian", "orthogonal"],
    )
    hash_assignment: str = arg(
        "random", "hash: each token id's k experts drawn at random, or balanced (ids assigned "
        "greedily by training-split frequency so expert loads are even).",
        choices=["random", "balanced"],
    )
    hash_shared: bool = arg(False, "hash: one table for every MoE layer (default: one per layer).")
    moe_expert_capacity_factor: Optional[float] = arg(
        None, "Expert capacity factor; unset = dropless."
    )
    moe_token_drop_policy: str = arg(
        "probs", "Which routes to drop over capacity: lowest probs or latest position.",
        choices=["probs", "position"],
    )
    moe_token_dispatcher_type: str = arg(
        "alltoall",
        "alltoall: padding-free uneven all-to-all; deepspeed: DeepSpeed MOELayer (reference).",
        choices=["alltoall", "deepspeed"],
    )
    moe_grouped_gemm: str = arg(
        "auto", "Expert compute: auto | loop | grouped (torch._grouped_mm, bf16 on GPU).",
        choices=["auto", "loop", "grouped"],
    )

    @property
    def is_moe(self) -> bool:
        """True when the model has MoE layers."""
        return bool(self.num_experts)

    def layer_pattern(self, num_layers: int) -> list[int]:
        """1 for each block that is an MoE layer (Megatron core's --moe-layer-freq semantics)."""
        if not self.is_moe:
            return [0] * num_layers
        pattern = parse_layer_freq(self.moe_layer_freq, num_layers)
        return pattern


@dataclass
class ParallelConfig:
    """Distributed layout and engine."""

    expert_model_parallel_size: int = arg(1, "Expert-parallel group size P (divides experts).")
    tensor_model_parallel_size: int = arg(
        1, "Tensor-parallel size T (the layout carries it; only 1 is implemented so far)."
    )
    zero_stage: int = arg(0, "ZeRO stage 0, 1 or 2.", choices=[0, 1, 2, 3])
    deepspeed_config: Optional[str] = arg(None, "DeepSpeed JSON merged with the flags.")
    local_rank: Optional[int] = arg(None, "Set by launchers; read from LOCAL_RANK otherwise.")
    distributed_backend: Optional[str] = arg(
        None, "nccl or gloo (default: nccl with CUDA, else gloo).", choices=["nccl", "gloo"]
    )
    distributed_timeout_minutes: float = arg(10.0, "Collective timeout before ranks give up.")


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision, logging and checkpointing."""

    micro_batch_size: int = arg(4, "Samples per process per micro-batch.")
    global_batch_size: Optional[int] = arg(
        None, "Samples per step over all processes (accumulation derived)."
    )
    train_iters: Optional[int] = arg(None, "Optimizer steps to train.")
    train_samples: Optional[int] = arg(None, "Samples to train (alternative to --train-iters).")
    lr: float = arg(6e-4, "Peak learning rate.")
    min_lr: float = arg(0.0, "Final learning rate.")
    lr_decay_style: str = arg("cosine", "LR decay.", choices=["cosine", "linear", "constant"])
    lr_warmup_iters: int = arg(0, "Linear warm-up steps.")
    lr_decay_iters: Optional[int] = arg(None, "Steps over which to decay (default train iters).")
    weight_decay: float = arg(0.1, "AdamW weight decay (not on biases and norms).")
    adam_beta1: float = arg(0.9, "Adam beta1.")
    adam_beta2: float = arg(0.95, "Adam beta2.")
    adam_eps: float = arg(1e-8, "Adam epsilon.")
    clip_grad: float = arg(1.0, "Global gradient-norm clip (0 = off).")
    grad_norm_fp64: bool = arg(
        False, "ZeRO-0: accumulate each gradient's norm in float64 (this project's norm before "
        "2026-12-02, which the golden runs were recorded with; 7x slower on CPU). Default: fp32 "
        "per tensor, as Megatron and DeepSpeed, and the squares summed in float64."
    )
    bf16: bool = arg(False, "bfloat16 training.")
    fp16: bool = arg(False, "float16 training with loss scaling (GPU only).")
    seed: int = arg(1234, "Random seed (model init, data order, dropout, routers).")
    deterministic: bool = arg(False, "Deterministic CUDA kernels (bit-exact resume on GPU).")
    log_interval: int = arg(10, "Steps between log lines.")
    eval_interval: int = arg(1000, "Steps between validation runs.")
    eval_iters: int = arg(10, "Validation micro-batches per evaluation.")
    eval_every_tokens: Optional[int] = arg(
        None, "Validate every N training tokens: sets --eval-interval to N / (global batch x "
        "sequence length), which must divide N (held-out loss at fixed token counts)."
    )
    run_summary: Optional[str] = arg(
        None, "Write a JSON summary of the run here (rank 0, at its end; merged over resumes): "
        "losses, held-out losses, tokens/s, step time, peak memory, routing, and digests of the "
        "data order and the initial weights (tools/sweep.py reads it)."
    )
    save: Optional[str] = arg(None, "Checkpoint directory to write.")
    load: Optional[str] = arg(None, "Checkpoint directory to resume from.")
    save_interval: Optional[int] = arg(None, "Steps between checkpoints.")
    keep_last: Optional[int] = arg(
        None, "Keep only the newest N checkpoints in --save (older ones are deleted only after "
        "a newer one is complete and the pointer names it).")
    continue_on_save_failure: bool = arg(
        False, "When a checkpoint save fails (full disk, I/O error, on any rank), log the missed "
        "save and keep training instead of stopping (the previous checkpoint stays intact "
        "either way).")
    save_lease_timeout: float = arg(
        300.0, "Seconds without a heartbeat after which another run may take over the lease on "
        "--save (one writer per directory); 0 turns the lease off.")
    load_fallback: bool = arg(
        False, "When the checkpoint the pointer names fails verification (manifest sizes or "
        "checksums), load the newest earlier checkpoint in --load that passes instead of "
        "stopping.")
    no_load_optim: bool = arg(False, "Do not load optimizer state on resume.")
    no_load_rng: bool = arg(False, "Do not load RNG state on resume.")
    finetune: bool = arg(False, "Load weights only; reset iteration, optimizer and data.")
    tensorboard_dir: Optional[str] = arg(None, "TensorBoard event directory.")
    wandb_project: Optional[str] = arg(None, "Weights & Biases project (optional).")
    exit_interval: Optional[int] = arg(None, "Save and exit when iteration %% N == 0.")
    exit_duration_in_mins: Optional[float] = arg(None, "Save and exit after this wall time.")
    exit_signal_handler: bool = arg(False, "Save and exit cleanly on SIGTERM.")
    skip_nan_steps: int = arg(0, "Skip up to N steps with NaN/Inf loss instead of stopping.")
    timing_log_level: int = arg(0, "Timers: 0 none, 1 step phases, 2 fine-grained.")
    profile: bool = arg(False, "Record a torch profiler trace over --profile-step-start..end.")
    profile_step_start: int = arg(10, "First profiled step.")
    profile_step_end: int = arg(12, "Last profiled step.")
    peak_tflops: Optional[float] = arg(
        None, "Peak TFLOP/s of one device for MFU (default per detected device)."
    )
    compile: bool = arg(
        False, "torch.compile each transformer block's dense parts in place (LayerNorms, "
        "attention, dense and shared MLPs; the MoE layer's data-dependent dispatch stays eager). "
        "Checkpoint names are unchanged.")
    compile_backend: str = arg("inductor", "torch.compile backend for --compile (inductor; "
                               "aot_eager compiles fast, for tests).")
    debug: bool = arg(False, "Show full tracebacks on errors.")


@dataclass
class DataConfig:
    """Data sources and tokenizer."""

    data_path: list = arg([], "Prefixes of .bin/.idx data, optionally weighted: 0.7 A 0.3 B.",
                          nargs="*")
    split: str = arg("969,30,1", "Train,valid,test document split weights.")
    train_data_path: list = arg(
        [], "Training prefixes (optionally weighted), each used whole, instead of --data-path "
        "with --split (Megatron core).", nargs="*")
    valid_data_path: list = arg([], "Validation prefixes, each used whole (held-out loss).",
                                nargs="*")
    test_data_path: list = arg([], "Test prefixes, each used whole.", nargs="*")
    no_mmap_bin_files: bool = arg(
        False, "Read .bin token files with positioned reads instead of memory maps (Megatron "
        "core's flag): an unreadable region becomes an error naming file, document and offset "
        "instead of a SIGBUS.")
    data_cache_path: Optional[str] = arg(None, "Where index caches go (default beside data).")
    mock_data: bool = arg(False, "Synthetic random tokens instead of --data-path.")
    tokenizer_type: str = arg(
        "GPT2BPETokenizer", "Tokenizer.",
        choices=["GPT2BPETokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer",
                 "NullTokenizer"],
    )
    vocab_file: Optional[str] = arg(None, "GPT-2 encoder.json (default: bundled).")
    merge_file: Optional[str] = arg(None, "GPT-2 vocab.bpe merges (default: bundled).")
    tokenizer_model: Optional[str] = arg(
        None, "SentencePiece .model, HF tokenizer dir, or a .tiktoken file."
    )
    reset_position_ids: bool = arg(False, "Restart positions after each end-of-document.")
    reset_attention_mask: bool = arg(False, "Block attention across documents.")
    eod_mask_loss: bool = arg(False, "No loss on end-of-document targets.")
    num_workers: int = arg(1, "Data loader worker processes.")


# DeiT presets (Touvron et al. 2021, Table 1): depth, width, heads; MLP 4x; patch 16 at 224.
DEIT_PRESETS: dict[str, dict[str, int]] = {
    "deit_tiny_patch16_224": dict(num_layers=12, hidden_size=192, num_attention_heads=3,
                                  patch_size=16, img_size=224),
    "deit_small_patch16_224": dict(num_layers=12, hidden_size=384, num_attention_heads=6,
                                   patch_size=16, img_size=224),
    "deit_base_patch16_224": dict(num_layers=12, hidden_size=768, num_attention_heads=12,
                                  patch_size=16, img_size=224),
}
DEIT_EPOCHS = 300


@dataclass
class VisionConfig:
    """The DeiT recipe of pretrain_vit.py (DeiT main.py's names, meanings and defaults); a
    section of its own, parsed only by the vision script. `--lr` is the BASE rate for 512
    images."""

    model: Optional[str] = arg(
        None, "DeiT preset (depth/width/heads/patch/img); explicit shape flags win.",
        choices=sorted(DEIT_PRESETS))
    img_size: Optional[int] = arg(None, "Input resolution (224).")
    patch_size: Optional[int] = arg(None, "Patch size (16).")
    num_classes: Optional[int] = arg(None, "Classes (default: from the dataset).")
    batch_size: Optional[int] = arg(
        None, "Images per process per micro-batch (= --micro-batch-size; DeiT 64).")
    epochs: Optional[int] = arg(
        None, f"Training epochs (DeiT {DEIT_EPOCHS}); excludes --train-iters.")
    warmup_epochs: float = arg(5.0, "Linear LR warm-up epochs.")
    no_lr_scale: bool = arg(False, "Use --lr as given instead of --lr x global batch / 512.")
    mixup: float = arg(0.8, "Mixup alpha (0 = off).")
    cutmix: float = arg(1.0, "CutMix alpha (0 = off).")
    smoothing: float = arg(0.1, "Label smoothing.")
    reprob: float = arg(0.25, "Random erasing probability.")
    aa: str = arg("rand-m9-mstd0.5-inc1", "timm AutoAugment policy or none.")
    drop_path: float = arg(0.1, "Stochastic depth rate.")
    repeated_aug: bool = arg(
        True, "Repeated augmentation (each image 3x per epoch on different GPUs).",
        negatable=True)
    model_ema: bool = arg(
        False, "Keep an EMA of the weights (checkpointed) and evaluate it too.", negatable=True)
    model_ema_decay: float = arg(0.99996, "EMA decay per step.")
    hf_dataset: Optional[str] = arg(
        None, "Hugging Face dataset (imagenet-1k, a save_to_disk dir, a local dataset) instead "
        "of the ImageFolder --data-path.")


@dataclass
class Config:
    """The resolved configuration of a run (saved with every checkpoint)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Inverse of to_dict; unknown keys are an error (a checkpoint from another version)."""
        parts = {}
        for f in dataclasses.fields(cls):
            sub_cls = f.default_factory  # type: ignore[misc]
            known = {x.name for x in dataclasses.fields(sub_cls)}
            sub = d.get(f.name, {})
            unknown = set(sub) - known
            if unknown:
                raise ValueError(f"config section '{f.name}' has unknown keys {sorted(unknown)}")
            parts[f.name] = sub_cls(**sub)
        return cls(**parts)


SECTIONS = {"model": ModelConfig, "moe": MoEConfig, "parallel": ParallelConfig,
            "train": TrainConfig, "data": DataConfig}
EXTRA_SECTIONS = {"vision": VisionConfig}
"""Sections a script opts into (`parse_args(..., sections=("vision",))`); not part of Config."""
