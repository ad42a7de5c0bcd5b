"""How a launch fails, as the CLI reports it.

`LaunchError`: the job cannot start as configured (exit status 2); the message
names the setting or address, the value and what would work. `WorkerFailure`:
ranks failed after the start (exit status 1); its message is one line per rank
worth showing, `rank R failed: MESSAGE (full log: PATH)`.
"""
from __future__ import annotations

from distattn.train.ranklog import RankFailure, first_causes


class LaunchError(RuntimeError):
    """The cluster cannot run this job as configured (found before training starts)."""


class WorkerFailure(RuntimeError):
    """A rank raised, or workers kept dying after the allowed restarts."""

    def __init__(self, message: str, failures: list[RankFailure] | None = None):
        super().__init__(message)
        self.failures = list(failures or [])

    @classmethod
    def from_ranks(cls, failures: list[RankFailure]) -> "WorkerFailure":
        """One line per failing rank, leaving out ranks that only echo a peer's failure; ranks
        that failed with the same message share the first one's line."""
        groups: dict[str, list[RankFailure]] = {}
        for f in first_causes(failures):
            groups.setdefault(f.message, []).append(f)
        lines = []
        for same in groups.values():
            line = same[0].line()
            if len(same) > 1:
                others = ", ".join(str(f.rank) for f in same[1:])
                line += f"; rank{'s' if len(same) > 2 else ''} {others} failed the same way"
            lines.append(line)
        return cls("\n".join(lines), failures)

    @property
    def lines(self) -> list[str]:
        return str(self).splitlines()
