"""GLUE harness end to end on two tiny local tasks in GLUE's TSV layout (an SST-2-like
classification task and an STS-B-like regression task), with tiny models saved as Hugging Face
directories: ours (hyperbert, bert, hypermixer) and a stock transformers BERT."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scale_hyper.evaluation import glue, glue_data

REPO = Path(__file__).resolve().parents[1]  # subprocesses import this checkout

POS = ["good", "great", "fine", "nice", "happy", "best"]
NEG = ["bad", "poor", "awful", "sad", "worst", "wrong"]
FILL = ["the", "module", "function", "returns", "a", "value", "and", "file", "list", "object", "this", "is"]


def _sentence(rng, words, k=6, keywords=2):
    out = [rng.choice(FILL) for _ in range(k)]
    for _ in range(keywords):
        out.insert(rng.randrange(len(out) + 1), rng.choice(words))
    return " ".join(out)


def write_tasks(root: Path, n_train: int = 48, n_dev: int = 24) -> Path:
    """Two keyword tasks a tiny model learns in a few epochs (so that a score can be required): SST-2's
    label and STS-B's score (0 or 1, in STS's 0–5 range) say whether the (second) sentence holds two
    words of POS or two of NEG."""
    rng = random.Random(0)
    sst = root / "SST-2"
    sst.mkdir(parents=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            y = i % 2
            rows.append(f"{_sentence(rng, POS if y else NEG)}\t{y}")
        (sst / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    sts = root / "STS-B"
    sts.mkdir()
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = [head]
        for i in range(n):
            a = " ".join(rng.choice(FILL) for _ in range(6))
            y = i % 2
            b = _sentence(rng, POS if y else NEG)
            rows.append(f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\t{a}\t{b}\t{float(y):.3f}")
        (sts / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


def tiny_hf_dir(path: Path, mixer: str) -> Path:
    """A tiny randomly initialised MLM saved as a Hugging Face directory, with a WordPiece tokenizer."""
    from scale_hyper.data.tokenizer import tokenizer_files
    from scale_hyper.models import ModelConfig, build_model
    from scale_hyper.prepare.wordpiece import train_wordpiece

    texts = [" ".join(POS + NEG + FILL)] * 20
    tok = train_wordpiece(texts, 128)
    path.mkdir(parents=True)
    for name, data in tokenizer_files(tok, 64).items():
        (path / name).write_bytes(data)
    torch.manual_seed(0)
    if mixer == "stock-bert":
        from transformers import BertConfig, BertForMaskedLM

        cfg = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)  # fmt: skip
        BertForMaskedLM(cfg).save_pretrained(path)
        return path
    mc = ModelConfig(mixer=mixer, vocab_size=tok.get_vocab_size(), hidden_size=32, num_layers=2, num_heads=2, ffn_size=64,
                     max_position=64, hyper_width=16, hyper_heads=2, mixer_width=32)  # fmt: skip
    build_model(mc, task="mlm").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("glue"))


def test_tsv_reader_parses_glue_layouts(tmp_path, glue_dir):
    rows = glue_data.read_tsv(glue_data.TASKS["stsb"], glue_dir / "STS-B" / "dev.tsv")
    assert len(rows) == 24 and len(rows[0][0]) == 2 and rows[1][1] == pytest.approx(1.0) and rows[0][1] == 0.0
    (tmp_path / "cola.tsv").write_text("gj04\t1\t\tThe book fell .\ngj04\t0\t*\tBook the fell .\n")
    assert glue_data.read_tsv(glue_data.TASKS["cola"], tmp_path / "cola.tsv") == [
        (("The book fell .",), 1.0),
        (("Book the fell .",), 0.0),
    ]
    (tmp_path / "rte.tsv").write_text(
        "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tnot_entailment\n1\tc\td\tentailment\n"
    )
    assert [y for _, y in glue_data.read_tsv(glue_data.TASKS["rte"], tmp_path / "rte.tsv")] == [1.0, 0.0]


def test_hub_path_gives_what_the_tsv_path_gives(tmp_path, monkeypatch):
    """The `datasets` path (nyu-mll/glue), with the Hub replaced by an in-memory DatasetDict in its
    schema, because the Hub cannot be reached here: same texts and label ids as GLUE's TSV files."""
    import datasets

    premises, hypotheses, gold = ["a cat sat", "it rains", "x is y"], ["a cat", "it is dry", "y is x"], [0, 2, 1]
    names = ["entailment", "neutral", "contradiction"]  # the Hub's ClassLabel for MNLI
    features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=names), "idx": datasets.Value("int32")})  # fmt: skip
    split = datasets.Dataset.from_dict(
        {"premise": premises, "hypothesis": hypotheses, "label": gold, "idx": [0, 1, 2]}, features=features
    )
    unlabeled = datasets.Dataset.from_dict(
        {"premise": ["p"], "hypothesis": ["h"], "label": [-1], "idx": [0]}, features=features
    )  # test splits carry label -1
    hub = datasets.DatasetDict({"train": split, "validation_matched": split, "validation_mismatched": unlabeled})
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or hub)
    train, devs = glue_data.load_task(glue_data.TASKS["mnli"], None)
    assert calls == [("nyu-mll/glue", "mnli")]
    (tmp_path / "MNLI").mkdir()
    rows = zip(premises, hypotheses, gold, strict=True)
    tsv = ["sentence1\tsentence2\tgold_label"] + [f"{p}\t{h}\t{names[g]}" for p, h, g in rows]
    (tmp_path / "MNLI" / "train.tsv").write_text("\n".join(tsv) + "\n")
    assert train == glue_data.read_tsv(glue_data.TASKS["mnli"], tmp_path / "MNLI" / "train.tsv")
    assert devs["m"] == train and devs["mm"] == []


def test_protocol_median_over_seeds_best_lr():
    task = glue.TASKS["sst2"]
    runs = [
        {"lr": lr, "seed": s, "score": sc, "dev": {"dev": {"accuracy": sc}}}
        for lr, s, sc in [
            (1e-4, 1, 0.9),
            (1e-4, 2, 0.5),
            (1e-4, 3, 0.6),
            (5e-5, 1, 0.7),
            (5e-5, 2, 0.7),
            (5e-5, 3, 0.1),
        ]
    ]
    s = glue.summarise(task, runs)
    assert s["best_lr"] == 5e-5 and s["score"] == pytest.approx(0.7)  # medians 0.6 vs 0.7; means would pick 1e-4
    assert s["median_by_lr"][1e-4] == pytest.approx(0.6)


def test_glue_end_to_end_hyperbert(tmp_path, glue_dir):
    model_dir = tiny_hf_dir(tmp_path / "model", "hyperbert")
    out = tmp_path / "out"
    args = [f"eval.glue_dir={glue_dir}", "eval.lrs=[3e-3]", "eval.seeds=[1,2]", "eval.batch_size=8", "eval.epochs=8",
            "tracking.enabled=false"]  # fmt: skip
    res = glue.run_glue(str(model_dir), ["sst2", "stsb"], args, out=str(out), small_task_epochs=8, log=lambda *_: None)
    by_task = {s["task"]: s for s in res["tasks"]}
    for runs in res["runs"].values():
        assert len(runs) == 2
        for r in runs:
            assert r["train_loss"][-1] < r["train_loss"][0], r["train_loss"]  # it learns
    # Learned, not chance: 24 dev examples put chance near accuracy 0.5 ± 0.1 and Pearson 0 ± 0.2
    # (measured here: accuracy ≥ 0.9, Pearson 0.76 and 0.87 for the two seeds).
    assert by_task["sst2"]["score"] >= 0.75 and by_task["sst2"]["metrics"]["accuracy"] == by_task["sst2"]["score"]
    assert by_task["stsb"]["metrics"]["pearson"] >= 0.5, by_task["stsb"]
    assert by_task["stsb"]["score"] == pytest.approx(
        (by_task["stsb"]["metrics"]["pearson"] + by_task["stsb"]["metrics"]["spearman"]) / 2
    )  # GLUE's STS-B score: the mean of the two correlations
    assert by_task["stsb"]["seeds"] == 2 and res["runs"]["stsb"][0]["epochs"] == 8
    summary = (out / "summary.md").read_text()
    assert "| sst2 | stsb | avg |" in summary and f"{100 * res['glue_avg']:.1f}" in summary
    assert json.loads((out / "results.json").read_text())["glue_avg"] == pytest.approx(res["glue_avg"])


@pytest.mark.parametrize("mixer", ["bert", "hypermixer", "stock-bert"])
def test_glue_runs_for_other_mixers_and_stock_bert(tmp_path, glue_dir, mixer):
    model_dir = tiny_hf_dir(tmp_path / "model", mixer)
    args = [f"eval.glue_dir={glue_dir}", "eval.lrs=[3e-3]", "eval.seeds=[1]", "eval.batch_size=8", "eval.epochs=5",
            "tracking.enabled=false"]  # fmt: skip
    res = glue.run_glue(str(model_dir), ["sst2"], args, out=str(tmp_path / "out"), log=lambda *_: None)
    (r,) = res["runs"]["sst2"]
    assert r["train_loss"][-1] < r["train_loss"][0], r["train_loss"]
    assert res["glue_avg"] == r["score"] >= 0.75, res  # learned (chance: 0.5); one task: the average is its score


def test_glue_cli_logs_to_mlflow(tmp_path, glue_dir):
    model_dir = tiny_hf_dir(tmp_path / "model", "hyperbert")
    db = tmp_path / "mlflow.db"
    proc = subprocess.run(
        [sys.executable, "-m", "scale_hyper", "glue", str(model_dir), "sst2", f"eval.glue_dir={glue_dir}", "eval.lrs=[3e-3]",
         "eval.seeds=[1]", "eval.epochs=1", "eval.batch_size=8", f"tracking.uri=sqlite:///{db}", "--max-train", "16",
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| model | sst2 | avg |" in proc.stdout and "logged to MLflow run" in proc.stdout
    from mlflow import MlflowClient

    run_id = proc.stdout.split("logged to MLflow run ")[1].split()[0]
    run = MlflowClient(tracking_uri=f"sqlite:///{db}").get_run(run_id)
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert run.data.metrics["glue_avg"] == pytest.approx(results["glue_avg"])  # what the run computed, logged
    assert run.data.metrics["glue_sst2"] == pytest.approx(results["glue_avg"])  # one task: the average is its score
