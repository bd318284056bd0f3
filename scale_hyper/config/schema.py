"""The run configuration: omegaconf structured dataclasses, the single source of truth.

Every key a user can set lives here (the ``model`` group in ``scale_hyper.config.model``), with its
type, default, one-line description and allowed values, declared with ``option`` as dataclass
metadata. YAML presets (``scale_hyper/presets``) and ``key=value`` overrides are merged onto these
dataclasses, so a typo or a wrong type fails at load time; ``RunConfig.validate`` (called once by
``load_config``) checks every choice and range, and the rules that span keys or groups. The
DeepSpeed JSON is generated from the ``deepspeed`` and ``train`` groups (``scale_hyper.engine.ds_config``);
what needs the world size (batch arithmetic) is checked there.

A default is what runs without a preset, except where ``presets/defaults.yaml`` says otherwise: it
only holds the interpolations (``model.vocab_size: ${data.vocab_size}``, ``data.output``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Any, ClassVar, Dict, Iterator, List, Optional, Tuple

from scale_hyper.config.model import ConfigError, ConfigGroup, ModelConfig, fail, option

GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")
TOKEN_DTYPE_LIMIT = 2**32  # shards store ids as uint16, or uint32 above 65536 tokens (data/shards.py)


def main_job_model() -> ModelConfig:
    """The embedded main job's geometry (that of hyperbert-tiny): what runs without a preset.

    ``ModelConfig()``'s own defaults (d=256, 4 layers) are the Hugging Face-facing geometry and stay
    equal to ``ScaleHyperConfig``'s."""
    return ModelConfig(
        vocab_size=4096, hidden_size=64, num_layers=2, num_heads=2, ffn_size=256, hyper_width=32, hyper_heads=2,
        mixer_width=64,
    )  # fmt: skip


@dataclass
class MixtureSource(ConfigGroup):
    """One entry of ``data.mixture``: a prepared dataset and its share of the training sequences."""

    output: str = option("", "a prepared data.output (local directory or URL) holding manifest.json")
    weight: float = option(1.0, "relative share of training sequences (normalised over the mixture)", gt=0)

    def check(self, group: str) -> None:
        if not self.output:
            raise fail(f"{group}.output is empty", f"set {group}.output to a prepared data.output")


@dataclass
class DataConfig(ConfigGroup):
    GROUP: ClassVar[str] = "data"

    source: str = option(
        "stdlib",
        "where text comes from: stdlib (embedded: Python's own docs, no download), local files, globs or URLs "
        "(.txt, .jsonl, .gz, .zst, .parquet; comma-separated), or hf:NAME for a Hugging Face dataset (streamed)",
    )
    hf_config: Optional[str] = option(None, "datasets config name for hf: sources, e.g. wikitext-103-raw-v1")
    hf_split: str = option("train", "datasets split for hf: sources")
    hf_data_files: Optional[str] = option(None, "data_files (a path or glob) for hf:json, hf:text, hf:parquet")
    text_field: str = option("text", "field (column) holding the text in .jsonl/.parquet files and datasets rows")
    max_documents: int = option(0, "read at most this many documents; 0 = all", ge=0)
    output: str = option(
        "data/stdlib",
        "shards: a local directory, or a URL: s3: (s3fs, AWS_ENDPOINT_URL_S3/AWS_PROFILE), file:, http(s):, pipe:; "
        "without a preset, presets/defaults.yaml names it after data.vocab_size and data.seq_len",
    )
    tokenizer: Optional[str] = option(None, "an existing tokenizer directory; None = train WordPiece on the corpus")
    tokenizer_train_chars: int = option(500_000_000, "train WordPiece on the corpus' first N characters; 0 = all", ge=0)
    vocab_size: int = option(
        4096, "WordPiece vocabulary size (at most 2^32: shards store uint16/uint32 ids)", ge=16, le=TOKEN_DTYPE_LIMIT
    )
    seq_len: int = option(128, "tokens per packed sequence, [CLS] and [SEP] included (≤ model.max_position)", ge=4)
    sequences_per_block: int = option(64, "sequences per .npy tar member", ge=1)
    sequences_per_shard: int = option(4096, "sequences per shard", ge=1)
    min_shards: int = option(
        16, "small corpora are cut into at least this many shards (ranks × workers must fit)", ge=1
    )
    val_fraction: float = option(0.02, "fraction of sequences held out for validation", ge=0, lt=1)
    prepare_workers: int = option(
        2, "local processes per `scale-hyper prepare` task, each tokenizing whole slices; 0 or 1 = in-process", ge=0
    )
    slice_bytes: int = option(
        64 << 20, "prepare: uncompressed local text files are cut into slices of this many bytes", ge=4096
    )
    slice_documents: int = option(
        20_000, "prepare: stdlib, one-shard hf: sources and max_documents runs are cut into slices of N documents", ge=1
    )
    num_workers: int = option(1, "loader worker processes per rank; 0 = in the training process", ge=0)
    shards_per_worker: int = option(
        4, "loader: each worker reads this many of its shards at once, one sequence from each in turn", ge=1
    )
    shuffle_buffer: int = option(
        1024,
        "loader: sequences per seeded shuffle window of a worker's interleaved shards (exactly resumable); 0 = off",
        ge=0,
    )
    mixture: List[MixtureSource] = option(
        help="weighted mix of prepared datasets, per sequence, e.g. [{output: DIR_OR_URL, weight: 0.7}, ...] "
        "(weights > 0, normalised); empty = data.output alone. Tokenizer and validation: the first source's",
        factory=list,
    )
    mask_prob: float = option(0.15, "MLM: probability that a token is selected for prediction", ge=0, lt=1)
    on_corrupt: str = option("skip", "a corrupt shard: skip it (logged and counted) or fail", choices=("skip", "fail"))
    allow_pipe: bool = option(False, "run pipe: URLs named in this config (never from shards or manifests)")

    def check(self, group: str) -> None:
        for i, src in enumerate(self.mixture):
            src.validate(f"{group}.mixture[{i}]")


@dataclass
class TrainConfig(ConfigGroup):
    GROUP: ClassVar[str] = "train"

    max_steps: int = option(300, "optimizer steps of the run (the LR schedule spans them)", ge=1)
    micro_batch_size: int = option(
        32,
        "upper bound on sequences per rank per forward (a memory knob): the engine picks the largest micro ≤ it "
        "with micro × grad-accum × world = global_batch_size",
        ge=1,
    )
    global_batch_size: int = option(
        32,
        "sequences per optimizer step, the same at every world size (must divide by the world size); "
        "0 = micro_batch_size × world",
        ge=0,
    )
    lr: float = option(2e-3, "peak learning rate", gt=0)
    min_lr_ratio: float = option(0.0, "final LR / peak LR at max_steps (linear or cosine decay)", ge=0, le=1)
    warmup_ratio: float = option(0.06, "fraction of max_steps spent in linear warmup", ge=0, lt=1)
    decay: str = option("linear", "LR decay after warmup", choices=("linear", "cosine"))
    weight_decay: float = option(0.01, "AdamW weight decay", ge=0)
    decay_embeddings: bool = option(False, "apply weight decay to embeddings too (norms and biases never)")
    adam_betas: List[float] = option(help="AdamW (beta1, beta2)", factory=lambda: [0.9, 0.98], ge=0, lt=1)
    adam_eps: float = option(1e-6, "AdamW epsilon", gt=0)
    grad_clip: float = option(1.0, "clip the global gradient norm to this; 0 = off", ge=0)
    max_bad_steps: int = option(5, "consecutive non-finite losses before checkpoint-and-stop", ge=1)
    activation_checkpointing: str = option(
        "none", "recompute each block in backward (reentrant is rejected)", choices=("none", "non_reentrant")
    )
    compile: bool = option(False, "torch.compile the model (engine.compile(), inductor; first steps are slow)")
    output_dir: str = option("runs/default", "run directory: checkpoints, metrics, Hugging Face export")
    seed: int = option(1234, "seed of weights, data order, masks and dropout", ge=0)
    resume: str = option(
        "auto",
        "auto = newest complete checkpoint in output_dir; none = start fresh; or a checkpoint/run directory",
        choices=("auto", "none"),
        or_path="a checkpoint or run directory",
    )
    init_from: Optional[str] = option(
        None,
        "start from trained weights (HF dir, run dir or checkpoint; e.g. a transplant): their geometry replaces "
        "model.*, optimizer and schedule start fresh; ignored once the run has its own checkpoint",
    )
    save_every: int = option(100, "checkpoint every N steps (and at the end)", ge=1)
    stop_after_steps: int = option(
        0, "checkpoint and exit after N steps in one invocation (time-sliced jobs); 0 = off", ge=0
    )
    stop_check_every: int = option(
        10,
        "ranks agree on a stop signal (SIGTERM/SIGUSR1) every N steps: a signal is honoured within N steps; "
        "1 checks every step at the cost of one collective each",
        ge=1,
    )
    keep_checkpoints: int = option(2, "keep the newest N checkpoints; 0 = all", ge=0)
    verify_checkpoint: str = option(
        "full",
        "check a checkpoint against its manifest before loading it: full = file sizes and xxh3 checksums, "
        "sizes = file sizes only, off = no check (a damaged newest checkpoint then fails inside DeepSpeed)",
        choices=("full", "sizes", "off"),
    )
    log_every: int = option(10, "log metrics every N steps", ge=1)
    eval_every: int = option(100, "validation MLM loss every N steps", ge=1)
    eval_batches: int = option(16, "validation batches per evaluation; 0 = all", ge=0)
    export: bool = option(True, "write a Hugging Face directory at the end")
    dist_timeout_minutes: float = option(
        10.0,
        "minutes (fractions allowed) a rank may send no heartbeat before every live rank names it and exits 5; "
        "collectives wait this plus 2 x 5 heartbeat intervals (docs/engine.md, Hung ranks)",
        ge=0.1,
        le=1440,
    )
    device: str = option("auto", "auto = cuda when visible, else cpu", choices=("auto", "cpu", "cuda"))

    def validate(self, group: str = "") -> TrainConfig:
        key = f"{group or self.GROUP}.activation_checkpointing"
        if self.activation_checkpointing == "reentrant":  # before the generic check: it deserves its reason
            raise fail(
                f"{key}=reentrant is not supported: reentrant checkpointing re-runs the forward inside autograd, "
                "so the hypernetwork shared by all layers has its gradients reduced more than once per step "
                "under ZeRO-2/3 ('already been reduced')",
                f"use {key}=non_reentrant",
            )
        return super().validate(group)

    def check(self, group: str) -> None:
        if len(self.adam_betas) != 2:
            raise fail(
                f"{group}.adam_betas={list(self.adam_betas)} is not two numbers", f"e.g. {group}.adam_betas=[0.9,0.98]"
            )


@dataclass
class DeepSpeedConfig(ConfigGroup):
    GROUP: ClassVar[str] = "deepspeed"

    config: Optional[str] = option(None, "a DeepSpeed JSON (e.g. ds_configs/zero3.json) merged over the generated one")
    zero_stage: int = option(1, "ZeRO stage", ge=0, le=3)
    precision: str = option("auto", "auto = bf16 on a capable GPU, else fp32", choices=("auto", "fp32", "bf16", "fp16"))
    offload_optimizer: bool = option(False, "ZeRO-Offload: optimizer state in CPU memory")
    offload_param: bool = option(False, "ZeRO-Infinity: parameters in CPU memory (needs zero_stage=3)")
    hypernet_resident: bool = option(True, "ZeRO-3: keep the shared hypernetwork gathered on every rank")
    optimizer: str = option(
        "adamw", "adamw (torch), fused_adam or cpu_adam (DeepSpeed ops)", choices=("adamw", "fused_adam", "cpu_adam")
    )
    overlap_comm: bool = option(True, "overlap gradient reduction with backward (CUDA only)")
    reduce_bucket_size: int = option(50_000_000, "elements per gradient reduction bucket", ge=1)
    param_persistence_threshold: int = option(100_000, "ZeRO-3: parameters smaller than this stay gathered", ge=0)
    extra: Dict[str, Any] = option(help="merged verbatim into the generated JSON (last)", factory=dict)

    def check(self, group: str) -> None:
        if self.offload_param and self.zero_stage != 3:
            raise fail(
                f"{group}.offload_param=true needs {group}.zero_stage=3 (it is {self.zero_stage})",
                f"set {group}.zero_stage=3 or {group}.offload_param=false",
            )


@dataclass
class TrackingConfig(ConfigGroup):
    GROUP: ClassVar[str] = "tracking"

    enabled: bool = option(True, "log the run to MLflow")
    uri: str = option("sqlite:///mlflow.db", "MLflow tracking URI (a tracking server URL on clusters)")
    experiment: str = option("scale-hyper", "MLflow experiment name")
    run_name: Optional[str] = option(None, "MLflow run name; None = MLflow's generated name")
    artifact_location: Optional[str] = option(
        None, "artifact root of a new experiment; None = ./mlartifacts beside the sqlite store"
    )
    system_metrics: bool = option(False, "log CPU/GPU/memory metrics (MLflow system metrics)")
    tags: Dict[str, str] = option(help="extra MLflow run tags (tracking.tags.NAME=VALUE)", factory=dict)


@dataclass
class EvalConfig(ConfigGroup):
    GROUP: ClassVar[str] = "eval"

    batches: int = option(0, "validation batches for `scale-hyper eval`; 0 = all", ge=0)
    glue_tasks: List[str] = option(
        help="GLUE tasks `scale-hyper glue` runs by default", factory=lambda: list(GLUE_TASKS), choices=GLUE_TASKS
    )
    glue_dir: Optional[str] = option(None, "GLUE in the TSV layout, offline; None = Hugging Face datasets")
    lrs: List[float] = option(
        help="GLUE fine-tuning learning rates (the best is reported)", factory=lambda: [1e-4, 5e-5, 3e-5], gt=0
    )
    seeds: List[int] = option(help="GLUE fine-tuning seeds (the median is reported)", factory=lambda: [1, 2, 3], ge=0)
    batch_size: int = option(32, "GLUE fine-tuning batch size", ge=1)
    epochs: int = option(3, "GLUE fine-tuning epochs", ge=1)


@dataclass
class RunConfig:
    model: ModelConfig = option(
        help="model geometry and mixer; defaults: the embedded main job (hyperbert-tiny geometry), not the "
        "Hugging Face defaults of ModelConfig()",
        factory=main_job_model,
    )
    data: DataConfig = option(help="corpus, tokenizer, shards and the streaming MLM loader", factory=DataConfig)
    train: TrainConfig = option(help="optimisation, schedule, checkpoints and the run directory", factory=TrainConfig)
    deepspeed: DeepSpeedConfig = option(
        help="the generated DeepSpeed JSON (ZeRO, precision, optimizer)", factory=DeepSpeedConfig
    )
    tracking: TrackingConfig = option(help="MLflow tracking", factory=TrackingConfig)
    eval: EvalConfig = option(help="`scale-hyper eval` and `scale-hyper glue`", factory=EvalConfig)

    def validate(self) -> RunConfig:
        """Every group's own checks, then the rules across groups. Raises ConfigError."""
        for f in fields(self):
            getattr(self, f.name).validate(f.name)
        if self.data.seq_len > self.model.max_position:
            raise fail(
                f"data.seq_len={self.data.seq_len} is longer than model.max_position={self.model.max_position}",
                "lower data.seq_len or raise model.max_position",
            )
        return self


def schema_fields(schema: Any = RunConfig, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """``(dotted key, dataclass Field)`` for every group and key of ``schema``, depth first."""
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        yield key, f
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            yield from schema_fields(type(default), key + ".")


__all__ = [
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "EvalConfig",
    "MixtureSource",
    "GLUE_TASKS",
    "RunConfig",
    "TrackingConfig",
    "TrainConfig",
    "main_job_model",
    "schema_fields",
]
