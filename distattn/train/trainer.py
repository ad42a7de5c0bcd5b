"""The training loop, run on every rank: megatron-core GPT + distattn attention.

Each dp rank reads its own packed sequences; the cp ranks of a dp group read the
same sequence and keep only their layout's tokens. The loss of a step is the
global mean over every loss token of every micro-batch on every dp rank, so
summing gradients over dp x cp gives exactly the single-device gradient.
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from distattn.comm import Comm, CommError, CommLedger
from distattn.config import Config, save_config
from distattn.mesh import MeshShape, ParallelMesh
from distattn.schemes.ring import kept_ring_buffers
from distattn.train.schedule import lr_lambda

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


def hetero_options(a) -> dict:
    """The hetero scheme's pattern options from the `attention` config section."""
    return dict(block=a.hetero_block, local_blocks=a.hetero_local_blocks, stride=a.hetero_stride,
                head_step=a.hetero_head_step, offset=a.hetero_offset, dense_heads=a.hetero_dense_heads,
                gqa_pattern=a.hetero_gqa, allow_partial_coverage=a.hetero_allow_partial_coverage)


def build_schemes(cfg: Config, mesh: ParallelMesh):
    """The softmax and linear schemes of the model, sharing one token layout."""
    import distattn
    a = cfg.attention
    name = a.scheme
    if name in ("lasp2", "lasp1"):
        name = "allgather"  # a linear-only model still needs a layout; allgather accepts any
    opts: dict = {}
    if name in ("ring", "allgather", "ulysses", "usp", "hetero"):
        opts["layout_name"] = a.layout
    if name in ("ring", "allgather", "hetero") and a.layout_weights is not None:
        opts["layout_weights"] = tuple(a.layout_weights)
    if name == "hetero":
        opts.update(hetero_options(a), dense_every=a.hetero_dense_every)
    if name in ("ring", "usp", "ulysses"):
        opts["dkv_dtype"] = a.dkv_dtype
    if name == "allgather" and a.allgather_head_stride:
        opts["head_stride"] = a.allgather_head_stride
    if name == "usp":
        opts["ulysses"] = cfg.parallel.ulysses
    if name == "cad":  # the planner's token owner is the layout; servers: the last world ranks
        servers = cfg.parallel.attention_servers
        if servers:  # dedicated: group ranks cp.. of the cp trainers + their servers group
            per = servers // cfg.parallel.dp
            opts["server_ranks"] = tuple(range(cfg.parallel.cp, cfg.parallel.cp + per))
        opts.update(layout_name=a.layout, tolerance=a.cad_tolerance, min_shard=a.cad_min_shard,
                    linear_cost=a.cad_linear_cost, token_cost=a.cad_token_cost,
                    pingpong=a.cad_pingpong)
    if name == "local":
        opts = {}
    softmax = distattn.get_scheme(name, **opts)
    if name == "usp" and 1 < cfg.parallel.ulysses < cfg.parallel.cp:
        softmax.bind(mesh.ulysses_group, mesh.ring_group)
    linear = None
    if set("LDK") & set(cfg.model.layer_kinds()):  # linear and delta-rule (GDN, KDA) layers
        linear = _linear_scheme(cfg, softmax)
    return softmax, linear


def attention_group(mesh: ParallelMesh):
    """The softmax scheme's group: the cp group, or with dedicated attention servers the cp
    trainers followed by their dp group's servers."""
    return mesh.attention_group if mesh.shape.attention_servers else mesh.cp_group


def _linear_scheme(cfg: Config, softmax):
    """The linear-layer scheme, on exactly the softmax layers' token placement (LASP-2H)."""
    import distattn
    from distattn.schemes.hybrid import HybridSpec
    from distattn.schemes.lasp2 import LinearLocal
    name = cfg.attention.linear_scheme
    if name == "local" or cfg.parallel.cp == 1:
        return LinearLocal(layout_name=getattr(softmax, "layout_name", "contiguous"))
    lay = getattr(softmax, "layout_name", None) or softmax.default_layout
    linear = distattn.get_scheme(name, layout_name=lay) if name == "lasp2" else distattn.get_scheme(name)
    # same tokens on the same ranks for both kinds of layer, or a clear error
    HybridSpec(linear=linear, softmax=softmax, layout=lay).check(
        cfg.data.seq_len, cfg.parallel.cp, None)
    return linear


def _linear_cost(cfg: Config) -> float:
    """Linear-layer work per token in attention-pair units (~6 h for a dense layer with a 4h MLP)."""
    return 6.0 * cfg.model.hidden_size


@dataclass
class StepLog:
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    step_s: float
    comm_bytes: int
    exposed_s: float
    extra: dict = field(default_factory=dict)


class Trainer:
    """One rank's view of a training run."""

    def __init__(self, cfg: Config, resume: bool | str | None = False, quiet: bool = False):
        """`resume`: False/None starts fresh, True continues from the run's latest checkpoint,
        a path from that checkpoint directory."""
        self.cfg = cfg
        self.quiet = quiet
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        p = cfg.parallel
        shape = MeshShape.from_cp(dp=p.dp, cp=p.cp, ulysses=p.ulysses, attention_servers=p.attention_servers,
                                  tp=p.tp)
        self.mesh = ParallelMesh.build(shape)
        self.dp_rank, self.cp_rank = self.mesh.coords.dp, self.mesh.coords.cp
        self.ledger = CommLedger()
        # gradients are summed over the ranks holding the same parameter shards (all trainers at tp=1)
        self.grad_comm = Comm(self.mesh.dp_cp_group, self.ledger)
        self.tp_comm = Comm(self.mesh.tp_group, self.ledger) if p.tp > 1 else None
        self.dp_comm = Comm(self.mesh.dp_group, self.ledger)
        self.run_dir = Path(cfg.run.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"

        from distattn.model.attention import AttentionContext
        from distattn.model.gpt import build_gpt
        from distattn.train.data import build_stream

        self.softmax_scheme, self.linear_scheme = build_schemes(cfg, self.mesh)
        self.softmax_scheme.validate(heads=cfg.model.num_attention_heads // p.tp,  # this tp rank's heads
                                     kv_heads=cfg.model.num_query_groups // p.tp,
                                     world=p.cp + p.attention_servers // p.dp)  # its group's size
        self.ctx = AttentionContext(group=self.mesh.cp_group, softmax_scheme=self.softmax_scheme,
                                    linear_scheme=self.linear_scheme, ledger=self.ledger,
                                    rope_base=cfg.model.rope_base,
                                    rope_scaling=cfg.model.rope_scaling.to_rope(),
                                    softmax_group=attention_group(self.mesh))
        if p.tp > 1 and p.sequence_parallel:
            # megatron orders its sequence-parallel gathers before the GEMMs they feed through a single
            # CUDA work queue; launchers should export it before CUDA starts (harmless on CPU)
            os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        self.model = build_gpt(cfg.model, self.ctx, cfg.data.seq_len, seed=cfg.run.seed,
                               tp_group=self.mesh.tp_group, sequence_parallel=p.sequence_parallel)
        self.fsdp_ops = None
        if cfg.train.shard == "fsdp":  # before the optimizer: it holds the sharded parameters
            from distattn.comm import TorchCollectives
            from distattn.train.fsdp import shard_model
            self.fsdp_ops = TorchCollectives()
            shard_model(self.model, self.mesh.dp_cp_group, self.fsdp_ops)
        if cfg.model.init_from and not resume:  # a resumed run has its own weights
            from distattn.train.init_weights import load_initial_weights
            load_initial_weights(self.model, cfg.model.init_from, self.mesh.trainer_group,
                                 tp=(self.mesh.coords.tp, p.tp))
        named = [(n, q) for n, q in self.model.named_parameters() if q.requires_grad]
        self.params = [q for _, q in named]
        self.param_names = [n for n, _ in named]
        decay = [q for q in self.params if q.dim() >= 2]
        no_decay = [q for q in self.params if q.dim() < 2]
        t = cfg.train
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t))
        self.engine = None
        if t.zero_stage > 0:
            self._init_deepspeed()
        if cfg.data.balance == "attention":  # whole documents, equal predicted work per dp rank
            from distattn.sched.pack import build_balanced_stream
            self.stream = build_balanced_stream(cfg.data, self.dp_rank, p.dp, cfg.run.seed,
                                                linear_cost=_linear_cost(cfg), vocab_size=cfg.model.vocab_size)
        else:
            self.stream = build_stream(cfg.data, self.dp_rank, p.dp, cfg.run.seed,
                                       vocab_size=cfg.model.vocab_size)
        self.step = 0
        self._released = False
        self.history: list[StepLog] = []
        self.writer = None
        if resume:
            self.load_checkpoint(resume)

    # -- DeepSpeed ZeRO ------------------------------------------------------------
    def _init_deepspeed(self):
        """ZeRO stage 1/2 shards optimizer state over all trainer ranks (dp x cp)."""
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
        try:
            import deepspeed
        except Exception as e:  # pragma: no cover - import failure on odd machines
            raise RuntimeError(f"train.zero_stage={self.cfg.train.zero_stage} needs DeepSpeed, which "
                               f"failed to import: {e}; set train.zero_stage=0") from e
        t = self.cfg.train
        ds_cfg = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": t.grad_clip if t.grad_clip > 0 else 0.0,
            "zero_optimization": {"stage": t.zero_stage, "overlap_comm": False,
                                  "contiguous_gradients": False},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": self.cfg.model.dtype == "bf16"},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if self.mesh.shape.attention_servers:
            raise RuntimeError("train.zero_stage > 0 with attention servers is not supported; "
                               "set parallel.attention_servers=0 or train.zero_stage=0")
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=ds_cfg)

    def _zero_comm(self):
        """DeepSpeed's gradient and parameter traffic, counted in the step's ledger as "zero"."""
        from deepspeed.comm import comm as ds_comm
        from distattn.comm import ledgered_backend
        return ledgered_backend(ds_comm.cdb, self.ledger, tag="zero")

    # -- one step ------------------------------------------------------------------
    def _local(self, batch):
        lay = self.softmax_scheme.layout(batch.tokens.numel(), self.cfg.parallel.cp, batch.cu_seqlens)
        idx = lay.indices(self.cp_rank)
        return (batch.tokens[idx], batch.labels[idx], self._loss_mask(batch)[idx], lay.positions(self.cp_rank))

    def _loss_mask(self, batch):
        """Which labels count: every token's, or (data.loss_on=answers) a synthetic task's answers only."""
        if self.cfg.data.loss_on == "answers":
            return batch.loss_mask * batch.answer_mask
        return batch.loss_mask

    def train_step(self) -> StepLog:
        t = self.cfg.train
        t0 = time.perf_counter()
        self.ledger.reset()
        batches = self.stream.next_step(t.grad_accum)
        # the global number of loss tokens in this step (same on the cp ranks of a dp group)
        count = torch.tensor([float(sum(self._loss_mask(b).sum().item() for b in batches))])
        self.dp_comm.all_reduce(count, op="sum")
        denom = max(count.item(), 1.0)
        model = self.engine.module if self.engine is not None else self.model
        model.train()
        loss_sum = torch.zeros(())
        scale = self.grad_comm.size if self.engine is not None else 1.0  # DeepSpeed averages
        c0 = time.thread_time()
        with self._fsdp_comm(), self._tp_comm():
            self._forward_backward(model, batches, denom, scale, loss_sum)
        compute_s = time.thread_time() - c0
        grad_norm = self._sync_and_step()
        total = loss_sum.clone()
        self.grad_comm.all_reduce(total, op="sum")
        return self._finish_step(total, batches, t0, compute_s, grad_norm)

    def _forward_backward(self, model, batches, denom, scale, loss_sum) -> None:
        cfg = self.cfg
        for b in batches:
            tokens, labels, mask, pos = self._local(b)
            self.ctx.set_batch(b.cu_seqlens, pos, b.tokens.numel())
            # a ring's K/V and dK/dV buffers serve every layer of a pass; they are freed between the
            # forward and the backward, where the loss's tensors peak (as plan.memory counts them)
            with kept_ring_buffers(), self._offload():
                if self.tp_comm is not None:
                    from distattn.train.tp_step import tp_loss
                    loss = tp_loss(model, tokens, labels, mask, pos, denom, cfg.model.loss_tile,
                                   self.tp_comm, cfg.parallel.sequence_parallel)
                else:
                    loss = self._loss(model, tokens, labels, mask, pos, denom, cfg.model.loss_tile)
            loss_sum += loss.detach()
            with kept_ring_buffers():
                if self.engine is not None:
                    with self._zero_comm():
                        self.engine.backward(loss * scale)
                else:
                    loss.backward()

    def _fsdp_comm(self):
        """FSDP's collectives of the step, counted in the ledger under "fsdp" (train.shard=fsdp)."""
        import contextlib
        if self.fsdp_ops is None:
            return contextlib.nullcontext()
        from distattn.train.fsdp import counted
        return counted(self.fsdp_ops, self.ledger)

    def _tp_comm(self):
        """Megatron's tensor-parallel collectives of the step, counted in the ledger under "tp"."""
        import contextlib
        if self.tp_comm is None:
            return contextlib.nullcontext()
        from distattn.model.tensor_parallel import counted_tp_comm
        return counted_tp_comm(self.ledger)

    def _finish_step(self, total, batches, t0: float, compute_s: float, grad_norm: float) -> StepLog:
        cfg = self.cfg
        loss_val = total.item()
        if not math.isfinite(loss_val):
            raise FloatingPointError(f"non-finite loss {loss_val} at step {self.step + 1} on rank {self.rank}; "
                                     "lower train.lr or check the data")
        self.step += 1
        tot = self.ledger.totals()
        log = StepLog(step=self.step, loss=loss_val, lr=self._lr(), grad_norm=grad_norm,
                      tokens=sum(b.tokens.numel() for b in batches) * cfg.parallel.dp,
                      step_s=time.perf_counter() - t0, comm_bytes=tot.bytes_sent, exposed_s=tot.exposed_s)
        log.extra.update(self._balance_stats(batches, compute_s))
        self.history.append(log)
        return log

    @staticmethod
    def _loss(model, tokens, labels, mask, pos, denom, tile: int = 0):
        """The micro-batch's share of the step loss.

        A function of its own so the logits ([T_local, vocab], the largest
        activation of a small model) are freed once the loss exists instead of
        living through the backward as a local variable. With `model.loss_tile`
        the logits never exist whole: the model stops at the final norm and the
        output projection and cross-entropy run over tiles of tokens.
        """
        if tile:
            from distattn.model.tiled_loss import tiled_linear_cross_entropy
            model.post_process = False  # megatron returns the final hidden states [s, 1, h]
            try:
                hidden = model(tokens[None], pos[None], None)[:, 0]
            finally:
                model.post_process = True
            weight = (model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights
                      else model.output_layer.weight)
            return tiled_linear_cross_entropy(hidden, weight, labels, mask.float() / denom, tile)
        logits = model(tokens[None], pos[None], None)[0]  # [T_local, vocab]
        per_tok = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
        return (per_tok * mask).sum() / denom

    def _offload(self):
        """model.offload_activations: nothing to wrap here; the model moves each layer's input.

        build_gpt gave the recomputed layers a LayerInputOffload (distattn.model.offload),
        which keeps CUDA layer inputs in pinned host memory between forward and backward.
        On CPU the activations already live in host memory, so it is a no-op (logged once).
        """
        import contextlib
        if self.cfg.model.offload_activations and not torch.cuda.is_available():
            if not getattr(self, "_offload_noted", False):
                self._offload_noted = True
                if self.rank == 0 and not self.quiet:
                    print("distattn: model.offload_activations=true has no effect on CPU "
                          "(activations are already in host memory)", file=sys.stderr)
        return contextlib.nullcontext()

    def _balance_stats(self, batches, compute_s: float) -> dict:
        """Predicted (pair units) and measured (CPU seconds of forward+backward) work of every dp rank:
        max, mean and idle fraction sum(max - t_i) / (N max)."""
        from distattn.sched.pack import seq_pairs
        lin = _linear_cost(self.cfg)
        pred = float(sum(seq_pairs(b.cu_seqlens) + lin * b.tokens.numel() for b in batches))
        both = self.dp_comm.all_gather(torch.tensor([pred, compute_s], dtype=torch.float64))
        out = {}
        for i, name in enumerate(("predicted", "measured")):
            v = [float(x) for x in both[:, i]]
            mx, mean = max(v), sum(v) / len(v)
            out[f"balance/{name}_max"] = mx
            out[f"balance/{name}_mean"] = mean
            out[f"balance/{name}_idle"] = sum(mx - x for x in v) / (len(v) * mx) if mx > 0 else 0.0
        return out

    def _lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0]) if self.scheduler is not None else self.cfg.train.lr

    def _sync_and_step(self) -> float:
        if self.engine is not None:
            with self._zero_comm():
                self.engine.step()
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        if self.fsdp_ops is not None:  # FSDP reduce-scattered the gradients already
            self._sum_sequence_parallel_grads()
            norm = self._clip_sharded()
        elif self.tp_comm is not None:
            from distattn.train.tp_step import clip_tp_grads
            self._sum_grads()
            self._sum_sequence_parallel_grads()
            norm = clip_tp_grads(self.params, self.param_names, self.tp_comm, self.cfg.train.grad_clip)
        else:
            norm = float(self._sum_and_clip())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm

    def _sum_and_clip(self):
        """Gradients summed over dp x cp in one flat all-reduce through the ledger, then clipped."""
        self._sum_grads()
        clip = self.cfg.train.grad_clip
        return torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"))

    def _sum_sequence_parallel_grads(self) -> None:
        """Norm weights under sequence parallelism saw only this tp rank's tokens: sum over tp."""
        if self.tp_comm is None or not self.cfg.parallel.sequence_parallel:
            return
        from distattn.model.tp_weights import split_of
        for name, q in zip(self.param_names, self.params):
            if split_of(name) is None and q.grad is not None:  # the norms: whole on every tp rank
                g = q.grad.to_local() if hasattr(q.grad, "to_local") else q.grad
                self.tp_comm.all_reduce(g, op="sum")

    def _sum_grads(self) -> None:
        """Gradients summed over the dp x cp ranks of this tp index in one flat all-reduce."""
        grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        self.grad_comm.all_reduce(flat, op="sum")  # gradients of the global mean loss
        off = 0
        for q in self.params:
            n = q.numel()
            q.grad = flat[off:off + n].view_as(q).to(q.dtype)
            off += n

    def _clip_sharded(self) -> float:
        """The global gradient norm of sharded gradients (one scalar all-reduce through the ledger) and
        clip_grad_norm_'s scaling of them, so the step equals the unsharded one."""
        from distattn.model.tp_weights import split_of
        local = [q.grad.to_local() for q in self.params if q.grad is not None]
        counted = [q.grad.to_local() for n, q in zip(self.param_names, self.params) if q.grad is not None
                   and (self.tp_comm is None or self.mesh.coords.tp == 0 or split_of(n) is not None)]
        sq = torch.zeros((), dtype=torch.float32)
        for g in counted:  # a weight every tp rank holds whole counts once
            sq += g.float().square().sum()
        Comm(self.mesh.trainer_group, self.ledger).all_reduce(sq, op="sum")
        norm = float(sq.sqrt())
        clip = self.cfg.train.grad_clip
        if clip > 0:
            coef = min(1.0, clip / (norm + 1e-6))
            if coef < 1.0:
                for g in local:
                    g.mul_(coef)
        return norm

    # -- checkpoints -----------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        from distattn.train.checkpoint import save
        return save(self)

    def load_checkpoint(self, target: bool | str = True) -> Path:
        from distattn.train.checkpoint import load
        return load(self, target)

    # -- the run -----------------------------------------------------------------------
    def fit(self, stop_at: int | None = None) -> list[StepLog]:
        """Train to train.steps (or stop early at step `stop_at`, keeping the schedule)."""
        from distattn.train.logging import RunLogger
        cfg = self.cfg
        last = min(cfg.train.steps, stop_at) if stop_at is not None else cfg.train.steps
        logger = RunLogger(cfg, self.rank == 0, start_step=self.step, quiet=self.quiet)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        try:
            while self.step < last:
                try:
                    log = self.train_step()
                except CommError as e:
                    raise CommError(f"step {self.step + 1}, rank {self.rank}: {e} "
                                    f"(train.comm_timeout_s={cfg.train.comm_timeout_s})") from e
                logger.log(log, self.ledger)
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                    from distattn.eval.run import validation_loss
                    logger.log_validation(self.step, validation_loss(self))
                if cfg.train.ckpt_every and self.step % cfg.train.ckpt_every == 0:
                    self.save_checkpoint()
            if cfg.train.ckpt_every and self.step % cfg.train.ckpt_every:
                self.save_checkpoint()
            self.release_servers()
        finally:
            logger.close()
        return self.history

    def release_servers(self) -> None:
        """End the attention servers' loop (dedicated CAD); every trainer rank calls it once."""
        if self.mesh.shape.attention_servers and not self._released:
            from distattn.cad.server import stop_servers
            stop_servers(self.softmax_scheme, self.mesh.attention_group, ledger=CommLedger())
            self._released = True
