"""The README's commands can't rot: every tool, module and flag it shows exists, and every make
target it names is in the Makefile."""
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def entry_point(argv):
    """(help command, flags) of a `python tools/X.py …` or `torchrun … -m megallama.pretrain …` line."""
    if argv[0] == "python" and argv[1].startswith("tools/"):
        return [sys.executable, argv[1], "--help"], argv[2:]
    if argv[0] == "torchrun" and "-m" in argv:
        i = argv.index("-m")
        return [sys.executable, "-m", argv[i + 1], "--help"], argv[i + 2:]
    return None, None


COMMANDS = readme_commands()


def test_readme_has_commands():
    assert any(c.startswith("python tools/") for c in COMMANDS)
    assert any(c.startswith("make ") for c in COMMANDS)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith(("python tools/", "torchrun"))])
def test_tool_and_flags_exist(command):
    help_cmd, args = entry_point(shlex.split(command))
    assert help_cmd is not None, command
    out = subprocess.run(help_cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in (a for a in args if a.startswith("--")):
        assert re.search(rf"{re.escape(flag)}\b", out.stdout), f"{flag} is not a flag of {help_cmd[1:3]}"


def test_make_targets_exist():
    with open(os.path.join(ROOT, "Makefile")) as f:
        targets = set(re.findall(r"^([a-z][\w-]*):", f.read(), flags=re.M))
    for command in COMMANDS:
        if command.startswith("make "):
            assert command.split()[1] in targets, command
