"""Model zoo behaviour: padding invariance, the shared hypernetwork, reference implementations,
long-sequence HYLA, training, pre/post-LN, activation checkpointing and the ZeRO-3 module rule."""

import copy
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_config

from scale_hyper.models import ModelConfig, build_model
from scale_hyper.models.hypermixing import hyper_mixing
from scale_hyper.models.mixer_hyla import HYLA_EPS, HylaMixer
from scale_hyper.models.mixer_hyper import HyperNetwork
from scale_hyper.models.mixer_hypermixer import HyperMixerMixer

VOCAB = 50


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # Tiny tensors: intra-op threads cost more than they save (and crawl on a loaded 2-core box).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny(mixer: str = "hyperbert", **overrides) -> ModelConfig:
    return tiny_config(mixer, **{"vocab_size": VOCAB, "hyla_chunk": 4, **overrides})


# Every mixer, and HyperBERT under each of its switches (O1-O8) and pre-LN.
VARIANTS = {
    "bert": tiny("bert"),
    "hypermixer": tiny("hypermixer"),
    "hypermixer-tied-sqrt": tiny("hypermixer", tied_weights=True, mixer_scale="sqrt"),
    "hyla": tiny("hyla"),
    "hyperbert": tiny("hyperbert"),
    "hyperbert-hidden": tiny("hyperbert", hyper_condition="hidden"),
    "hyperbert-layer": tiny("hyperbert", hyper_condition="layer"),
    "hyperbert-linear": tiny("hyperbert", hyper_mlp="linear"),
    "hyperbert-causal": tiny("hyperbert", hyper_decoder="causal"),
    "hyperbert-cross": tiny("hyperbert", hyper_decoder="cross"),
    "hyperbert-tied": tiny("hyperbert", tied_weights=True),
    "hyperbert-sqrt": tiny("hyperbert", mixer_scale="sqrt"),
    "hyperbert-mean": tiny("hyperbert", mixer_scale="mean"),
    "hyperbert-1head": tiny("hyperbert", mixer_heads=1),
    "hyperbert-inputnorm": tiny("hyperbert", hyper_input_norm=True),
    "hyperbert-sinusoidal": tiny("hyperbert", hyper_position="sinusoidal"),
    "hyperbert-rotary": tiny("hyperbert", hyper_position="rotary"),
    "hyperbert-pre": tiny("hyperbert", norm_position="pre"),
    "bert-pre": tiny("bert", norm_position="pre"),
    "hyla-pre": tiny("hyla", norm_position="pre"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_padding_never_changes_real_positions(name):
    torch.manual_seed(0)
    model = build_model(VARIANTS[name], task="base").double().eval()
    ids = torch.randint(5, VOCAB, (2, 7))
    lengths = torch.tensor([7, 4])
    mask = (torch.arange(7)[None] < lengths[:, None]).long()

    # Extra padding with arbitrary ids: only the mask may decide what is padding.
    padded_ids = torch.cat([ids, torch.randint(0, VOCAB, (2, 5))], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        short = model(ids, attention_mask=mask).last_hidden_state
        long = model(padded_ids, attention_mask=padded_mask).last_hidden_state
        alone = model(ids[1:, :4]).last_hidden_state  # the short sequence with no padding at all
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(long[b, :n], short[b, :n], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(short[1, :4], alone[0], rtol=1e-10, atol=1e-10)


def test_shared_hypernetwork_gets_gradients_from_every_layer():
    torch.manual_seed(0)
    mc = tiny("hyperbert", num_layers=3)
    model = build_model(mc, task="mlm")
    hypernet = model.model.encoder.hypernet
    generated = []

    def keep(module, args, output):
        for w in output:
            w.retain_grad()
        generated.append(output)

    handle = hypernet.register_forward_hook(keep)
    ids = torch.randint(5, VOCAB, (2, 9))
    model(ids, labels=ids).loss.backward()
    handle.remove()

    assert len(generated) == mc.num_layers  # one call per layer, all to the same module
    for layer, (w1, w2) in enumerate(generated):
        assert w1.grad is not None and w1.grad.abs().sum() > 0, f"no gradient from layer {layer} (W1)"
        assert w2.grad is not None and w2.grad.abs().sum() > 0, f"no gradient from layer {layer} (W2)"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hypernet.parameters())

    # Owned once: by the encoder, never by a block.
    assert model.shared_modules() == [hypernet]
    assert not any(isinstance(m, HyperNetwork) for m in model.model.encoder.layers.modules())
    keys = [k for k in model.state_dict() if "hypernet" in k]
    assert keys and all(k.startswith("model.encoder.hypernet.") for k in keys)
    assert not any(".layers." in k for k in keys)
    assert len(dict(model.named_parameters(remove_duplicate=False))) == len(dict(model.named_parameters()))


def test_only_hyperbert_has_shared_modules():
    for mixer in ("bert", "hypermixer", "hyla"):
        assert build_model(tiny(mixer), task="mlm").shared_modules() == []


@pytest.mark.parametrize("mixer", ["bert", "hypermixer", "hyla"])
@pytest.mark.parametrize("order,expected", [("cycle", [0, 1, 0, 1, 0]), ("stretch", [0, 0, 0, 1, 1])])
def test_cross_layer_shared_mixers(mixer, order, expected):
    """model.share_mixers=k: L layers use k mixers (owned once by the encoder); every one learns."""
    torch.manual_seed(0)
    own = build_model(tiny(mixer, num_layers=5), task="mlm")
    shared = build_model(tiny(mixer, num_layers=5, share_mixers=2, share_order=order), task="mlm")
    encoder = shared.model.encoder
    assert encoder.mixer_of_layer == expected
    assert [encoder.mixer(i) for i in range(5)] == [encoder.shared_mixers[j] for j in expected]
    assert shared.shared_modules() == list(encoder.shared_mixers)
    one_mixer = sum(p.numel() for p in own.model.encoder.layers[0].mixer.parameters())
    assert sum(p.numel() for p in own.parameters()) - sum(p.numel() for p in shared.parameters()) == 3 * one_mixer
    assert sum(1 for k in shared.state_dict() if ".mixer." in k) == 0  # stored once, under shared_mixers
    ids = torch.randint(5, VOCAB, (2, 8))
    shared(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.shared_mixers.parameters())


def test_share_mixers_bounds():
    with pytest.raises(ValueError, match="share_mixers=3 must be between 0"):
        tiny("bert", num_layers=2, share_mixers=3)


# --- independent slow references (float64, explicit loops) ---


def layer_norm_ref(y, norm):
    out = torch.empty_like(y)
    for b in range(y.shape[0]):
        for n in range(y.shape[1]):
            row = y[b, n]
            mean = row.mean()
            var = ((row - mean) ** 2).mean()
            out[b, n] = (row - mean) / math.sqrt(float(var) + norm.eps) * norm.weight.detach() + norm.bias.detach()
    return out


def hyper_mixing_ref(x, w1, w2, heads, mask, activation=True, scale="none"):
    """Y_k[n, c] = Σ_p W2_k[n, p] · act(Σ_m W1_k[m, p] X_k[m, c]), pads dropped, per head k."""
    batch, tokens, d = x.shape
    width = w1.shape[-1]
    c_size, p_size = d // heads, width // heads
    y = torch.zeros_like(x)
    for b in range(batch):
        real = [n for n in range(tokens) if mask is None or mask[b, n]]
        count = len(real)
        for k in range(heads):
            for c in range(c_size):
                hidden = []
                for p in range(p_size):
                    total = sum(w1[b, m, k * p_size + p] * x[b, m, k * c_size + c] for m in real)
                    if scale == "sqrt":
                        total = total / math.sqrt(count)
                    elif scale == "mean":
                        total = total / count
                    hidden.append(F.gelu(total) if activation else total)
                for n in real:
                    y[b, n, k * c_size + c] = sum(w2[b, n, k * p_size + p] * hidden[p] for p in range(p_size))
    return y


def random_mask():
    return torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize(
    "activation,scale,heads,masked",
    [(True, "none", 2, True), (False, "none", 2, True), (True, "sqrt", 1, True), (True, "mean", 4, False)],
)
def test_hyper_mixing_matches_loop_reference(activation, scale, heads, masked):
    torch.manual_seed(0)
    x, w1, w2 = (
        torch.randn(2, 6, 8, dtype=torch.float64),
        torch.randn(2, 6, 12, dtype=torch.float64),
        torch.randn(2, 6, 12, dtype=torch.float64),
    )
    mask = random_mask() if masked else None
    got = hyper_mixing(x, w1, w2, heads, mask, activation=activation, scale=scale)
    want = hyper_mixing_ref(x, w1, w2, heads, mask, activation, scale)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("tied", [False, True])
def test_hypermixer_mixer_matches_reference(tied):
    torch.manual_seed(0)
    mc = tiny("hypermixer", hidden_size=8, num_heads=2, mixer_width=12, tied_weights=tied)
    mixer = HyperMixerMixer(mc).double()
    with torch.no_grad():  # non-trivial LayerNorm and biases
        for p in mixer.parameters():
            p.normal_()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    mask = random_mask()

    # Hypernetwork input x·√d + sinusoidal PE, per head a token-wise MLP, written with loops.
    d, heads, c = 8, 2, 4
    pe = torch.zeros(6, d, dtype=torch.float64)
    for pos in range(6):
        for i in range(0, d, 2):
            angle = pos / (10000 ** (i / d))
            pe[pos, i], pe[pos, i + 1] = math.sin(angle), math.cos(angle)
    hyper_in = x * math.sqrt(d) + pe

    def head_mlp(net, token):
        rows = []
        for k in range(heads):
            group = token[k * c : (k + 1) * c]
            hidden = F.gelu(group @ net.fc1.weight[k] + net.fc1.bias[k])
            rows.append(hidden @ net.fc2.weight[k] + net.fc2.bias[k])
        return torch.cat(rows)

    with torch.no_grad():
        w1 = torch.stack([torch.stack([head_mlp(mixer.w1_net, hyper_in[b, n]) for n in range(6)]) for b in range(2)])
        w2 = (
            w1
            if tied
            else torch.stack(
                [torch.stack([head_mlp(mixer.w2_net, hyper_in[b, n]) for n in range(6)]) for b in range(2)]
            )
        )
        want = layer_norm_ref(hyper_mixing_ref(x, w1, w2, heads, mask), mixer.norm)
        got = mixer(x, mask)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tied_weights": True}, {"hyper_mlp": "linear", "mixer_scale": "mean"}, {"mixer_heads": 1}],
)
def test_hyperbert_mixer_matches_reference(overrides):
    torch.manual_seed(0)
    model = build_model(tiny("hyperbert", **overrides), task="base").double().eval()
    encoder = model.encoder
    block = encoder.layers[1]
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    mask = random_mask()
    with torch.no_grad():
        got = block.mixer(x, mask, hypernet=encoder.hypernet, layer=1)
        w1, w2 = encoder.hypernet(x, 1, mask)
    mc = model.config.to_model_config()
    if mc.tied_weights:
        assert w1 is w2
    want = layer_norm_ref(
        hyper_mixing_ref(x, w1, w2, mc.effective_mixer_heads, mask, mc.hyper_mlp == "mlp", mc.mixer_scale),
        block.mixer.norm,
    )
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def hyla_ref(mixer, x, mask):
    """HYLA with a loop over every (query, key) pair and head, float64."""
    batch, tokens, d = x.shape
    heads = mixer.heads
    dh = d // heads
    qkv = x @ mixer.qkv.weight.T + mixer.qkv.bias
    q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
    y = torch.zeros_like(x)
    for b in range(batch):
        for i in range(tokens):
            z = torch.zeros(heads, dh, dtype=x.dtype)
            for j in range(tokens):
                if mask is not None and not mask[b, j]:
                    continue
                s = [
                    float(q[b, i, h * dh : (h + 1) * dh] @ k[b, j, h * dh : (h + 1) * dh]) / math.sqrt(dh)
                    for h in range(heads)
                ]
                rms = math.sqrt(sum(si * si for si in s) / heads + HYLA_EPS)
                a = [si / rms for si in s]
                r = torch.relu(sum(a[h] * v[b, j, h * dh : (h + 1) * dh] for h in range(heads)))
                for h in range(heads):
                    z[h] += a[h] * r
            y[b, i] = mixer.out.weight @ z.flatten() + mixer.out.bias
    return y


@pytest.mark.parametrize("masked", [True, False])
def test_hyla_matches_loop_reference(masked):
    torch.manual_seed(0)
    mixer = HylaMixer(tiny("hyla", hidden_size=8, num_heads=2, hyla_chunk=4)).double().eval()  # no dropout on a
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    mask = random_mask() if masked else None
    with torch.no_grad():
        got, want = mixer(x, mask), hyla_ref(mixer, x, mask)
    if mask is not None:  # pad queries' own outputs are unspecified (their q is zeroed)
        got, want = got[mask], want[mask]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_hyla_chunked_checkpointed_gradients_match_unchunked():
    torch.manual_seed(0)
    # dropout=0: chunks draw their dropout masks separately, so only then are the two comparable
    chunked = HylaMixer(tiny("hyla", hidden_size=8, num_heads=2, hyla_chunk=2, dropout=0.0)).double()
    whole = copy.deepcopy(chunked)
    whole.chunk = 1000
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    grads = []
    for mixer in (chunked, whole):
        mixer(x, mask).square().sum().backward()
        grads.append([p.grad for p in mixer.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_hyla_forward_backward_at_512_tokens():
    torch.manual_seed(0)
    mc = tiny("hyla", hidden_size=32, num_heads=4, num_layers=1, ffn_size=64, max_position=512, hyla_chunk=128)
    model = build_model(mc, task="mlm")
    ids = torch.randint(5, VOCAB, (2, 512))
    mask = torch.ones(2, 512, dtype=torch.long)
    mask[1, 300:] = 0
    loss = model(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["bert", "bert-pre", "hypermixer", "hyla", "hyla-pre", "hyperbert", "hyperbert-pre"])
def test_every_mixer_trains(name):
    torch.manual_seed(0)
    model = build_model(VARIANTS[name], task="mlm")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(5, VOCAB, (4, 12))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    labels = torch.where(mask.bool(), ids, -100)
    losses = []
    for _ in range(20):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_static_hypernetwork_rejects_rotary_only_positions():
    with pytest.raises(ValueError, match="rotary"):
        build_model(tiny("hyperbert", hyper_condition="layer", hyper_position="rotary"))


def test_hidden_states_and_tuple_outputs():
    model = build_model(tiny("hyperbert", norm_position="pre"), task="mlm").eval()
    ids = torch.randint(5, VOCAB, (2, 6))
    with torch.no_grad():
        out = model(ids, labels=ids, output_hidden_states=True)
        loss, logits, hidden = model(ids, labels=ids, output_hidden_states=True, return_dict=False)
    assert len(out.hidden_states) == 1 + model.config.num_layers  # embeddings + every block
    torch.testing.assert_close(loss, out.loss)
    torch.testing.assert_close(logits, out.logits)
    assert len(hidden) == len(out.hidden_states)


def test_pre_and_post_ln_structure():
    post = build_model(tiny("bert"), task="base")
    pre = build_model(tiny("bert", norm_position="pre"), task="base")
    assert post.encoder.final_norm is None
    assert pre.encoder.final_norm is not None


@pytest.mark.parametrize("name", ["bert", "hypermixer", "hyla", "hyperbert", "hyperbert-pre"])
def test_activation_checkpointing_gives_identical_gradients(name):
    torch.manual_seed(0)
    plain = build_model(VARIANTS[name], task="mlm").double().train()  # dropout on: RNG must replay too
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_activation_checkpointing(True)
    ids = torch.randint(5, VOCAB, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-10, atol=1e-12, msg=key)


def test_sparse_logits_match_full_logits():
    torch.manual_seed(0)
    model = build_model(tiny("hyperbert"), task="mlm").eval()
    ids = torch.randint(5, VOCAB, (2, 8))
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 5], labels[1, 6] = 7, 8, 9
    with torch.no_grad():
        full = model(ids, labels=labels)
        sparse = model(ids, labels=labels, sparse_logits=True)
    assert full.logits.shape == (2, 8, VOCAB)
    assert sparse.logits.shape == (3, VOCAB)
    torch.testing.assert_close(sparse.logits, full.logits[labels != -100])
    torch.testing.assert_close(sparse.loss, full.loss)


def test_decoder_is_tied_to_word_embeddings():
    model = build_model(tiny("bert"), task="mlm").eval()
    keys = list(model.state_dict())
    assert sum(1 for k in keys if k.endswith("word_embeddings.weight")) == 1
    assert not any("decoder" in k for k in keys)
    ids = torch.randint(5, VOCAB, (1, 6))
    with torch.no_grad():
        before = model(ids).logits
        model.model.embeddings.word_embeddings.weight[3] += 1.0  # not in the input: only the decoder sees it
        after = model(ids).logits
    assert not torch.allclose(before[..., 3], after[..., 3])
    torch.testing.assert_close(before[..., 4], after[..., 4])


@pytest.mark.parametrize(
    "num_labels,labels,expected",
    [
        (1, torch.tensor([0.5, -1.0]), "mse"),
        (3, torch.tensor([0, 2]), "ce"),
        (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), "bce"),
    ],
)
def test_classification_problem_types(num_labels, labels, expected):
    torch.manual_seed(0)
    model = build_model(tiny("hyperbert"), task="cls", num_labels=num_labels).eval()
    ids = torch.randint(5, VOCAB, (2, 8))
    with torch.no_grad():
        out = model(ids, labels=labels)
    assert out.logits.shape == (2, num_labels)
    if expected == "mse":
        want = F.mse_loss(out.logits.squeeze(-1), labels)
    elif expected == "ce":
        want = F.cross_entropy(out.logits, labels)
    else:
        want = F.binary_cross_entropy_with_logits(out.logits, labels)
    torch.testing.assert_close(out.loss, want)


def simulate_zero3(model):
    """Empty every parameter except while its OWNING module's forward runs, as ZeRO-3 does.

    A parameter used anywhere else (a parent reaching into a child's .weight, a block holding the
    shared hypernetwork's tensors) then hits an empty tensor and fails.
    """
    stored = {p: p.data for p in model.parameters()}

    def release(module, *_):
        for p in module.parameters(recurse=False):
            p.data = torch.empty(0, dtype=p.dtype)

    def gather(module, *_):
        for p in module.parameters(recurse=False):
            p.data = stored[p]

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(gather))
        handles.append(module.register_forward_hook(release))
        release(module)
    return stored, handles


@pytest.mark.parametrize("name", ["bert", "hypermixer", "hyla", "hyperbert", "hyperbert-cross", "hyperbert-pre"])
def test_parameters_only_used_inside_their_owning_module(name):
    torch.manual_seed(0)
    mlm = build_model(VARIANTS[name], task="mlm").eval()
    cls = build_model(VARIANTS[name], task="cls", num_labels=2).eval()
    ids = torch.randint(5, VOCAB, (2, 8))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = 4
    with torch.no_grad():
        want = (mlm(ids, labels=labels, sparse_logits=True).logits, mlm(ids).logits, cls(ids).logits)
        handles = simulate_zero3(mlm)[1] + simulate_zero3(cls)[1]
        got = (mlm(ids, labels=labels, sparse_logits=True).logits, mlm(ids).logits, cls(ids).logits)
    for h in handles:
        h.remove()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
