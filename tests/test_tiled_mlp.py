"""Tiled MLP: equal outputs and gradients, one step equal to the untiled one, less saved memory."""
from __future__ import annotations

import pytest
import torch

from distattn.config import load_config
from distattn.model.tiled_mlp import tiled_forward
from train_util import one_step


class SwiGLU(torch.nn.Module):
    """A megatron-shaped MLP: forward(x [s, b, h]) -> (out, bias)."""

    def __init__(self, h=16, f=40):
        super().__init__()
        self.fc1 = torch.nn.Linear(h, 2 * f, bias=False)
        self.fc2 = torch.nn.Linear(f, h, bias=False)

    def forward(self, x):
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(torch.nn.functional.silu(a) * b), None


@pytest.mark.parametrize("n,tile", [(33, 8), (8, 8), (5, 16)])
def test_tiled_forward_equals_untiled(n, tile):
    torch.manual_seed(n)
    mlp = SwiGLU()
    x = torch.randn(n, 1, 16, requires_grad=True)
    ref, _ = mlp(x)
    ref.square().sum().backward()
    gx, gw = x.grad.clone(), mlp.fc1.weight.grad.clone()
    x.grad = None
    mlp.zero_grad()
    out, bias = tiled_forward(mlp.forward, tile)(x)
    out.square().sum().backward()
    assert bias is None
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(mlp.fc1.weight.grad, gw, rtol=1e-5, atol=1e-6)


def test_saved_activations_are_the_tile_inputs_only():
    mlp = SwiGLU(16, 400)
    x = torch.randn(256, 1, 16, requires_grad=True)
    sizes: list[int] = []

    def count(fn):
        sizes.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn(x)[0].sum()
        return sum(sizes)
    untiled, tiled = count(mlp.forward), count(tiled_forward(mlp.forward, 32))
    assert untiled > 256 * 400 * 2           # [T, 2 ffn] kept by autograd
    assert tiled < untiled / 20


TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=128", "data.seq_len=192",
        "train.steps=3", "train.warmup_steps=1", "train.tensorboard=false"]


@pytest.mark.parametrize("cp,scheme", [(1, "local"), (2, "ring")])
def test_step_with_tiled_mlp_equals_untiled(ranks, tmp_path, cp, scheme):
    common = TINY + [f"parallel.cp={cp}", f"attention.scheme={scheme}"]
    base = load_config(None, common + [f"run.output_dir={tmp_path / 'a'}"])
    tiled = load_config(None, common + [f"run.output_dir={tmp_path / 'b'}", "model.mlp_tile=40"])
    (l1, p1), = [r for r in ranks(cp, one_step, base.model_dump()) if r is not None]
    (l2, p2), = [r for r in ranks(cp, one_step, tiled.model_dump()) if r is not None]
    # the tolerance of tests/test_train.py: Adam normalises the update, so a weight whose gradient is
    # near zero can move by up to lr * 1e-3 when its summation order changes
    assert l1[0] == pytest.approx(l2[0], rel=1e-6)
    torch.testing.assert_close(p2, p1, atol=1e-5, rtol=0)
