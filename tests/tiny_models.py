"""The small model geometry the model tests share (fast on CPU, every mixer valid), and torch's own
FLOP count of a training step (the reference the analytic FLOP formula is checked against)."""

from unittest import mock

from scale_hyper.models import ModelConfig


def tiny_config(mixer: str = "hyperbert", **overrides) -> ModelConfig:
    values = dict(
        mixer=mixer, vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, ffn_size=32,
        max_position=64, hyper_width=8, hyper_heads=2, mixer_width=12,
    )  # fmt: skip
    values.update(overrides)
    return ModelConfig(**values).validate()


def counted_flops(mc: ModelConfig, batch: int, seq: int, masked: int) -> tuple:
    """(forward, forward + backward) FLOPs that torch's FlopCounterMode counts for ``mc`` (dropout as
    configured) on ``batch`` × ``seq`` tokens with ``masked`` of them labelled (sparse MLM logits).
    Matmul-like ops only; SDPA in its math form, which the counter sees (its CPU flash kernel it does
    not). Model FLOPs: HYLA's chunk recomputation in backward (activation checkpointing) is off."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from scale_hyper.models import build_model, mixer_hyla

    torch.manual_seed(0)
    model = build_model(mc, task="mlm")
    ids = torch.randint(5, mc.vocab_size, (batch, seq))
    labels = torch.full_like(ids, -100)
    labels.view(-1)[torch.randperm(batch * seq)[:masked]] = 7
    counts = []
    with mock.patch.object(mixer_hyla, "checkpoint", lambda fn, *args, use_reentrant: fn(*args)):
        for backward in (False, True):
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                loss = model(input_ids=ids, labels=labels, sparse_logits=True).loss
                if backward:
                    loss.backward()
            counts.append(counter.get_total_flops())
    return tuple(counts)
