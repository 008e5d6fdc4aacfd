"""The README's commands can't rot: every tool, module and flag it shows exists, and every make
target it names is in the Makefile."""
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_text():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def readme_commands():
    text = readme_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def entry_point(argv):
    """(help command, flags) of a `python tools/X.py …`, `torchrun … -m megallama.pretrain …` or
    `torchrun … tools/X.py …` line; run_lm_eval.py's subcommand (`run`) is part of the help command."""
    if argv[0] == "python" and argv[1].startswith("tools/"):
        script, rest = argv[1], argv[2:]
    elif argv[0] == "torchrun" and "-m" in argv:
        i = argv.index("-m")
        return [sys.executable, "-m", argv[i + 1], "--help"], argv[i + 2:]
    elif argv[0] == "torchrun" and any(a.startswith("tools/") for a in argv):
        i = next(i for i, a in enumerate(argv) if a.startswith("tools/"))
        script, rest = argv[i], argv[i + 1:]
    else:
        return None, None
    if script == "tools/run_lm_eval.py" and rest and not rest[0].startswith("-"):
        return [sys.executable, script, rest[0], "--help"], rest[1:]
    return [sys.executable, script, "--help"], rest


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


def test_performance_table_is_the_stored_results():
    """The table between the bench markers is what `python bench/run_all.py --table-only` renders from
    bench/results/ (run_all rewrites it; an edit by hand or a result stored without it shows here)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_all", os.path.join(ROOT, "bench", "run_all.py"))
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    shown = readme_text().split(run_all.START, 1)[1].split(run_all.END, 1)[0].strip()
    assert shown == run_all.table().strip()


def test_plan_output_shown_is_what_the_command_prints():
    """The 65B budget block: each line the README shows after the plan.py command is in the tool's output."""
    text = readme_text()
    match = re.search(r"```bash\n(python tools/plan\.py [^\n]*)\n```\n```\n(.*?)```", text, flags=re.S)
    assert match, "the README's plan.py example and its output block"
    argv = shlex.split(match.group(1))
    out = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    printed = [line.rstrip() for line in out.stdout.splitlines()]
    for line in match.group(2).splitlines():
        assert line.rstrip() in printed, line
