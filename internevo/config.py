"""Typed configuration: InternEvo-style Python config files loaded into dataclasses.

A config file is ordinary Python.  Every lower-case top-level name must be a known section or key
(``data``, ``model``, ``parallel`` …); ALL-CAPS names are the file's own constants (``SEQ_LEN``,
``HIDDEN_SIZE`` …) and are kept in :attr:`TrainConfig.constants`.  Unknown keys, wrong types and
impossible values raise :class:`ConfigError` naming the file, the dotted key and, for a typo, the
closest valid key.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from internevo.errors import InternEvoError

DTYPES = ("torch.float32", "torch.bfloat16", "torch.float16", "torch.tf32")
_DTYPE_ALIASES = {
    "fp32": "torch.float32", "float32": "torch.float32", "torch.float": "torch.float32",
    "bf16": "torch.bfloat16", "bfloat16": "torch.bfloat16",
    "fp16": "torch.float16", "float16": "torch.float16", "torch.half": "torch.float16",
    "half": "torch.float16", "tf32": "torch.tf32",
}


class ConfigError(InternEvoError, ValueError):
    """A config file names an unknown key, has a wrong type or an impossible value."""

    kind = "config error"


# --------------------------------------------------------------------------------------------
# sections


@dataclass
class DataConfig:
    """The ``data`` section: what is read, how it is packed and how much of it forms a step."""

    seq_len: int = 2048
    """Longest segment inside a packed row; attention never spans more than this."""
    micro_bsz: int = 1
    """Number of ``seq_len`` windows packed into one row (a row has ``seq_len * micro_bsz`` tokens).
    """
    micro_num: int = 1
    """Packed rows per optimizer step per data-parallel rank (gradient-accumulation steps)."""
    total_steps: int = 50000
    """Number of batches the loop consumes (skipped and overflowed batches included)."""
    type: str = "tokenized"
    """Dataset kind: ``tokenized`` (``.bin`` + ``.bin.meta``) or ``streaming`` (Hugging Face files).
    """
    packed_length: Optional[int] = None
    """Derived: ``seq_len * micro_bsz``.  A different value given here is an error."""
    gradient_accumulation: Optional[int] = None
    """Derived: equals ``micro_num`` (InternEvo's alias); a different value is an error."""
    valid_micro_num: Optional[int] = None
    """Rows per validation batch (defaults to ``micro_num``)."""
    valid_every: int = 0
    """Evaluate every N successful steps (0 = never)."""
    pack_sample_into_one: bool = False
    """True: windows ignore sample boundaries (attention crosses samples inside a window)."""
    skip_batches: str = ""
    """Batch indices to consume without training, e.g. ``"10-20,35"`` (inclusive ranges)."""
    rampup_batch_size: Optional[str] = ""
    """``"start incr every"``: micro_num starts at ``start`` and grows by ``incr`` every ``every``
    batches.
    """
    min_length: int = 0
    """Drop samples with fewer tokens than this."""
    min_length_dict: Optional[dict] = None
    """Per-path-substring override of ``min_length``, e.g. ``{"pile-arxiv": 50}``."""
    train_folder: Optional[str] = None
    """Training data folder (``<type>/**.bin``) or, for streaming, a dataset folder/file;
    None = dummy
    data.
    """
    valid_folder: Optional[str] = None
    """Validation folder; each leaf folder with ``.bin`` files is one named validation set."""
    num_worker: int = 4
    """Background workers of the training loader (0 = load in the training process)."""
    seed: int = 1024
    """Seed of the batch sampler's shuffle."""
    empty_cache_and_diag_interval: int = 50
    """Batches between CUDA cache flushes and slow-rank diagnostics (``train/diag.py``; 0: never):
    every rank's step time is all-gathered over data parallel and slow ranks are reported."""
    diag_outlier_ratio: float = 1.1
    """A rank whose step time exceeds ``(1 + ratio) x`` the data-parallel mean is reported (with
    its rank and host) by the diagnostics."""
    use_packed_dataset: bool = True
    """Packed rows with ``cu_seqlens``; False is accepted only for compatibility (rows are always
    packed).
    """
    fixed_random_dataset_seqlen: bool = False
    """Dummy data: every sample reaches ``seq_len`` tokens."""
    tokenizer_path: Optional[str] = None
    """Streaming data: a SentencePiece model file or a Hugging Face tokenizer folder."""
    content_name: str = "text"
    """Streaming data: the record field that holds the text."""
    subset_name: Optional[str] = None
    """Streaming data: sub-folder (``data_dir``) of the dataset to read."""
    bucket_size: int = 0
    """Reserved for length bucketing; only 0 is supported."""


@dataclass
class ModelConfig:
    """The ``model`` section: the shape and numerics of the network (keyword args of the builder).
    """

    num_layers: int = 48
    """Number of transformer blocks."""
    hidden_size: int = 2048
    """Model width ``h``."""
    num_attention_heads: int = 32
    """Query heads; ``hidden_size`` must be divisible by it."""
    vocab_size: int = 50304
    """Vocabulary size (rows of the embedding and of the output head)."""
    num_kv_attention_heads: Optional[int] = None
    """Key/value heads for grouped-query attention (InternLM2 only; default = query heads)."""
    mlp_ratio: float = 4.0
    """FFN width = round_up(int(hidden_size * mlp_ratio), multiple_of)."""
    multiple_of: int = 256
    """Rounding of the FFN width."""
    checkpoint: Union[bool, float] = False
    """Activation checkpointing: fraction of the blocks (the first ones) recomputed in backward."""
    dropout_selective_checkpoint: bool = True
    """Accepted for compatibility; only whole-block recomputation is implemented."""
    dtype: str = "torch.float16"
    """Training dtype: torch.float32, torch.bfloat16, torch.float16 or torch.tf32."""
    embed_split_hidden: bool = False
    """Tensor parallel: split the embedding on the hidden dim (True) or on the vocabulary (False).
    """
    embed_grad_scale: float = 1.0
    """Only 1 is supported (no embedding-gradient shrinking)."""
    parallel_output: bool = True
    """Tensor parallel: keep logits vocab-sharded and use the vocab-parallel cross entropy."""
    norm_type: str = "rmsnorm"
    """Normalisation layer; only ``rmsnorm`` is supported."""
    layer_norm_epsilon: float = 1e-5
    """Epsilon of the norms."""
    use_flash_attn: bool = True
    """On a GPU, use a varlen kernel for packed rows: PyTorch's ``varlen_attn`` (torch >= 2.10),
    else flash-attn's when installed; ``False`` (or a CPU) runs SDPA per segment."""
    num_chunks: int = 1
    """Model chunks per pipeline stage (>1 = interleaved schedule)."""
    apply_post_layer_norm: bool = False
    """InternLM2: post-norm blocks (only False is supported)."""
    residual_in_fp32: bool = False
    """Only False is supported."""
    no_bias: bool = False
    """InternLM2: no bias in attention projections (InternLM2 never has biases here)."""
    adapt_hf: bool = True
    """InternLM2: q/k features in Hugging Face's half-split order (False = interleaved order)."""
    norm_head: bool = False
    """InternLM2: L2-normalise the output head's rows in every forward (the stored weight stays
    raw; a Hugging Face export writes the normalised rows)."""
    rope_base: float = 10000
    """RoPE base ``theta``."""
    use_dynamic_ntk_rope: bool = False
    """Dynamic-NTK RoPE scaling for positions beyond ``max_position_embeddings``."""
    max_position_embeddings: int = 2048
    """Trained context length (dynamic NTK scales beyond it)."""
    drop_rate: float = 0.0
    """Residual dropout."""
    attn_drop_rate: float = 0.0
    """Attention-probability dropout."""
    use_scaled_init: bool = True
    """Output projections (wo/out_proj, w2) initialised with std / sqrt(2 * (layer + 1))."""
    use_swiglu: bool = True
    """SwiGLU MLP (only True is supported)."""
    init_type: str = "normal"
    """InternLM2: ``normal`` or ``uniform`` initialisation."""
    embedding_init_std: float = 0.02
    """InternLM2: embedding init std."""
    attn_wqkv_init_std: float = 0.02
    """InternLM2: wqkv init std."""
    attn_other_init_std: float = 0.02
    """InternLM2: wo init std (before scaling)."""
    ffn_uplayer_init_std: float = 0.02
    """InternLM2: w1/w3 init std."""
    ffn_other_init_std: float = 0.02
    """InternLM2: w2 init std (before scaling)."""
    out_head_init_std: float = 0.02
    """InternLM2: output head init std."""
    is_reward: bool = False
    """Only False is supported."""
    num_experts: int = 1
    """Only 1: MoE models are not supported by this version."""
    deepnorm: bool = False
    """Only False: DeepNorm is not supported (InternEvo itself refuses it)."""


@dataclass
class ZeroConfig:
    """``parallel.zero1``: sharding of optimizer states."""

    size: int = -1
    """Ranks that share one copy of the optimizer states: -1 = all of data parallel, 1 = none."""
    fsdp: bool = False
    """Shard parameters and gradients too, with PyTorch FSDP2 over the zero1 group (with
    ``tensor.size > 1``, mtp/msp/fsp: FSDP shards the tensor-parallel shards)."""


@dataclass
class TensorConfig:
    """``parallel.tensor``: tensor / sequence parallelism."""

    size: int = 1
    """Tensor-parallel degree (for ``isp``: the sequence-parallel degree)."""
    mode: str = "mtp"
    """``mtp`` (Megatron TP), ``msp`` (Megatron SP), ``fsp`` (flash-attn SP) or ``isp`` (Intern SP).
    """


@dataclass
class PipelineConfig:
    """``parallel.pipeline``: pipeline parallelism."""

    size: int = 1
    """Number of pipeline stages."""
    interleaved_overlap: bool = False
    """Overlap communication in the interleaved schedule (required when ``model.num_chunks > 1``).
    """


@dataclass
class WeightConfig:
    """``parallel.weight``: weight parallelism (with ``tensor.mode="isp"`` only)."""

    size: int = 1
    """Weight-parallel degree."""
    overlap: bool = False
    """Prefetch weight all-gathers and overlap gradient reduce-scatters."""
    memory_pool: bool = False
    """Pre-allocated buffers for gathered weights (requires ``overlap``)."""


@dataclass
class ParallelConfig:
    """The ``parallel`` section. Each entry also accepts a bare int (its ``size``)."""

    zero1: ZeroConfig = field(default_factory=ZeroConfig)
    """Optimizer-state sharding (ZeRO-1.5) and FSDP."""
    tensor: TensorConfig = field(default_factory=TensorConfig)
    """Tensor / sequence parallelism."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """Pipeline parallelism."""
    weight: WeightConfig = field(default_factory=WeightConfig)
    """Weight parallelism (isp only)."""
    sequence_parallel: Optional[bool] = None
    """Legacy flag; derived from ``tensor.mode`` (True for msp/fsp/isp)."""


@dataclass
class CkptConfig:
    """The ``ckpt`` section: saving, auto-resume and loading."""

    enable_save_ckpt: bool = True
    """Save checkpoints (loading is unaffected)."""
    save_ckpt_folder: Optional[str] = None
    """Folder of the run's checkpoints (``local:`` prefix accepted)."""
    checkpoint_every: Optional[int] = None
    """Save every N successful steps and at the last step (None = only at the last step)."""
    load_ckpt_info: Optional[dict] = None
    """``dict(path=..., content=("model",) | ("all",) ..., ckpt_type="internevo" | "hf",
    strict=True)``; ``strict=False`` leaves out checkpoint tensors the model does not have."""
    load_ckpt_folder: Optional[str] = None
    """Legacy: a checkpoint to load everything from when ``load_ckpt_info`` is absent."""
    auto_resume: bool = True
    """Resume from the newest complete checkpoint in ``save_ckpt_folder``
    (overrides load_ckpt_info).
    """
    async_upload: bool = False
    """Legacy name of ``async_save``."""
    async_upload_tmp_folder: Optional[str] = None
    """Accepted for compatibility (object stores are not supported)."""
    oss_snapshot_freq: Optional[int] = None
    """Accepted for compatibility (snapshots are not implemented)."""
    snapshot_ckpt_folder: Optional[str] = None
    """Accepted for compatibility."""
    stop_file_path: Optional[str] = None
    """Text file polled each step: ``n`` saves at step n and stops, ``-n`` saves at step n
    and goes on.
    """
    keep_last_n: Optional[int] = None
    """Keep only the newest N complete checkpoints (None = keep all)."""
    async_save: bool = False
    """Write checkpoints in a background thread while training continues."""


@dataclass
class Fp16ScalerConfig:
    """``grad_scaler.fp16``: the dynamic loss scale's range and cadence."""

    initial_scale: float = 2**16
    """Starting loss scale (forced to 1 when training in fp32)."""
    min_scale: float = 1
    """Lowest loss scale."""
    growth_interval: int = 1000
    """Consecutive good steps before the scale grows."""


@dataclass
class GradScalerConfig:
    """The ``grad_scaler`` section: the dynamic loss scaler."""

    fp16: Fp16ScalerConfig = field(default_factory=Fp16ScalerConfig)
    """Scale range and cadence."""
    growth_factor: float = 2
    """Multiplier on growth."""
    backoff_factor: float = 0.5
    """Multiplier on back-off."""
    max_scale: float = 2**24
    """Highest loss scale."""
    hysteresis: int = 2
    """Overflows tolerated before the scale backs off."""


@dataclass
class HybridZeroConfig:
    """The ``hybrid_zero_optimizer`` section."""

    overlap_sync_grad: bool = False
    """Reduce gradient buckets during the last micro-step's backward."""
    overlap_sync_param: bool = False
    """Accepted for compatibility; parameters are gathered right after the update."""
    reduce_bucket_size: int = 512 * 1024 * 1024
    """Elements per gradient-reduction bucket."""
    clip_grad_norm: float = 0.0
    """Clip the global gradient norm to this value (0 = off)."""
    zero_overlap_communication: Optional[bool] = None
    """Legacy name of ``overlap_sync_grad``."""


@dataclass
class LossConfig:
    """The ``loss`` section."""

    label_smoothing: float = 0.0
    """Label smoothing of the cross entropy."""
    moe_loss_coeff: float = 1.0
    """Accepted for compatibility (no MoE models)."""
    op_type: str = "py_vocab_parallel"
    """Accepted for compatibility; the vocab-parallel cross entropy is used whenever logits are
    sharded.
    """


@dataclass
class AdamConfig:
    """The ``adam`` section: AdamW with decoupled weight decay on every parameter."""

    lr: float = 1e-4
    """Peak learning rate."""
    adam_beta1: float = 0.9
    """beta1."""
    adam_beta2: float = 0.95
    """beta2 (replaced by the beta2 schedule when its ``c > 0``)."""
    adam_beta2_c: float = 0.0
    """Legacy; see ``beta2_scheduler.c``."""
    adam_eps: float = 1e-8
    """Epsilon."""
    weight_decay: float = 0.01
    """Decoupled weight decay."""


@dataclass
class LrSchedulerConfig:
    """The ``lr_scheduler`` section: linear warm-up then cosine decay."""

    total_steps: Optional[int] = None
    """Schedule length in successful updates (defaults to ``data.total_steps``)."""
    init_steps: int = 0
    """Updates with lr 0 before the warm-up."""
    warmup_ratio: float = 0.01
    """Warm-up length as a fraction of ``total_steps``."""
    eta_min: float = 1e-5
    """Final learning rate."""
    last_epoch: int = -1
    """Accepted for compatibility (only -1)."""


@dataclass
class Beta2SchedulerConfig:
    """The ``beta2_scheduler`` section: ``beta2(t) = max(init_beta2, 1 - t**-c)`` when ``c > 0``."""

    init_beta2: Optional[float] = None
    """Floor of beta2 (defaults to ``adam.adam_beta2``)."""
    c: float = 0.0
    """Exponent; 0 keeps beta2 constant."""
    cur_iter: int = -1
    """Accepted for compatibility (only -1)."""


@dataclass
class MonitorConfig:
    """The ``monitor`` section (alerts are accepted but not sent anywhere)."""

    alert: dict = field(default_factory=dict)
    """InternEvo's alert settings; accepted for compatibility."""
    tensorboard: dict = field(default_factory=dict)
    """``queue_max_length``: accepted for compatibility (scalars are flushed every step)."""
    plot: bool = True
    """Draw ``metrics.png`` (loss, lr, grad norm, TGS over steps) at the end of a run."""
    memory_profile_steps: int = 2
    """Steps recorded by ``--profiling memory`` (from the first step)."""


@dataclass
class TrainConfig:
    """A whole config file."""

    JOB_NAME: str = "AnonymousJob"
    """Run name; the default run folder is ``runs/<JOB_NAME>``."""
    model_type: str = "INTERNLM"
    """Registered model (``internevo.models.registry``): ``INTERNLM``, ``INTERNLM2_PUBLIC`` …"""
    data: DataConfig = field(default_factory=DataConfig)
    """Data section."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model section."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel section."""
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    """Checkpoint section."""
    grad_scaler: GradScalerConfig = field(default_factory=GradScalerConfig)
    """Loss-scaler section."""
    hybrid_zero_optimizer: HybridZeroConfig = field(default_factory=HybridZeroConfig)
    """Optimizer-wrapper section."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss section."""
    adam: AdamConfig = field(default_factory=AdamConfig)
    """AdamW section."""
    lr_scheduler: LrSchedulerConfig = field(default_factory=LrSchedulerConfig)
    """LR-schedule section."""
    beta2_scheduler: Beta2SchedulerConfig = field(default_factory=Beta2SchedulerConfig)
    """beta2-schedule section."""
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    """Monitoring section."""
    use_fp32_norm: bool = False
    """Keep norm weights in fp32 when training in a 16-bit dtype."""
    cudnn_deterministic: bool = False
    """``torch.backends.cudnn.deterministic`` (set at launch on CUDA)."""
    cudnn_benchmark: bool = False
    """``torch.backends.cudnn.benchmark`` (set at launch on CUDA)."""
    enable_tb: bool = True
    """Write TensorBoard scalars."""
    tensorboard_folder: Optional[str] = None
    """TensorBoard folder (defaults to ``<run-dir>/tensorboard``)."""
    resume_tb_folder: Optional[str] = None
    """Accepted for compatibility."""
    metric_dtype: Optional[str] = None
    """Accepted for compatibility (metrics are computed in fp32)."""
    gradient_handler: list = field(default_factory=list)
    """Accepted for compatibility."""
    moe: dict = field(default_factory=dict)
    """Accepted for compatibility (no MoE models)."""
    constants: dict = field(default_factory=dict)
    """The file's ALL-CAPS names (``SEQ_LEN``, ``HIDDEN_SIZE`` …), kept verbatim."""
    source: Optional[str] = None
    """Path of the file this config was loaded from."""
    text: str = ""
    """The config file's text (saved with checkpoints)."""

    # ---------------------------------------------------------------- derived values
    @property
    def packed_length(self) -> int:
        """Tokens in one packed row."""
        return self.data.seq_len * self.data.micro_bsz

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads (query heads when the model has no GQA)."""
        return self.model.num_kv_attention_heads or self.model.num_attention_heads

    @property
    def lr_total_steps(self) -> int:
        """Length of the LR schedule."""
        return self.lr_scheduler.total_steps or self.data.total_steps

    @property
    def init_beta2(self) -> float:
        """Floor of the beta2 schedule."""
        b = self.beta2_scheduler.init_beta2
        return self.adam.adam_beta2 if b is None else b


_SECTION_ALLOW_INT = {ZeroConfig, TensorConfig, PipelineConfig, WeightConfig}
_FROZEN_ONLY = {  # field -> the only supported value (accepted for compatibility)
    "model.dropout_selective_checkpoint": None,
    "model.embed_grad_scale": 1.0,
    "model.norm_type": "rmsnorm",
    "model.apply_post_layer_norm": False,
    "model.residual_in_fp32": False,
    "model.use_swiglu": True,
    "model.is_reward": False,
    "data.bucket_size": 0,
    "lr_scheduler.last_epoch": -1,
    "beta2_scheduler.cur_iter": -1,
}
MOE_UNSUPPORTED = "MoE models are not supported by this version (dense INTERNLM and INTERNLM2 only)"
DEEPNORM_UNSUPPORTED = (
    "DeepNorm (post-norm residuals x*alpha + f(x) with alpha = (2N)**0.25 and init scaled by "
    "beta, for training very deep post-norm models) is not supported by this version, as in "
    "InternEvo, which refuses it too; remove the key or set it to False")


# --------------------------------------------------------------------------------------------
# conversion of plain values into dataclasses


def _fail(where: str, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{where}: {key}: {msg}")


def _unknown_key(where: str, prefix: str, key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return _fail(where, prefix + key, f"unknown key{hint}")


def _convert(value: Any, hint: Any, where: str, key: str) -> Any:
    """Check ``value`` against the type ``hint`` and convert sections into dataclasses."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[-1]
    if dataclasses.is_dataclass(hint):
        if isinstance(value, int) and not isinstance(value, bool) and hint in _SECTION_ALLOW_INT:
            value = {"size": value}
        if not isinstance(value, dict):
            raise _fail(where, key,
                        f"expected a dict section, got {type(value).__name__} {value!r}")
        return build_section(hint, value, where, key + ".")
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value == math.inf:
            return value
    elif hint in (dict, list, tuple):
        if isinstance(value, (list, tuple)) and hint in (list, tuple):
            return hint(value)
        if isinstance(value, hint):
            return value
    elif isinstance(value, hint):
        return value
    raise _fail(where, key, f"expected {getattr(hint, '__name__', hint)}, got "
                f"{type(value).__name__} {value!r}")


def build_section(cls: type, values: dict, where: str, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    internal = ("constants", "source", "text")
    names = [f.name for f in dataclasses.fields(cls) if f.name not in internal]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            if cls is ModelConfig and str(key).startswith("moe_"):
                raise _fail(where, prefix + str(key), MOE_UNSUPPORTED)
            raise _unknown_key(where, prefix, str(key), names)
        if key == "dtype" and cls is ModelConfig:
            value = _normalise_dtype(value, where)
        kwargs[key] = _convert(value, hints[key], where, prefix + key)
    obj = cls(**kwargs)
    obj._given = set(values)  # which keys the file set explicitly (used for per-model checks)
    return obj


def _normalise_dtype(value: Any, where: str) -> str:
    name = str(value)
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise _fail(where, "model.dtype",
                    f"unsupported dtype {value!r}; valid: {', '.join(DTYPES)}")
    return name


# --------------------------------------------------------------------------------------------
# validation


def _check(cond: bool, where: str, key: str, msg: str) -> None:
    if not cond:
        raise _fail(where, key, msg)


def _validate_data(cfg: TrainConfig, where: str) -> None:
    d = cfg.data
    for key in ("seq_len", "micro_bsz", "micro_num", "total_steps"):
        _check(getattr(d, key) >= 1, where, f"data.{key}", f"must be >= 1, got {getattr(d, key)}")
    _check(d.type in ("tokenized", "streaming"), where, "data.type",
           f"must be 'tokenized' or 'streaming', got {d.type!r}")
    if d.packed_length is not None:
        _check(d.packed_length == cfg.packed_length, where, "data.packed_length",
               f"is derived as seq_len*micro_bsz = {cfg.packed_length}; got {d.packed_length}")
    if d.gradient_accumulation is not None:
        _check(d.gradient_accumulation == d.micro_num, where, "data.gradient_accumulation",
               f"must equal data.micro_num ({d.micro_num}); got {d.gradient_accumulation}")
    _check(d.valid_every >= 0, where, "data.valid_every", f"must be >= 0, got {d.valid_every}")
    _check(d.min_length >= 0, where, "data.min_length", f"must be >= 0, got {d.min_length}")
    if d.type == "streaming":
        _check(d.train_folder is not None, where, "data.train_folder",
               "streaming data needs a dataset folder or file")
        _check(d.tokenizer_path is not None, where, "data.tokenizer_path",
               "streaming data needs a tokenizer (SentencePiece model or HF tokenizer folder)")


def _validate_model_type(cfg: TrainConfig, where: str) -> None:
    """``model_type`` is registered, every given ``model.*`` key is one it accepts, and the
    keys the file leaves out take the type's own defaults (``spec.defaults``).

    The one import from config into a higher layer, done lazily at validation time: the model
    registry owns the list of types and the keys each spec accepts (tests/test_imports.py
    allows exactly this import)."""
    from internevo.models.registry import MODEL_REGISTRY, foreign_keys, get_spec

    _check(cfg.model_type in MODEL_REGISTRY, where, "model_type",
           f"unknown model type {cfg.model_type!r}; registered: {', '.join(MODEL_REGISTRY)}")
    foreign = foreign_keys(cfg.model_type)
    given = getattr(cfg.model, "_given", set())
    wrong = sorted(given & foreign.keys())
    if wrong:
        raise _fail(where, f"model.{wrong[0]}", f"not a parameter of {cfg.model_type} "
                    f"(only of {', '.join(foreign[wrong[0]])})")
    for key, value in get_spec(cfg.model_type).defaults.items():
        if key not in given:
            setattr(cfg.model, key, value)


def _validate_model(cfg: TrainConfig, where: str) -> None:
    m = cfg.model
    _check("moe" not in cfg.model_type.lower(), where, "model_type",
           f"{cfg.model_type!r}: {MOE_UNSUPPORTED}")
    _check(m.num_experts == 1, where, "model.num_experts", f"={m.num_experts}: {MOE_UNSUPPORTED}")
    _check(not m.deepnorm, where, "model.deepnorm", DEEPNORM_UNSUPPORTED)
    _validate_model_type(cfg, where)
    for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "multiple_of"):
        _check(getattr(m, key) >= 1, where, f"model.{key}", f"must be >= 1, got {getattr(m, key)}")
    _check(m.hidden_size % m.num_attention_heads == 0, where, "model.num_attention_heads",
           f"num_attention_heads={m.num_attention_heads} does not divide "
           f"hidden_size={m.hidden_size}")
    _check(((m.hidden_size // m.num_attention_heads) % 2) == 0, where, "model.hidden_size",
           "head dim hidden_size/num_attention_heads must be even for RoPE")
    kv = cfg.num_kv_heads
    _check(kv >= 1 and m.num_attention_heads % kv == 0, where, "model.num_kv_attention_heads",
           f"num_kv_attention_heads={kv} must divide num_attention_heads={m.num_attention_heads}")
    ck = m.checkpoint
    _check(isinstance(ck, bool) or 0.0 <= ck <= 1.0, where, "model.checkpoint",
           f"must be a bool or a fraction in [0, 1], got {ck}")
    _check(m.mlp_ratio > 0, where, "model.mlp_ratio", f"must be > 0, got {m.mlp_ratio}")
    _check(m.init_type in ("normal", "uniform"), where, "model.init_type",
           f"must be 'normal' or 'uniform', got {m.init_type!r}")
    for key in ("drop_rate", "attn_drop_rate"):
        _check(0.0 <= getattr(m, key) < 1.0, where, f"model.{key}", "must be in [0, 1)")


def _validate_parallel(cfg: TrainConfig, where: str) -> None:
    p = cfg.parallel
    _check(p.tensor.mode in ("mtp", "msp", "fsp", "isp"), where, "parallel.tensor.mode",
           f"must be one of mtp, msp, fsp, isp; got {p.tensor.mode!r}")
    for key in ("tensor", "pipeline", "weight"):
        size = getattr(p, key).size
        _check(size >= 1, where, f"parallel.{key}.size", f"must be >= 1, got {size}")
    _check(not (cfg.model.norm_head and p.tensor.mode == "isp"), where, "model.norm_head",
           "is not supported with parallel.tensor.mode='isp' by this version (isp gathers the "
           "head's weight shards inside its own linear); use mtp, msp or fsp")
    _check(p.weight.size == 1 or p.tensor.mode == "isp", where, "parallel.weight.size",
           f"weight parallel (size={p.weight.size}) needs parallel.tensor.mode='isp'")
    _check(p.zero1.size != 0, where, "parallel.zero1.size", "use -1 (all of data parallel) or >= 1")
    if p.zero1.fsdp:
        _check(p.pipeline.size == 1, where, "parallel.zero1.fsdp", "FSDP needs pipeline.size=1")
        _check(p.tensor.mode != "isp", where, "parallel.zero1.fsdp", "FSDP cannot be used with isp")
    _check(cfg.model.num_chunks == 1 or p.pipeline.interleaved_overlap, where, "model.num_chunks",
           "num_chunks > 1 needs parallel.pipeline.interleaved_overlap=True")


def _validate_optim(cfg: TrainConfig, where: str) -> None:
    _check(cfg.adam.lr >= 0, where, "adam.lr", f"must be >= 0, got {cfg.adam.lr}")
    for key in ("adam_beta1", "adam_beta2"):
        v = getattr(cfg.adam, key)
        _check(0.0 <= v < 1.0, where, f"adam.{key}", f"must be in [0, 1), got {v}")
    _check(0.0 <= cfg.lr_scheduler.warmup_ratio <= 1.0, where, "lr_scheduler.warmup_ratio",
           f"must be in [0, 1], got {cfg.lr_scheduler.warmup_ratio}")
    _check(cfg.hybrid_zero_optimizer.clip_grad_norm >= 0, where,
           "hybrid_zero_optimizer.clip_grad_norm", "must be >= 0")
    _check(0.0 <= cfg.loss.label_smoothing < 1.0, where, "loss.label_smoothing",
           "must be in [0, 1)")
    gs = cfg.grad_scaler
    _check(gs.fp16.min_scale <= gs.fp16.initial_scale <= gs.max_scale, where,
           "grad_scaler.fp16.initial_scale", "must lie in [fp16.min_scale, max_scale]")
    if cfg.ckpt.keep_last_n is not None:
        _check(cfg.ckpt.keep_last_n >= 1, where, "ckpt.keep_last_n", "must be >= 1 or None")


_RANGES = {  # field -> (lowest, highest, lowest included); None = no bound
    "data.valid_micro_num": (1, None, True),
    "data.num_worker": (0, None, True),
    "data.seed": (0, None, True),
    "data.empty_cache_and_diag_interval": (0, None, True),
    "data.diag_outlier_ratio": (0, None, False),
    "model.layer_norm_epsilon": (0, None, False),
    "model.rope_base": (0, None, False),
    "model.max_position_embeddings": (1, None, True),
    "model.num_chunks": (1, None, True),
    "ckpt.checkpoint_every": (1, None, True),
    "ckpt.oss_snapshot_freq": (1, None, True),
    "lr_scheduler.total_steps": (1, None, True),
    "lr_scheduler.init_steps": (0, None, True),
    "lr_scheduler.eta_min": (0, None, True),
    "adam.adam_eps": (0, None, False),
    "adam.weight_decay": (0, None, True),
    "adam.adam_beta2_c": (0, None, True),
    "beta2_scheduler.c": (0, None, True),
    "beta2_scheduler.init_beta2": (0, 1, True),
    "hybrid_zero_optimizer.reduce_bucket_size": (1, None, True),
    "grad_scaler.growth_factor": (1, None, False),
    "grad_scaler.backoff_factor": (0, 1, False),
    "grad_scaler.hysteresis": (1, None, True),
    "grad_scaler.fp16.min_scale": (0, None, False),
    "grad_scaler.fp16.growth_interval": (1, None, True),
}
"""Numeric ranges of fields not checked elsewhere (a highest bound is always excluded)."""


def _validate_ranges(cfg: TrainConfig, where: str) -> None:
    """Every field of :data:`_RANGES` that is set lies in its range (the error names it)."""
    for dotted, (low, high, low_ok) in _RANGES.items():
        obj = cfg
        for part in dotted.split("."):
            obj = getattr(obj, part)
        if obj is None:
            continue
        valid = (obj >= low if low_ok else obj > low) and (high is None or obj < high)
        bound = f"{'>=' if low_ok else '>'} {low}" + (f" and < {high}" if high is not None else "")
        _check(valid, where, dotted, f"must be {bound}, got {obj}")


def _validate_frozen(cfg: TrainConfig, where: str) -> None:
    for dotted, only in _FROZEN_ONLY.items():
        section, key = dotted.split(".")
        obj = getattr(cfg, section)
        if only is None or key not in getattr(obj, "_given", ()):
            continue
        _check(getattr(obj, key) == only, where, dotted,
               f"only {only!r} is supported by this implementation, got {getattr(obj, key)!r}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check values that types alone cannot (ranges, divisibility, per-model keys)."""
    where = cfg.source or "<config>"
    _validate_data(cfg, where)
    _validate_model(cfg, where)
    _validate_parallel(cfg, where)
    _validate_optim(cfg, where)
    _validate_ranges(cfg, where)
    _validate_frozen(cfg, where)
    return cfg


# --------------------------------------------------------------------------------------------
# loading


def config_from_dict(values: dict, source: str = "<dict>") -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from the top-level names of a config file."""
    sections, constants = {}, {}
    for key, value in values.items():
        if key.startswith("_") or isinstance(value, (types.ModuleType, type, types.FunctionType)):
            continue
        if key.isupper() and key != "JOB_NAME":
            constants[key] = value
        else:
            sections[key] = value
    if "hybrid_zero_optimizer" in sections:
        hz = dict(sections["hybrid_zero_optimizer"])
        legacy = hz.get("zero_overlap_communication")
        if legacy is not None and "overlap_sync_grad" not in hz:
            hz["overlap_sync_grad"] = legacy
        sections["hybrid_zero_optimizer"] = hz
    cfg = build_section(TrainConfig, sections, source)
    cfg.constants = constants
    cfg.source = source
    if cfg.ckpt.async_upload:
        cfg.ckpt.async_save = True
    return validate(cfg)


def load_config(path: str | Path, overrides: Optional[dict] = None) -> TrainConfig:
    """Execute a Python config file and return its validated :class:`TrainConfig`.

    ``overrides`` maps dotted keys (``"data.total_steps"``) to values applied before validation.
    A file that inherits with ``read_base`` (:class:`BaseImporter`) is saved with checkpoints as
    its flattened values, so it loads again away from its ``configs/_base_`` tree.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    importer = BaseImporter(path)
    values = importer.run(path)
    for dotted, value in (overrides or {}).items():
        _set_dotted(values, dotted, value)
    cfg = config_from_dict(values, str(path))
    if importer.bases:
        text = flattened_text(values, path, importer.bases)
    cfg.text = text + _overrides_as_code(overrides or {})
    return cfg


# --------------------------------------------------------------------------------------------
# read_base inheritance (InternEvo's ``with read_base(): from configs._base_.x import *``)

CONFIG_PATH_ENV = "INTERNEVO_CONFIG_PATH"
"""Extra folders (``os.pathsep``-separated) searched for ``configs._base_...`` modules first."""
_READ_BASE_MODULES = ("internlm.utils.utils", "internlm.utils.config", "mmengine.config",
                      "mmengine")


@contextlib.contextmanager
def read_base() -> Iterator[None]:
    """InternEvo's (mmengine's) marker around base-config imports: it does nothing itself."""
    yield


class BaseImporter:
    """Executes config files, resolving their imports of other config files.

    ``from internlm.utils.utils import read_base`` gets :func:`read_base` (no InternEvo needed);
    ``from configs._base_.models.x import *`` executes ``configs/_base_/models/x.py`` found in
    the folders of :data:`CONFIG_PATH_ENV`, then the config file's folder and its parents (so
    the ``configs/`` tree of an InternEvo checkout is found from any config inside it), then the
    working directory; its public names then enter the importing file, which may override them
    (Python's import semantics, as InternEvo).  Other imports are ordinary imports, and are
    searched for in the same folders only when Python cannot find them.
    """

    def __init__(self, path: Path) -> None:
        env = [Path(p) for p in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep) if p]
        folder = path.resolve().parent
        self.roots = [*env, folder, *folder.parents, Path.cwd()]
        self.bases: list[Path] = []
        self._stack: list[Path] = []

    def run(self, path: Path) -> dict:
        """The top-level names (no dunders) after executing ``path``."""
        if path.resolve() in self._stack:
            raise ConfigError(f"{path}: imported by itself (through {self._stack[-1]})")
        self._stack.append(path.resolve())
        scope = {"__file__": str(path), "__name__": "__internevo_config__",
                 "__builtins__": {**builtins.__dict__, "__import__": self._import}}
        try:
            exec(compile(path.read_text(), str(path), "exec"), scope)
        except ConfigError:
            raise
        except Exception as err:  # the file itself is broken: say where
            raise ConfigError(f"{path}: could not execute config file: {err!r}") from err
        finally:
            self._stack.pop()
        return {k: v for k, v in scope.items() if not k.startswith("__")}

    def _import(self, name: str, globals_: Any = None, locals_: Any = None,
                fromlist: tuple = (), level: int = 0) -> Any:
        if name in _READ_BASE_MODULES:
            return types.SimpleNamespace(read_base=read_base)
        if level or name.split(".")[0] != "configs":
            try:
                return builtins.__import__(name, globals_, locals_, fromlist, level)
            except ModuleNotFoundError:
                if level:
                    raise
        found = self._find(name)
        if not found:
            raise ConfigError(f"{self._stack[-1]}: cannot import {name!r}: no "
                              f"{Path(*name.split('.'))}.py in {CONFIG_PATH_ENV}, the config's "
                              "folder, its parents or the working directory")
        if not fromlist:
            raise ConfigError(f"{self._stack[-1]}: 'import {name}': write 'from {name} import *' "
                              "inside 'with read_base():'")
        module = types.ModuleType(name)
        if found.is_file():
            self.bases.append(found)
            module.__dict__.update(self.run(found))
        else:  # a package folder: ``from configs._base_.models import internlm2_7B``
            for sub in (n for n in fromlist if n != "*"):
                setattr(module, sub, self._import(f"{name}.{sub}", fromlist=("*",)))
        return module

    def _find(self, name: str) -> Optional[Path]:
        """The file (or package folder) of module ``name`` under the search roots."""
        rel = Path(*name.split("."))
        for root in self.roots:
            if (root / rel).with_suffix(".py").is_file():
                return (root / rel).with_suffix(".py")
            if (root / rel).is_dir():
                return root / rel
        return None


def flattened_text(values: dict, path: Path, bases: list[Path]) -> str:
    """A config file with the resolved top-level values of ``path`` (no imports left)."""
    from_files = ", ".join(str(p) for p in [path, *bases])
    lines = [f"# {path.name} with its read_base imports resolved ({from_files})",
             "from math import inf, nan  # what repr() writes for them", ""]
    lines += [f"{k} = {v!r}" for k, v in values.items()
              if not k.startswith("_") and not callable(v) and not isinstance(v, types.ModuleType)]
    return "\n".join([*lines, "del inf, nan"]) + "\n"


def _overrides_as_code(overrides: dict) -> str:
    """Python appended to the saved config text so that it re-creates the same config."""
    if not overrides:
        return ""
    lines = ["", "", "# overrides given on the command line (--set)",
             "def _override(dotted, value):",
             "    *parents, last = dotted.split('.')",
             "    node = globals()",
             "    for part in parents:",
             "        node = node.setdefault(part, {})",
             "    node[last] = value", ""]
    lines += [f"_override({k!r}, {v!r})" for k, v in overrides.items()]
    return "\n".join(lines) + "\n"


def _set_dotted(values: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
    node[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.sub=value`` (value as a Python literal when it parses as one)."""
    import ast

    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


def section_to_dict(obj: Any) -> Any:
    """Plain-dict view of a section (for logging and checkpoints)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: section_to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if f.name != "text"}
    if isinstance(obj, (list, tuple)):
        return [section_to_dict(v) for v in obj]
    return obj
