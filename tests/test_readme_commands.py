"""The README's commands are what tools/check_readme.py runs in CI: parsed right, each run or excused."""
from __future__ import annotations

import importlib.util

from cli_util import REPO

_spec = importlib.util.spec_from_file_location("check_readme", REPO / "tools" / "check_readme.py")
check_readme = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_readme)


def test_commands_are_parsed_without_comments_and_with_continuations():
    text = "```bash\nmake run    # the main job\n# a comment\nfoo --a \\\n  --b 'x # y'\n```\n```python\nx = 1\n```\n"
    assert check_readme.readme_commands(text) == ["make run", "foo --a    --b 'x # y'"]


def test_every_readme_command_runs_or_has_a_reason():
    cmds = check_readme.readme_commands((REPO / "README.md").read_text())
    assert any(c.startswith("make run") for c in cmds)
    run = [c for c in cmds if check_readme.plan(c)[0] == "run"]
    assert len(run) >= len(cmds) // 2, "most README commands must run as written"
    for c in cmds:
        what, _ = check_readme.plan(c)
        assert what == "run" or what.startswith("not run: ") and len(what) > 15, c


def test_distattn_commands_in_the_readme_parse(capsys):
    """Every `distattn ...` line of the README is accepted by the argument parser."""
    import shlex

    from distattn.cli import build_parser
    parser = build_parser()
    for c in check_readme.readme_commands((REPO / "README.md").read_text()):
        words = shlex.split(c)
        if "distattn" in words[0]:
            parser.parse_args(words[1:])
        elif words[0].endswith("torchrun") and "distattn.cli" in words:
            parser.parse_args(words[words.index("distattn.cli") + 1:])
