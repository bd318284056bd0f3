"""The run configuration: omegaconf structured dataclasses, the single source of truth.

Every key a user can set lives here, with its type and default. YAML presets
(``scale_hyper/presets``) and ``key=value`` overrides are merged onto these dataclasses, so a
typo or a wrong type fails at load time. The DeepSpeed JSON is generated from the ``deepspeed``
and ``train`` groups (see ``scale_hyper.engine.ds_config``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from scale_hyper.models.model_config import ModelConfig


@dataclass
class DataConfig:
    # Where text comes from: "stdlib" (embedded: Python's own docs, no download), a local
    # file/glob (.txt, .jsonl, .gz), or "hf:NAME" for a Hugging Face dataset (streamed).
    source: str = "stdlib"
    hf_config: Optional[str] = None  # datasets config name, e.g. wikitext-103-raw-v1
    hf_split: str = "train"
    hf_data_files: Optional[str] = None  # data_files for hf:json / hf:text / hf:parquet (a path or glob)
    text_field: str = "text"  # field holding the text in .jsonl / datasets rows
    max_documents: int = 0  # 0 = all
    # Shards: a local directory, or a URL/brace pattern webdataset can read (file:, http(s):, pipe:, s3:).
    output: str = "data/stdlib"
    tokenizer: Optional[str] = None  # existing tokenizer directory; None = train WordPiece on the corpus
    tokenizer_train_chars: int = 500_000_000  # WordPiece is trained on the corpus' first N characters; 0 = all
    vocab_size: int = 4096
    seq_len: int = 128
    sequences_per_block: int = 64  # sequences per .npy tar member
    sequences_per_shard: int = 4096
    min_shards: int = 16  # small corpora are cut into at least this many shards (ranks × workers must fit)
    val_fraction: float = 0.02
    prepare_workers: int = 2
    # Loader
    num_workers: int = 1  # loader worker processes per rank
    shuffle_buffer: int = 1024  # sequences
    mask_prob: float = 0.15
    on_corrupt: str = "skip"  # skip (log and count) | fail
    allow_pipe: bool = False  # run "pipe:" URLs named in this config (never from shards/manifests)


@dataclass
class TrainConfig:
    max_steps: int = 300
    micro_batch_size: int = 32  # sequences per rank per forward
    global_batch_size: int = 32  # micro × grad-accum × world; 0 = micro × world
    lr: float = 2e-3
    min_lr_ratio: float = 0.0
    warmup_ratio: float = 0.06
    decay: str = "linear"  # linear | cosine
    weight_decay: float = 0.01
    decay_embeddings: bool = False  # norms and biases are never decayed
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    adam_eps: float = 1e-6
    grad_clip: float = 1.0
    max_bad_steps: int = 5  # consecutive NaN/inf steps before checkpoint-and-stop
    activation_checkpointing: str = "none"  # none | non_reentrant (reentrant is rejected)
    compile: bool = False  # torch.compile the model (engine.compile(); inductor; first steps are slow)
    output_dir: str = "runs/default"
    seed: int = 1234
    resume: str = "auto"  # auto (newest checkpoint in output_dir) | none | a checkpoint path
    # Start from trained weights (HF dir, run dir or checkpoint; e.g. a transplant): their geometry
    # replaces model.*, optimizer and schedule start fresh. Ignored once the run has its own checkpoint.
    init_from: Optional[str] = None
    save_every: int = 100
    stop_after_steps: int = 0  # checkpoint and exit after this many steps in one invocation (time-sliced jobs); 0 = off
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 16
    export: bool = True  # write a Hugging Face directory at the end
    dist_timeout_minutes: float = 10.0  # a dead or hung rank stops the others after this long
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class DeepSpeedConfig:
    config: Optional[str] = None  # a DeepSpeed JSON (e.g. ds_configs/zero3.json) used instead of the keys below
    zero_stage: int = 1
    precision: str = "auto"  # auto (bf16 on a capable GPU, else fp32) | fp32 | bf16 | fp16
    offload_optimizer: bool = False
    offload_param: bool = False
    hypernet_resident: bool = True  # ZeRO-3: keep the shared hypernetwork gathered on every rank
    optimizer: str = "adamw"  # adamw (torch) | fused_adam | cpu_adam
    overlap_comm: bool = True
    reduce_bucket_size: int = 50_000_000
    param_persistence_threshold: int = 100_000
    extra: Dict[str, Any] = field(default_factory=dict)  # merged verbatim into the generated JSON


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"  # a tracking server URL on clusters
    experiment: str = "scale-hyper"
    run_name: Optional[str] = None
    artifact_location: Optional[str] = None  # default: ./mlartifacts beside the sqlite store
    system_metrics: bool = False
    tags: Dict[str, str] = field(default_factory=dict)


@dataclass
class EvalConfig:
    batches: int = 0  # validation batches for `scale-hyper eval`; 0 = all
    glue_tasks: List[str] = field(
        default_factory=lambda: ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"]
    )
    glue_dir: Optional[str] = None  # GLUE TSV layout offline; None = Hugging Face datasets
    lrs: List[float] = field(default_factory=lambda: [1e-4, 5e-5, 3e-5])
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    batch_size: int = 32
    epochs: int = 3


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
