"""`forward_logits`: our model on a Hugging Face checkpoint, in one process, for checks and notebooks."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch


@contextlib.contextmanager
def single_process_group():
    """A gloo world of one, for code that needs torch.distributed (megatron's groups), unless one exists."""
    import torch.distributed as dist
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as d:
        store = dist.FileStore(os.path.join(d, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def build_loaded_model(model_cfg, weights: dict[str, torch.Tensor], context, max_len: int):
    """Our GPTModel for `model_cfg` holding `weights` (every parameter must be given)."""
    from distattn.model.gpt import build_gpt
    model = build_gpt(model_cfg, context, max_len)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"the weights do not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model


def forward_logits(path: str | Path, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [T, vocab] of a HF model directory on `input_ids` (1-D), through distattn's model in fp32 on CPU.

    The weights are converted in memory (nothing is written); attention is the
    `local` scheme, RoPE and its scaling come from the checkpoint's config.
    """
    import distattn
    from distattn.hf.convert import load_hf
    from distattn.model.attention import AttentionContext

    ids = torch.as_tensor(input_ids)
    if ids.dim() != 1 or ids.numel() == 0 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be a non-empty 1-D integer tensor, got {tuple(ids.shape)} {ids.dtype}")
    model_cfg, weights = load_hf(path)
    if int(ids.max()) >= model_cfg.vocab_size or int(ids.min()) < 0:
        raise ValueError(f"input_ids hold token id {int(ids.max())}, outside the model's vocab of "
                         f"{model_cfg.vocab_size}")
    model_cfg = model_cfg.model_copy(update={"dtype": "fp32"})
    weights = {k: v.float() for k, v in weights.items()}
    n = ids.numel()
    with single_process_group():
        ctx = AttentionContext(softmax_scheme=distattn.get_scheme("local"),
                               rope_base=model_cfg.rope_base, rope_scaling=model_cfg.rope_scaling.to_rope())
        model = build_loaded_model(model_cfg, weights, ctx, n)
        model.eval()
        pos = torch.arange(n)
        ctx.set_batch([0, n], pos, n)
        with torch.no_grad():
            return model(ids.long()[None], pos[None], None)[0].float()


__all__ = ["build_loaded_model", "forward_logits", "single_process_group"]
