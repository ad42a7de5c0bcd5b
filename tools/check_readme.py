"""Run every shell command of README.md as written, in a scratch directory, and report.

    .venv/bin/python tools/check_readme.py            # all commands
    .venv/bin/python tools/check_readme.py --list     # what would run, and what would not
    .venv/bin/python tools/check_readme.py --only simulate

Commands are the lines of the README's ```bash blocks, in order (later commands
may depend on earlier ones, e.g. `--resume` on the run `distattn train` made).
They run in a scratch directory that links the checkout's .venv, configs,
tools, launch, Makefile and pyproject.toml, so run directories start empty and
nothing in the checkout is touched. A few commands cannot run on one machine
as written; each has a stated reason and, where one exists, a check that
does run (SUBSTITUTES below). Exit code 1 if any command fails.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINKED = (".venv", "configs", "tools", "launch", "Makefile", "pyproject.toml", "distattn", "docs")

# (pattern, reason, substitute command or None): commands that are not run as written
SUBSTITUTES = [
    (r"^make test\b", "the test suite itself (CI runs it before this script)", None),
    (r"HEAD_IP", "needs the address of another machine's Ray head", None),
    (r"^sbatch\b", "needs a Slurm cluster", "bash -n launch/slurm_ray.sbatch"),
    (r"my_job\.yaml", "a placeholder for the user's own config",
     ".venv/bin/distattn train --help"),
    (r"^ray start --head\b", "starts a Ray head that would outlive this check; `distattn train` "
     "starts and stops its own local Ray cluster in the commands above", ".venv/bin/ray --version"),
    (r"^tools/reproduce_all\.sh$", "regenerates every figure of docs/benchmarks.md (hours on 2 cores)",
     "tools/reproduce_all.sh --list"),
]


def readme_commands(text: str) -> list[str]:
    """The command lines of the ```bash blocks: comments stripped, continuation lines joined."""
    out: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        pending = ""
        for raw in block.splitlines():
            line = pending + raw
            if line.rstrip().endswith("\\"):
                pending = line.rstrip()[:-1] + " "
                continue
            pending = ""
            cmd = _strip_comment(line).strip()
            if cmd:
                out.append(cmd)
    return out


def _strip_comment(line: str) -> str:
    """Drop a trailing `# ...` that is outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if ch in "'\"":
            quote = None if quote == ch else (ch if quote is None else quote)
        elif ch == "#" and quote is None and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def plan(cmd: str) -> tuple[str, str | None]:
    """('run', None) or ('not run: reason', substitute)."""
    for pattern, reason, sub in SUBSTITUTES:
        if re.search(pattern, cmd):
            return f"not run: {reason}", sub
    return "run", None


def scratch_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="distattn-readme-"))
    for name in LINKED:
        src = REPO / name
        if src.exists():
            (d / name).symlink_to(src)
    return d


def run(cmd: str, cwd: Path, timeout: float) -> tuple[int, float, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(["bash", "-c", cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                           env=env, stdin=subprocess.DEVNULL)
        code, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        code, out = 124, f"timed out after {timeout:.0f}s\n{e.stdout or ''}{e.stderr or ''}"
    return code, time.perf_counter() - t0, out if isinstance(out, str) else out.decode(errors="replace")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="print the plan and run nothing")
    ap.add_argument("--only", default=None, help="run only commands containing this text")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per command (default 900)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args(argv)
    stamp, project = REPO / ".venv" / ".installed", REPO / "pyproject.toml"
    if not stamp.exists() or stamp.stat().st_mtime < project.stat().st_mtime:
        print("check_readme: .venv is missing or older than pyproject.toml; run `make install` first "
              "(`make` in the scratch directory would install the project from there)", file=sys.stderr)
        return 1
    commands = readme_commands((REPO / "README.md").read_text())
    if not commands:
        print("check_readme: README.md has no ```bash commands", file=sys.stderr)
        return 1
    work = scratch_dir()
    failed: list[str] = []
    total = time.perf_counter()
    try:
        for cmd in commands:
            if args.only and args.only not in cmd:
                continue
            what, sub = plan(cmd)
            print(f"$ {cmd}\n  {what}" + (f"; checked instead: {sub}" if sub else ""), flush=True)
            to_run = cmd if what == "run" else sub
            if to_run is None or args.list:
                continue
            code, secs, out = run(to_run, work, args.timeout)
            tail = "\n".join(out.rstrip().splitlines()[-3:])
            print(f"  exit {code} in {secs:.0f}s\n" + "\n".join(f"    | {x}" for x in tail.splitlines()),
                  flush=True)
            if code != 0:
                failed.append(cmd)
                print("  --- output ---\n" + out[-4000:], flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"scratch directory kept: {work}")
    print(f"check_readme: {len(failed)} failed in {time.perf_counter() - total:.0f}s"
          + "".join(f"\n  FAILED: {c}" for c in failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
