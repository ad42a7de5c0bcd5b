"""Tiled output projection + cross-entropy equals the untiled path in loss and both gradients."""
from __future__ import annotations

import pytest
import torch

from distattn.model.tiled_loss import tiled_linear_cross_entropy


def _untiled(h, w, y, s):
    logits = (h @ w.t()).float()
    return (torch.nn.functional.cross_entropy(logits, y, reduction="none") * s).sum()


@pytest.mark.parametrize("n,tile", [(37, 8), (64, 64), (5, 100), (129, 1)])
def test_fp32_equals_untiled(n, tile):
    g = torch.Generator().manual_seed(n)
    h = torch.randn(n, 24, generator=g, requires_grad=True)
    w = torch.randn(50, 24, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (n,), generator=g)
    s = (torch.rand(n, generator=g) > 0.3).float() / n
    ref = _untiled(h, w, y, s)
    ref.backward(torch.tensor(1.7))
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out = tiled_linear_cross_entropy(h, w, y, s, tile)
    out.backward(torch.tensor(1.7))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.grad, gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, gw, rtol=1e-5, atol=1e-6)


def test_bf16_close_to_untiled():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(70, 32, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(64, 32, generator=g) * 0.2).bfloat16().requires_grad_()
    y = torch.randint(0, 64, (70,), generator=g)
    s = torch.full((70,), 1 / 70)
    ref = _untiled(h, w, y, s)
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out = tiled_linear_cross_entropy(h, w, y, s, 16)
    out.backward()
    assert w.grad.dtype == torch.bfloat16 and h.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.float(), gh.float(), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(w.grad.float(), gw.float(), rtol=2e-2, atol=2e-3)


def test_no_grad_inputs_and_bad_shapes():
    h, w = torch.randn(9, 8), torch.randn(11, 8)
    y, s = torch.randint(0, 11, (9,)), torch.ones(9)
    torch.testing.assert_close(tiled_linear_cross_entropy(h, w, y, s, 4), _untiled(h, w, y, s))
    with pytest.raises(ValueError, match="tile must be >= 1"):
        tiled_linear_cross_entropy(h, w, y, s, 0)
    with pytest.raises(ValueError, match=r"weight \[V, H\]"):
        tiled_linear_cross_entropy(h, torch.randn(11, 7), y, s, 4)


def test_peak_memory_holds_one_tile_of_logits():
    """The forward keeps no [T, V] tensor: what it saves is the size of hidden + weight."""
    h = torch.randn(512, 16, requires_grad=True)
    w = torch.randn(2000, 16, requires_grad=True)
    y, s = torch.randint(0, 2000, (512,)), torch.ones(512)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        tiled_linear_cross_entropy(h, w, y, s, 64)
    assert sum(saved) <= h.numel() + w.numel()


TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=128", "data.seq_len=192",
        "train.steps=3", "train.tensorboard=false",
        # Adam divides by |g|: with eps 1e-8 a weight whose gradient is ~1e-9 moves by a good part of lr
        # on rounding alone; eps 1e-6 keeps such weights still, so parameters compare to 1e-5
        "train.adam_eps=1e-6"]


@pytest.mark.parametrize("cp,scheme,extra", [(1, "local", ()), (2, "ring", ("model.tie_embeddings=true",))])
def test_step_with_tiled_loss_equals_untiled(ranks, tmp_path, cp, scheme, extra):
    from distattn.config import load_config
    from train_util import one_step
    common = TINY + [f"parallel.cp={cp}", f"attention.scheme={scheme}", *extra]
    base = load_config(None, common + [f"run.output_dir={tmp_path / 'a'}"])
    tiled = load_config(None, common + [f"run.output_dir={tmp_path / 'b'}", "model.loss_tile=40"])
    (l1, p1), = [r for r in ranks(cp, one_step, base.model_dump(), 2) if r is not None]
    (l2, p2), = [r for r in ranks(cp, one_step, tiled.model_dump(), 2) if r is not None]
    assert l1 == pytest.approx(l2, rel=1e-6)
    torch.testing.assert_close(p2, p1, atol=1e-5, rtol=0)  # tests/test_train.py's tolerance
