"""GLUE tasks and their data for ``scale-hyper glue``: the task table and the train / dev examples.

Data: ``eval.glue_dir`` in GLUE's own TSV layout (``SST-2/train.tsv``, ``SST-2/dev.tsv``,
``MNLI/dev_matched.tsv`` ...), or Hugging Face ``datasets`` ("nyu-mll/glue") when it is unset. Both
give the same examples: (texts, label) with the label ids in the Hub's ClassLabel order (a float
for STS-B's regression score).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple


@dataclass(frozen=True)
class Task:
    name: str
    folder: str  # GLUE TSV folder
    text_columns: Tuple[str, ...]  # TSV header names (CoLA: positional, see _read_tsv)
    label_column: str
    hf_columns: Tuple[str, ...]  # nyu-mll/glue column names
    labels: Tuple[str, ...] = ()  # TSV label strings in HF's id order; () = already integer ids
    num_labels: int = 2
    metrics: Tuple[str, ...] = ("accuracy",)
    dev_splits: Tuple[Tuple[str, str, str], ...] = (("dev", "dev.tsv", "validation"),)  # (name, tsv, hf split)

    @property
    def regression(self) -> bool:
        return self.num_labels == 1


TASKS: Dict[str, Task] = {
    t.name: t
    for t in (
        Task("cola", "CoLA", ("3",), "1", ("sentence",), metrics=("mcc",)),
        Task("sst2", "SST-2", ("sentence",), "label", ("sentence",)),
        Task(
            "mrpc",
            "MRPC",
            ("#1 String", "#2 String"),
            "Quality",
            ("sentence1", "sentence2"),
            metrics=("f1", "accuracy"),
        ),
        Task(
            "stsb",
            "STS-B",
            ("sentence1", "sentence2"),
            "score",
            ("sentence1", "sentence2"),
            num_labels=1,
            metrics=("pearson", "spearman"),
        ),
        Task(
            "qqp",
            "QQP",
            ("question1", "question2"),
            "is_duplicate",
            ("question1", "question2"),
            metrics=("f1", "accuracy"),
        ),
        Task(
            "mnli",
            "MNLI",
            ("sentence1", "sentence2"),
            "gold_label",
            ("premise", "hypothesis"),
            labels=("entailment", "neutral", "contradiction"),
            num_labels=3,
            dev_splits=(
                ("m", "dev_matched.tsv", "validation_matched"),
                ("mm", "dev_mismatched.tsv", "validation_mismatched"),
            ),
        ),
        Task(
            "qnli",
            "QNLI",
            ("question", "sentence"),
            "label",
            ("question", "sentence"),
            labels=("entailment", "not_entailment"),
        ),
        Task(
            "rte",
            "RTE",
            ("sentence1", "sentence2"),
            "label",
            ("sentence1", "sentence2"),
            labels=("entailment", "not_entailment"),
        ),
    )  # fmt: skip
}

Example = Tuple[Tuple[str, ...], float]


def _label(task: Task, raw: str) -> float:
    if task.regression:
        return float(raw)
    if task.labels:
        return float(task.labels.index(raw))
    return float(int(raw))


def read_tsv(task: Task, path: Path) -> List[Example]:
    """GLUE TSV rows → (texts, label). Malformed rows (QQP has a few) are skipped."""
    rows: List[Example] = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if task.name == "cola":  # no header: source, label, original label, sentence
            text_idx, label_idx, width = [int(c) for c in task.text_columns], int(task.label_column), 4
        else:
            header = next(reader)
            try:
                text_idx = [header.index(c) for c in task.text_columns]
                label_idx = header.index(task.label_column)
            except ValueError:
                raise ValueError(f"{path}: header {header} lacks {task.text_columns} / {task.label_column!r}") from None
            width = len(header)
        for row in reader:
            if len(row) < max(*text_idx, label_idx) + 1 or (
                task.name != "cola" and len(row) < min(width, label_idx + 1)
            ):
                continue
            try:
                rows.append((tuple(row[i] for i in text_idx), _label(task, row[label_idx])))
            except ValueError:
                continue  # an unparseable label (e.g. "-" gold labels)
    if not rows:
        raise ValueError(f"{path}: no usable rows for {task.name}")
    return rows


def load_task(task: Task, glue_dir: Optional[str]) -> Tuple[List[Example], Dict[str, List[Example]]]:
    """(train, {dev split name: examples})."""
    if glue_dir:
        folder = Path(glue_dir) / task.folder
        if not folder.is_dir():
            raise FileNotFoundError(f"eval.glue_dir={glue_dir}: no {task.folder}/ folder for task {task.name}")
        return read_tsv(task, folder / "train.tsv"), {
            name: read_tsv(task, folder / tsv) for name, tsv, _ in task.dev_splits
        }
    from datasets import load_dataset

    try:
        ds = load_dataset("nyu-mll/glue", task.name)
    except Exception as err:  # offline, hub unreachable, ...
        raise FileNotFoundError(
            f"cannot load GLUE {task.name} from the Hugging Face Hub ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "offline, set eval.glue_dir to a directory in GLUE's TSV layout (SST-2/train.tsv, SST-2/dev.tsv, ...)"
        ) from None

    # A ClassLabel is mapped by name, so the ids agree with the TSV path whatever order the Hub uses.
    names = getattr(ds["train"].features.get("label"), "names", None) if task.labels else None

    def label(value) -> float:
        return float(task.labels.index(names[value])) if names else float(value)

    def rows(split: str) -> List[Example]:
        return [(tuple(r[c] for c in task.hf_columns), label(r["label"])) for r in ds[split] if r["label"] != -1]

    return rows("train"), {name: rows(hf) for name, _, hf in task.dev_splits}
