"""Layer-input offload under full recomputation (distattn.model.offload).

On CPU the offloader is forced (`force=True`): each layer input is cloned into a
separate host buffer and its own storage is really resized to 0, then restored
when the backward recomputes the layer. The same ops run in the same order as
recompute=full without offload, so loss and gradients are compared bit for bit
(torch.equal, tolerance 0).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distattn.model.offload import LayerInputOffload
from distattn.model.recompute import apply_recompute

TINY = ["model.num_layers=3", "model.hidden_size=32", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=64", "model.vocab_size=64",
        "data.seq_len=96", "attention.scheme=local"]


def _steps(extra: list[str], offload: bool, steps: int = 2):
    """`steps` forward/backward passes (an SGD update between them) under recompute=full.

    Returns per step: the loss, every parameter's gradient, each layer's input as the
    layer saw it and, with offload, what the offloader held after the forward.
    """
    import distattn
    from distattn.config import load_config
    from distattn.model.attention import AttentionContext
    from distattn.model.gpt import build_gpt
    cfg = load_config(None, TINY + extra)
    ctx = AttentionContext(group=dist.group.WORLD, softmax_scheme=distattn.get_scheme("local"),
                           rope_base=cfg.model.rope_base)
    model = build_gpt(cfg.model, ctx, cfg.data.seq_len, seed=7)  # the config's recompute=none
    off = LayerInputOffload(force=True) if offload else None
    apply_recompute(model, "full", off)
    inputs: list[torch.Tensor] = []
    for layer in model.decoder.layers:
        layer.register_forward_pre_hook(
            lambda m, a, kw: inputs.append(kw["hidden_states"].detach().clone()), with_kwargs=True)
    n = cfg.data.seq_len
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.model.vocab_size, (n,), generator=g)
    labels = torch.randint(0, cfg.model.vocab_size, (n,), generator=g)
    pos = torch.arange(n)
    ctx.set_batch([0, n // 3, n], pos, n)
    out = []
    for _ in range(steps):
        inputs.clear()
        model.zero_grad(set_to_none=True)
        logits = model(tokens[None], pos[None], None)[0]
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        held = [(x.untyped_storage().nbytes(), x.numel() * x.element_size(), host.clone())
                for x, host in off.held()] if off else None
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        left = (len(off.held()), off._pending is None) if off else None
        out.append({"loss": loss.detach(), "grads": grads, "inputs": list(inputs), "held": held,
                    "left": left})
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
    return out


def _compare(ranks, extra):
    base = ranks(1, _steps, extra, False)[0]
    got = ranks(1, _steps, extra, True)[0]
    layers = 3
    for b, o in zip(base, got):
        assert torch.equal(o["loss"], b["loss"])  # bit-identical: the same ops in the same order
        assert b["grads"].keys() == o["grads"].keys()
        for k in b["grads"]:
            assert torch.equal(o["grads"][k], b["grads"][k]), k
        # after the forward: every layer input in a host buffer, all but the last freed on the device
        assert len(o["held"]) == layers
        for i, (nbytes, full, host) in enumerate(o["held"]):
            assert nbytes == (full if i == layers - 1 else 0), (i, nbytes)
            assert torch.equal(host, b["inputs"][i])
        # after the backward: nothing held, nothing pending
        assert o["left"] == (0, True)
    assert not torch.equal(got[0]["loss"], got[1]["loss"])  # the second step really differs


def test_offload_equals_full_recompute(ranks):
    _compare(ranks, [])


def test_offload_with_tiled_mlp(ranks):
    _compare(ranks, ["model.mlp_tile=32"])


@pytest.mark.parametrize("mode", ["selective", "none"])
def test_offload_refused_without_full_recompute(mode):
    with pytest.raises(ValueError) as e:
        apply_recompute(torch.nn.Module(), mode, LayerInputOffload())
    msg = str(e.value)
    assert "model.offload_activations=true" in msg and f"model.recompute={mode}" in msg
    assert "model.recompute=full" in msg


def test_unknown_mode_still_refused_first():
    with pytest.raises(ValueError, match="choose one of"):
        apply_recompute(torch.nn.Module(), "bogus", LayerInputOffload())


def test_cpu_tensors_stay_unless_forced():
    off = LayerInputOffload()
    x = torch.randn(4, 1, 8)
    off.save("a", x)
    off.save("b", torch.randn(4, 1, 8))
    assert off.held() == [] and x.untyped_storage().nbytes() == x.numel() * 4


def test_forced_roundtrip_and_views_kept():
    off = LayerInputOffload(force=True)
    x, y = torch.randn(6, 1, 4), torch.randn(6, 1, 4)
    want = x.clone()
    base = torch.randn(12, 1, 4)
    off.save("x", x)
    off.save("v", base[:6])  # a view into a larger buffer stays where it is
    off.save("y", y)         # frees x now that its copy is complete
    assert x.untyped_storage().nbytes() == 0
    assert [h is w for (h, _), w in zip(off.held(), [x, y], strict=True)] == [True, True]
    v = x._version
    off.restore("y")         # the backward: y never left; x is prefetched
    assert torch.equal(x, want) and x._version > v  # the copy back bumps the version
    off.restore("x")
    assert off.held() == []


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, hidden_states):
        return torch.tanh(self.lin(hidden_states)) + hidden_states


def _toy(offload):
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.decoder = torch.nn.Module()
    model.decoder.layers = torch.nn.ModuleList(_Toy() for _ in range(3))
    return apply_recompute(model, "full", offload)


def test_positional_input_offloaded_and_exact():
    grads = []
    for off in (None, LayerInputOffload(force=True)):
        model = _toy(off)
        h = x0 = torch.randn(5, 1, 8, requires_grad=True)
        for layer in model.decoder.layers:
            h = layer(h)  # positionally, unlike megatron's TransformerBlock
        if off:
            assert [x.untyped_storage().nbytes() for x, _ in off.held()] == [0, 0, 5 * 8 * 4]
        h.square().sum().backward()
        grads.append([x0.grad] + [p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_input_saved_outside_the_checkpoint_raises():
    """A layer input saved by a node outside the checkpoint: its backward raises, never reads freed memory."""
    model = _toy(LayerInputOffload(force=True))
    h0 = torch.randn(5, 1, 8, requires_grad=True)
    h1 = model.decoder.layers[0](h0)
    s = (h1 * h1).sum()  # mul saves h1, the input of layer 1, offloaded and freed below
    h3 = model.decoder.layers[2](model.decoder.layers[1](h1))
    loss = h3.sum() + s
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
