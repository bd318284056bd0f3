"""Hugging Face integration: config, save/load round trip, Auto classes (local and trust_remote_code
in a process where scale_hyper cannot be imported), and pipeline("fill-mask")."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from tiny_models import tiny_config
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    PreTrainedTokenizerFast,
    pipeline,
)

from scale_hyper.models import (
    MIXERS,
    ModelConfig,
    ScaleHyperConfig,
    ScaleHyperForMaskedLM,
    ScaleHyperForSequenceClassification,
    ScaleHyperModel,
    build_model,
    register_auto_classes,
)

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "ran", "big", "small"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny(mixer: str = "hyperbert", **overrides) -> ModelConfig:
    return tiny_config(mixer, **{"vocab_size": len(SPECIALS) + len(WORDS), "max_position": 32, **overrides})


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built locally with the `tokenizers` library (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def sample_inputs():
    ids = torch.tensor([[2, 5, 6, 4, 8, 3], [2, 7, 9, 3, 0, 0]])
    mask = (ids != 0).long()
    return ids, mask


# --- config ---


def test_config_carries_every_model_config_field_with_the_same_default():
    hf = ScaleHyperConfig()
    for field in dataclasses.fields(ModelConfig):
        assert getattr(hf, field.name) == field.default, field.name


def test_config_round_trips_model_config_and_validates():
    mc = tiny("hyla", hyla_chunk=7, dropout=0.0)
    hf = ScaleHyperConfig.from_model_config(mc, num_labels=3)
    assert hf.model_type == "scale_hyper"
    assert hf.to_model_config() == mc
    assert hf.num_labels == 3
    assert hf.num_hidden_layers == mc.num_layers  # standard HF names map onto ours
    with pytest.raises(Exception, match="mixer"):
        ScaleHyperConfig(mixer="transformer")


def test_register_auto_classes_is_idempotent():
    register_auto_classes()
    register_auto_classes()
    assert isinstance(AutoConfig.for_model("scale_hyper"), ScaleHyperConfig)


# --- save / load ---


@pytest.mark.parametrize("mixer", MIXERS)
def test_save_pretrained_round_trip_is_exact(tmp_path, mixer):
    torch.manual_seed(0)
    model = build_model(tiny(mixer), task="mlm").eval()
    model.save_pretrained(tmp_path)
    loaded = ScaleHyperForMaskedLM.from_pretrained(tmp_path).eval()

    assert loaded.config.to_model_config() == model.config.to_model_config()
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    ids, mask = sample_inputs()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, loaded(ids, attention_mask=mask).logits)

    saved = json.loads((tmp_path / "config.json").read_text())
    assert set(saved["auto_map"]) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForMaskedLM",
        "AutoModelForSequenceClassification",
    }
    for name in ("modeling_scale_hyper.py", "configuration_scale_hyper.py", "model_config.py", "encoder.py"):
        assert (tmp_path / name).exists(), name


def test_auto_classes_load_without_trust_remote_code_after_importing_models(tmp_path):
    """`import scale_hyper.models` (done above) registers the Auto classes; plain `import scale_hyper`
    does not any more (it stays light for the CLI: tests/test_cli_imports.py)."""
    torch.manual_seed(0)
    model = build_model(tiny("hyperbert"), task="mlm").eval()
    model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is ScaleHyperConfig
    mlm = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(mlm) is ScaleHyperForMaskedLM
    assert type(AutoModel.from_pretrained(tmp_path)) is ScaleHyperModel
    cls = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert type(cls) is ScaleHyperForSequenceClassification
    # The encoder of the MLM checkpoint is reused by the classifier.
    assert torch.equal(cls.model.encoder.hypernet.out.weight, model.model.encoder.hypernet.out.weight)
    ids, mask = sample_inputs()
    with torch.no_grad():
        assert torch.equal(mlm(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys

    class RefuseScaleHyper:
        # scale_hyper may be pip-installed (editable): refuse it, as on a machine without it.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "scale_hyper":
                raise ImportError(f"{name} is not importable in this test")
            return None

    sys.meta_path.insert(0, RefuseScaleHyper())
    try:
        import scale_hyper  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("scale_hyper must not be importable here")
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

    path = sys.argv[1]
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    mlm = AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(path, trust_remote_code=True)
    cls = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True, num_labels=2)
    ids = torch.tensor(json.loads(sys.argv[2]))
    with torch.no_grad():
        logits = mlm(ids, attention_mask=(ids != 0).long()).logits
    print(json.dumps({
        "config": type(config).__name__,
        "mixer": config.mixer,
        "classes": [type(m).__name__ for m in (mlm, base, cls)],
        "modules": [type(m).__module__ for m in (mlm, base, cls)],
        "logits": logits.double().tolist(),
    }))
    """
)


def test_trust_remote_code_loads_where_scale_hyper_is_not_importable(tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny("hyperbert"), task="mlm").eval()
    export = tmp_path / "export"
    model.save_pretrained(export)
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_SCRIPT)
    ids, mask = sample_inputs()

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1")  # own modules cache
    run = subprocess.run(
        [sys.executable, "-I", str(script), str(export), json.dumps(ids.tolist())],
        cwd=tmp_path,  # not the repo; -I also keeps cwd and PYTHONPATH off sys.path
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["config"] == "ScaleHyperConfig"
    assert result["mixer"] == "hyperbert"
    assert result["classes"] == ["ScaleHyperForMaskedLM", "ScaleHyperModel", "ScaleHyperForSequenceClassification"]
    assert all(m.startswith("transformers_modules.") for m in result["modules"])
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits.double()
    torch.testing.assert_close(torch.tensor(result["logits"], dtype=torch.float64), want, rtol=0, atol=1e-6)


# --- pipeline ---


def test_fill_mask_pipeline(tmp_path):
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    model = build_model(tiny("hyperbert", vocab_size=len(tokenizer)), task="mlm").eval()
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer)
    predictions = fill("the cat [MASK] on the mat", top_k=3)
    assert len(predictions) == 3
    assert all(p["token_str"] in tokenizer.get_vocab() for p in predictions)
    # The pipeline's answer is the model's own: softmax of the logits at the [MASK] position, top 3.
    enc = tokenizer("the cat [MASK] on the mat", return_tensors="pt")
    at = enc["input_ids"][0].tolist().index(tokenizer.mask_token_id)
    with torch.no_grad():
        probs = model(**enc).logits[0, at].softmax(-1)
    top = probs.topk(3)
    assert [p["token"] for p in predictions] == top.indices.tolist()
    assert [p["score"] for p in predictions] == pytest.approx(top.values.tolist(), abs=1e-6)
    total = sum(p["score"] for p in fill("the cat [MASK] on the mat", top_k=len(tokenizer)))
    assert total == pytest.approx(1.0, abs=1e-5)  # a distribution over the whole vocabulary

    # The same from a saved folder, resolved through the Auto classes.
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    from_disk = pipeline("fill-mask", model=str(tmp_path))
    assert [p["token"] for p in from_disk("the cat [MASK] on the mat", top_k=3)] == [p["token"] for p in predictions]
