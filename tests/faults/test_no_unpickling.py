"""Issue 19, item 6 (audit): nothing the library or its tools read back is unpickled. A planted
pickle in a checkpoint or an output folder would run as whoever resumes the run, so every load in
megallama/ and tools/ must be a data format: ``torch.load(..., weights_only=True)``, ``np.load``
without ``allow_pickle=True``, no ``pickle``/``marshal``/``shelve`` loads."""
import ast
import glob
import os

import pytest

pytestmark = pytest.mark.faults

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("marshal", "load"),
              ("marshal", "loads"), ("shelve", "open"), ("dill", "load"), ("joblib", "load")}


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def unsafe_loads(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)):
            continue
        module, name = node.func.value.id, node.func.attr
        if (module, name) in UNPICKLERS:
            found.append(f"line {node.lineno}: {module}.{name}")
        elif module == "torch" and name == "load" and _keyword(node, "weights_only") is not True:
            found.append(f"line {node.lineno}: torch.load without weights_only=True")
        elif module in ("np", "numpy") and name == "load" and _keyword(node, "allow_pickle") is True:
            found.append(f"line {node.lineno}: np.load(allow_pickle=True)")
    return found


def test_the_audit_finds_what_it_looks_for():
    planted = "import pickle, torch, numpy as np\npickle.load(f)\ntorch.load(p)\nnp.load(p, allow_pickle=True)\n" \
              "torch.load(p, weights_only=True)\nnp.load(p)\n"
    assert unsafe_loads(planted) == ["line 2: pickle.load", "line 3: torch.load without weights_only=True",
                                     "line 4: np.load(allow_pickle=True)"]


def test_no_file_read_back_is_unpickled():
    offenders = {}
    for path in glob.glob(os.path.join(ROOT, "megallama", "**", "*.py"), recursive=True) + \
            glob.glob(os.path.join(ROOT, "tools", "*.py")):
        with open(path) as f:
            found = unsafe_loads(f.read())
        if found:
            offenders[os.path.relpath(path, ROOT)] = found
    assert offenders == {}


def test_torch_floor_is_where_weights_only_is_a_security_boundary():
    import re

    from packaging.version import Version

    with open(os.path.join(ROOT, "setup.py")) as f:
        floor = re.search(r'"torch>=([\d.]+)"', f.read()).group(1)
    assert Version(floor) >= Version("2.6")  # CVE-2025-32434: weights_only=True was bypassable before
