"""What `distattn train` checks in the driver before any rank starts.

Everything that can be known from files and the config is checked here, for
every launcher, so a bad input costs a second and one line (exit code 2)
instead of a launch and a traceback per rank: the run directory (a finished
run is not overwritten unless asked), the checkpoint to resume (found,
complete, written by the same model and data), the data (the source is built
here, as every rank would build it) and the vocabulary the data needs.

`check` only reads; `Preflight.apply` does what the user asked for (removing an
old run's outputs with --overwrite) and prints the notes, on one process only.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from distattn.cli_args import UsageError
from distattn.train import resume as ckpts

# presets whose comment promises a distance: (data.seq_len that keeps it, the promise)
PROMISES = {"recall_8k": (8192, "the answer lies >= 4096 tokens back (half the sequence)")}


@dataclass
class Preflight:
    """The checked plan of a run: what the launchers get and what to do or say first."""

    resume: bool | str = False  # False: fresh; True: the latest checkpoint; str: that checkpoint
    checkpoint: Path | None = None  # the checkpoint resumed
    start_step: int = 0
    remove: list[Path] = field(default_factory=list)  # --overwrite: old outputs to delete
    notes: list[str] = field(default_factory=list)

    def apply(self, say: Callable[[str], None] = print) -> None:
        """Delete what --overwrite replaces, then print the notes (call on one process)."""
        if self.remove:
            for p in self.remove:
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
            say(f"distattn: --overwrite: removed {_listing(self.remove)}")
            for root in {q.parent for q in self.remove if q.name.startswith("step_")}:
                _reset_marker(root)
        for n in self.notes:
            say(f"distattn: {n}")


def _reset_marker(root: Path) -> None:
    """After later steps are removed, `latest` names the newest step left (or goes)."""
    left = ckpts.steps(root)
    marker = root / "latest"
    if left:
        marker.write_text(ckpts.step_dir(root, left[-1]).name)
    elif marker.exists():
        marker.unlink()


def _listing(paths: list[Path]) -> str:
    dirs = [str(p) for p in paths if p.name.startswith("step_") or p.name == "checkpoints"]
    events = [p for p in paths if p.name.startswith("events.out.tfevents")]
    parts = []
    if dirs:
        parts.append(", ".join(dirs[:4]) + (f" and {len(dirs) - 4} more" if len(dirs) > 4 else ""))
    if events:
        parts.append(f"{len(events)} TensorBoard event file{'s' if len(events) > 1 else ''} from "
                     f"{events[0].parent}")
    return "; ".join(parts)


def check(cfg, resume: bool | str | None = None, overwrite: bool = False,
          config_path: str | None = None) -> Preflight:
    """Every driver-side check of a train run; UsageError names the setting, the value and the fix."""
    plan = Preflight()
    _run_dir(cfg, resume, overwrite, plan)
    source = _data(cfg)
    if plan.checkpoint is not None:
        _resume_data(plan.checkpoint, source)
    plan.notes += _promise_notes(cfg, config_path)
    try:
        from distattn.config.sections import config_notes
        plan.notes += config_notes(cfg)
    except ImportError:  # pragma: no cover - older config packages
        pass
    return plan


# --- the run directory and the checkpoint to resume ------------------------------------------

def _tb_events(run_dir: Path) -> list[Path]:
    tb = run_dir / "tensorboard"
    return sorted(tb.glob("events.out.tfevents.*")) if tb.is_dir() else []


def _run_dir(cfg, resume, overwrite: bool, plan: Preflight) -> None:
    run_dir = Path(cfg.run.output_dir)
    root = run_dir / "checkpoints"
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"run.output_dir={cfg.run.output_dir} is a file, not a directory; set "
                         f"run.output_dir or run.name to a new directory")
    if resume is None or resume is False:
        done = ckpts.steps(root)
        events = _tb_events(run_dir)
        if not (done or ckpts.latest(root) or events):
            return
        what = []
        if done:
            what.append(f"{len(done)} checkpoint{'s' if len(done) > 1 else ''} (step {done[0]}"
                        f"{'..' + str(done[-1]) if len(done) > 1 else ''}) in {root}")
        if events:
            what.append(f"{len(events)} TensorBoard event file{'s' if len(events) > 1 else ''} in "
                        f"{run_dir / 'tensorboard'}")
        if not overwrite:
            cont = "continue it with --resume, " if done else ""
            raise UsageError(f"run.output_dir={cfg.run.output_dir} already holds an earlier run: "
                             f"{' and '.join(what)}; {cont}start over with --overwrite (deletes those), "
                             f"or train elsewhere with --set run.name=NEW (runs/NEW)")
        plan.remove += ([root] if root.exists() else []) + events
        return
    path = _find(run_dir, resume)
    meta = _verified(root, path)
    diffs = ckpts.incompatibilities(cfg, meta, ckpts.saved_config(path))
    if diffs:
        raise UsageError(ckpts.describe_incompatible(path, diffs))
    step = int(meta["step"])
    if step >= cfg.train.steps:
        raise UsageError(f"--resume: checkpoint {path} is at step {step}, and train.steps={cfg.train.steps} "
                         f"is already reached; set train.steps to more than {step} to train further")
    later = [s for s in ckpts.steps(root) if s > step]
    if later:
        if not overwrite:
            raise UsageError(f"--resume {resume if resume is not True else ''}".rstrip()
                             + f": {root} holds later checkpoints (step {', '.join(map(str, later[:6]))}) "
                             f"that training on from step {step} would overwrite; add --overwrite to delete "
                             f"them first, or continue elsewhere with --set run.name=NEW (runs/NEW)")
        plan.remove += [ckpts.step_dir(root, s) for s in later]
    is_latest = ckpts.latest(root)
    plan.resume = True if is_latest is not None and not later and is_latest.resolve() == path.resolve() \
        else str(path)
    plan.checkpoint, plan.start_step = path, step
    plan.notes.append(f"resuming from step {step} ({path}); training to step {cfg.train.steps}")


def _find(run_dir: Path, resume) -> Path:
    try:
        return ckpts.find(run_dir, True if resume is True or resume in ("", "latest") else str(resume))
    except ckpts.CheckpointError as e:
        raise UsageError(str(e)) from None


def _verified(root: Path, path: Path) -> dict:
    """meta.json of a complete checkpoint, or a refusal naming the damaged file and the previous good one."""
    try:
        return ckpts.verify(path)
    except ckpts.CheckpointError as e:
        import re
        m = re.fullmatch(r"step_(\d+)", path.name)
        prev = ckpts.previous_good(path.parent, int(m.group(1))) if m else None
        if prev is None:
            offer = "no earlier checkpoint is complete; start over with --overwrite"
        else:
            offer = f"resume from the previous good checkpoint with --resume {prev}"
            if any(s > prev for s in ckpts.steps(path.parent)):
                offer += " --overwrite (deletes the checkpoints after it)"
        raise UsageError(f"--resume: checkpoint {path} is damaged: {e}; {offer}") from None


def _resume_data(path: Path, source) -> None:
    """The saved data position belongs to this data (the corpus may have changed under the same path)."""
    import torch
    f = path / "rank00000.pt"
    try:
        extra = torch.load(f, weights_only=False)
        saved = extra["data"]["source"]
    except Exception as e:  # a damaged or foreign file
        raise UsageError(f"--resume: {f} cannot be read ({type(e).__name__}: {e}); the checkpoint is "
                         f"damaged") from None
    now = dict(source.fingerprint())
    if saved != now:
        diff = "; ".join(f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in now.items() if saved.get(k) != v)
        raise UsageError(f"--resume: checkpoint {path} was taken on other data ({diff}); resume with the "
                         f"data it was written with, or start a new run (--overwrite, or another run.name)")


# --- data and vocabulary ----------------------------------------------------------------------

def _data(cfg):
    """Build the source and a stream as a rank would, and check the vocab covers its token ids."""
    from distattn.train.data import BatchStream, DataError, build_source
    v = cfg.model.vocab_size
    try:
        source = build_source(cfg.data, seed=cfg.run.seed, vocab_size=v)
        BatchStream(source, cfg.data.seq_len, cfg.data.micro_batch_size, 0, cfg.parallel.dp, cfg.run.seed)
    except DataError as e:
        raise UsageError(str(e)) from None
    if cfg.data.source == "megatron":
        problem = source.first_outside()
        if problem:
            raise UsageError(problem)
        return source
    need = source.vocab_needed()
    if need is not None and v < need:
        if cfg.data.source == "synthetic":
            what = (f"data.source=synthetic (task {cfg.data.synthetic_task}) writes bytes up to {need - 1} "
                    f"({chr(need - 1)!r})")
        else:
            what = f"data.source={cfg.data.source} feeds UTF-8 bytes (token ids 0..255)"
        raise UsageError(f"model.vocab_size={v} is too small: {what}; set model.vocab_size={need} or more")
    return source


def _promise_notes(cfg, config_path: str | None) -> list[str]:
    """A preset that promises an answer distance, run at a seq_len that breaks it, says so."""
    name = cfg.run.name if cfg.run.name in PROMISES else (Path(config_path).stem if config_path else None)
    if name not in PROMISES or cfg.data.source != "synthetic":
        return []
    keeps, promise = PROMISES[name]
    from distattn.train.synthetic import SyntheticSource
    T, out = cfg.data.seq_len, []
    if T < keeps:
        out.append(f"warning: {name} promises that {promise}, but data.seq_len={T} puts it only >= "
                   f"{SyntheticSource.min_answer_distance(T)} tokens back; set data.seq_len={keeps} to keep "
                   f"the promise")
    if cfg.parallel.cp < 2:
        out.append(f"warning: {name} promises that {promise}, but parallel.cp={cfg.parallel.cp} keeps the "
                   f"whole sequence on one rank; set parallel.cp=2 or more")
    return out
