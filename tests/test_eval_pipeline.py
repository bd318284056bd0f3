"""The evaluation verbs on a real (tiny) training run: prepare + `scale-hyper train` for 20 steps,
then `eval` (checkpoint, run dir and HF export agree), `transplant` from the checkpoint, `glue` from
the checkpoint, and `report` over the run's MLflow store."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
COMMON = [
    "data.max_documents=400", "data.vocab_size=512", "data.seq_len=64", "data.sequences_per_shard=128",
    "model.num_layers=2", "train.micro_batch_size=8", "train.global_batch_size=0", "train.log_every=5",
    "train.eval_batches=2", "train.eval_every=10", "deepspeed.precision=fp32", "train.lr=3e-3", "train.max_steps=20",
]  # fmt: skip


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "scale_hyper", *args], cwd=cwd, capture_output=True, text=True, env=env
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    wd = tmp_path_factory.mktemp("evalrun")
    shards, db = f"data.output={wd}/shards", f"tracking.uri=sqlite:///{wd}/mlflow.db"
    p = cli("prepare", *COMMON, shards, cwd=wd)
    assert p.returncode == 0, p.stderr[-3000:]
    p = cli("train", *COMMON, shards, db, f"train.output_dir={wd}/hb", "tracking.run_name=hb", cwd=wd)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return wd


def _loss(stdout: str) -> float:
    m = re.search(r"\|\s*\S+\s*\|\s*([0-9.]+)\s*\|\s*([0-9.]+)\s*\|\s*([0-9.]+)\s*\|", stdout.split("|---")[-1])
    assert m, stdout
    return float(m.group(1))


def test_eval_checkpoint_run_dir_and_export_agree_and_log(trained):
    wd = trained
    ckpt = wd / "hb" / "checkpoints" / "step_20"
    a = cli("eval", str(ckpt), "eval.batches=4", f"tracking.uri=sqlite:///{wd}/mlflow.db", cwd=wd)
    assert a.returncode == 0, a.stderr[-3000:]
    b = cli("eval", str(wd / "hb"), "eval.batches=4", "tracking.enabled=false", cwd=wd)
    c = cli(
        "eval", str(wd / "hb" / "hf"), f"data.output={wd}/shards", "eval.batches=4", "tracking.enabled=false", cwd=wd
    )
    assert b.returncode == 0 and c.returncode == 0, b.stderr[-2000:] + c.stderr[-2000:]
    la, lb, lc = _loss(a.stdout), _loss(b.stdout), _loss(c.stdout)
    assert la == lb and abs(la - lc) < 1e-3 and 2.0 < la < 6.3  # trained: below ln(512)=6.24-ish start
    metrics = [json.loads(x) for x in (wd / "hb" / "metrics.jsonl").read_text().splitlines()]
    first_val = next(m["val_loss"] for m in metrics if "val_loss" in m)
    assert la < first_val  # the eval of the trained model beats the untrained validation loss
    from mlflow import MlflowClient

    state = json.loads((ckpt / "trainer_state.json").read_text())
    run = MlflowClient(tracking_uri=f"sqlite:///{wd}/mlflow.db").get_run(state["mlflow_run_id"])
    assert run.data.metrics["eval/val_loss"] == pytest.approx(la, abs=1e-4)


def test_transplant_from_checkpoint_then_eval(trained):
    wd = trained
    p = cli("transplant", str(wd / "hb"), "--layers", "4", "--out", str(wd / "deep"), cwd=wd)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((wd / "deep" / "config.json").read_text())["num_layers"] == 4
    e = cli("eval", str(wd / "deep"), f"data.output={wd}/shards", "eval.batches=4", "tracking.enabled=false", cwd=wd)
    assert e.returncode == 0, e.stderr[-3000:]
    # Before any continued training the 4-layer transplant already beats the untrained 2-layer model's
    # validation loss (step 0 of the run): it carries the trained weights (a fresh model would not).
    metrics = [json.loads(x) for x in (wd / "hb" / "metrics.jsonl").read_text().splitlines()]
    untrained = next(m["val_loss"] for m in metrics if m.get("step") == 0 and "val_loss" in m)
    assert _loss(e.stdout) < untrained - 0.1, (_loss(e.stdout), untrained)


def test_continue_training_from_a_bert_transplant(trained, tmp_path):
    """transplant 2 -> 4 layers, then `train train.init_from=DIR`: geometry and cross-layer sharing come
    from the directory, training starts from its weights, and resuming the new run ignores init_from."""
    wd, shards = trained, f"data.output={trained}/shards"
    off = "tracking.enabled=false"
    p = cli(
        "train",
        *COMMON,
        shards,
        off,
        "model.mixer=bert",
        "train.max_steps=5",
        f"train.output_dir={tmp_path}/bert",
        cwd=wd,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    p = cli("transplant", str(tmp_path / "bert"), "--layers", "4", "--out", str(tmp_path / "deep"), cwd=wd)
    assert p.returncode == 0, p.stderr[-3000:]
    info = json.loads((tmp_path / "deep" / "transplant.json").read_text())

    args = [*COMMON, shards, off, f"train.init_from={tmp_path}/deep", f"train.output_dir={tmp_path}/cont"]
    p = cli("train", *args, "train.max_steps=4", cwd=wd)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "model.share_mixers: 0 -> 2" in p.stdout and "model.mixer: hyperbert -> bert" in p.stdout
    assert f"initialised from {tmp_path}/deep" in p.stdout
    assert f"{info['total_params']:,} parameters" in p.stdout  # the transplant's budget, sharing kept
    exported = json.loads((tmp_path / "cont" / "hf" / "config.json").read_text())
    assert exported["num_layers"] == 4 and exported["share_mixers"] == 2 and exported["mixer"] == "bert"
    # step 0's validation loss is the transplant's own: the weights really were loaded
    e = cli("eval", str(tmp_path / "deep"), shards, "eval.batches=2", "train.micro_batch_size=8", off, cwd=wd)
    assert e.returncode == 0, e.stderr[-3000:]
    metrics = [json.loads(x) for x in (tmp_path / "cont" / "metrics.jsonl").read_text().splitlines()]
    step0 = next(m["val_loss"] for m in metrics if m.get("step") == 0 and "val_loss" in m)
    assert step0 == pytest.approx(_loss(e.stdout), abs=1e-3)

    p = cli("train", *args, "train.max_steps=6", cwd=wd)  # the run's own checkpoint wins
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "resumed from" in p.stdout and "initialised from" not in p.stdout


def test_init_from_with_another_vocabulary_is_refused(trained, tmp_path):
    wd = trained
    other = [*COMMON, "data.vocab_size=300", f"data.output={tmp_path}/other", "tracking.enabled=false"]
    p = cli("train", *other, f"train.init_from={wd}/hb", f"train.output_dir={tmp_path}/x", cwd=wd)
    assert p.returncode == 2, (p.stdout + p.stderr)[-3000:]
    assert "another vocabulary" in p.stderr and "data.tokenizer=" in p.stderr
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_glue_from_checkpoint_and_report(trained, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_eval_glue import write_tasks

    wd = trained
    glue_dir = write_tasks(tmp_path / "glue")
    g = cli("glue", str(wd / "hb"), "sst2", f"eval.glue_dir={glue_dir}", "eval.lrs=[3e-3]", "eval.seeds=[1]", "eval.epochs=2",
            "eval.batch_size=8", f"tracking.uri=sqlite:///{wd}/mlflow.db", "--out", str(tmp_path / "g"), cwd=wd)  # fmt: skip
    assert g.returncode == 0, g.stderr[-3000:]
    r = cli("report", "scale-hyper", f"tracking.uri=sqlite:///{wd}/mlflow.db", "--out", str(tmp_path / "rep"), cwd=wd)
    assert r.returncode == 0, r.stderr[-3000:]
    row = next(line for line in r.stdout.splitlines() if line.startswith("| hb |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "hyperbert" and cells[4] == "20" and cells[-1] != "–"  # GLUE avg present from the glue run
    assert (tmp_path / "rep" / "val_loss_vs_tokens.png").stat().st_size > 5000


def test_export_and_its_deepspeed_save_dir_work_everywhere_a_run_dir_does(trained, tmp_path):
    """`RUN/checkpoints` (DeepSpeed's save dir, with `latest`) is as good as the run dir or a step dir."""
    wd = trained
    assert (wd / "hb" / "checkpoints" / "latest").is_file()
    p = cli("export", str(wd / "hb" / "checkpoints"), str(tmp_path / "exp"), cwd=wd)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "step_20" in p.stdout and (tmp_path / "exp" / "model.safetensors").is_file()
    e = cli("eval", str(wd / "hb" / "checkpoints"), "eval.batches=2", "tracking.enabled=false", cwd=wd)
    assert e.returncode == 0, e.stderr[-3000:]
    bad = cli("export", str(tmp_path / "nothing"), str(tmp_path / "x"), cwd=wd)
    assert bad.returncode == 2 and bad.stderr.startswith("scale-hyper: error:") and "—" in bad.stderr


def test_an_export_loads_with_plain_transformers_in_a_batch_job(trained):
    """No terminal, no scale_hyper imported: the model with trust_remote_code, the tokenizer with
    the standard classes, no prompt either way."""
    code = (
        "import sys\n"
        "from transformers import AutoModelForMaskedLM, BertTokenizer, PreTrainedTokenizerFast\n"
        f"path = {str(trained / 'hb' / 'hf')!r}\n"
        "tok = PreTrainedTokenizerFast.from_pretrained(path); bert = BertTokenizer.from_pretrained(path)\n"
        "assert tok('the cat')['input_ids'] == bert('the cat')['input_ids']\n"
        "model = AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)\n"
        "assert 'scale_hyper' not in sys.modules; print('ok', type(model).__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", code], cwd=trained, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ok ScaleHyperForMaskedLM" in p.stdout and "[y/N]" not in p.stdout + p.stderr
