"""The run directory and everything read from it: the one owner of the on-disk layout.

A run directory (``train.output_dir``)::

    RUN/
      config.yaml                 the resolved config of the newest invocation
      metrics.jsonl               every logged metric, one JSON object a line (rank 0)
      hf/                         the Hugging Face export written at the end of training
      checkpoints/                DeepSpeed's save directory (its `latest`, `zero_to_fp32.py`)
        step_N/                   one checkpoint: DeepSpeed's files, rank_R.pt, manifest.json (sizes and
                                  checksums of them all), trainer_state.json (LAST)
        step_N_universal/         the same step converted for another world size
        step_N.damaged/           a checkpoint that failed verification, set aside by a resume (kept)

``layout`` names these paths and finds checkpoints; ``manifest`` writes and checks what each
checkpoint's files must be; ``sources`` turns any of them (or a Hugging
Face directory) into a config and weights. Training, export, eval, GLUE, transplant and
``train.init_from`` all go through here, so they agree on what a path means.
"""

from scale_hyper.runs.layout import (
    MARKER,
    SET_ASIDE,
    NoCheckpointError,
    RunDir,
    complete_checkpoints,
    find_checkpoint,
    is_checkpoint,
    is_universal,
    read_state,
    run_config_of,
    set_aside,
    set_aside_checkpoints,
    step_name,
    write_state,
)
from scale_hyper.runs.sources import (
    ModelSource,
    consolidated_state_dict,
    load_mlm,
    load_strict,
    load_tokenizer_for,
    resolve,
    run_config,
    source_geometry,
)

__all__ = [
    "MARKER",
    "SET_ASIDE",
    "ModelSource",
    "NoCheckpointError",
    "RunDir",
    "complete_checkpoints",
    "consolidated_state_dict",
    "find_checkpoint",
    "is_checkpoint",
    "is_universal",
    "load_mlm",
    "load_strict",
    "load_tokenizer_for",
    "read_state",
    "resolve",
    "run_config",
    "run_config_of",
    "set_aside",
    "set_aside_checkpoints",
    "source_geometry",
    "step_name",
    "write_state",
]
