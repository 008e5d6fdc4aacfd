"""The modules of megallama import each other without cycles (imports inside functions count: a
cycle hidden in a function is still a cycle), and the checkpoint package stands below training and
inference."""
import ast
import os

import megallama

PACKAGE_DIR = os.path.dirname(megallama.__file__)


def _modules() -> dict[str, str]:
    """Dotted module name → file, for every .py file under megallama/."""
    found = {}
    root = os.path.dirname(PACKAGE_DIR)
    for folder, _, files in os.walk(PACKAGE_DIR):
        for filename in files:
            if filename.endswith(".py"):
                path = os.path.join(folder, filename)
                parts = os.path.relpath(path, root)[:-len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts.pop()
                found[".".join(parts)] = path
    return found


def _imported(module: str, path: str, modules: dict[str, str]) -> set[str]:
    """The megallama modules ``module`` imports anywhere in its file. ``from P import X`` imports
    module ``P.X`` when there is one, else ``P``; relative imports are resolved."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in modules else base)
    return {t for t in targets if t in modules and t != module}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles of every strongly connected component of more than one module (Tarjan's algorithm):
    a shortest one through each of its modules."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(set(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [cycle for component in components for cycle in _cycles_within(graph, component)]


def _path(graph: dict[str, set[str]], start: str, goal, within=None) -> list[str] | None:
    """A shortest import chain from ``start`` to a module ``goal(module)`` accepts (breadth-first,
    through the modules ``within`` only, when given), None when there is none."""
    came_from = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if within is not None and nxt not in within:
                    continue
                if goal(nxt):
                    chain = [nxt, node]
                    while came_from[chain[-1]] is not None:
                        chain.append(came_from[chain[-1]])
                    return chain[::-1]
                if nxt not in came_from:
                    came_from[nxt] = node
                    following.append(nxt)
        frontier = following
    return None


def _cycles_within(graph: dict[str, set[str]], component: set[str]) -> list[list[str]]:
    """A shortest cycle through each module of the component, each cycle once."""
    cycles = []
    for start in sorted(component):
        cycle = _path(graph, start, lambda module: module == start, component)
        if not any(set(cycle) == set(seen) and len(cycle) == len(seen) for seen in cycles):
            cycles.append(cycle)
    return cycles


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_relative_and_from_imports_are_resolved(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("from . import storage\nfrom .base import CheckpointReader\n"
                      "def f():\n    from megallama import config\n")
    modules = {"megallama.checkpoint": "", "megallama.checkpoint.storage": "", "megallama.checkpoint.base": "",
               "megallama.config": "", "megallama.checkpoint.x": str(source)}
    assert _imported("megallama.checkpoint.x", str(source), modules) == {
        "megallama.checkpoint.storage", "megallama.checkpoint.base", "megallama.config"}


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" → ".join(cycle) for cycle in cycles)


def test_checkpoint_package_depends_on_neither_training_nor_inference():
    graph = import_graph()
    chains = [_path(graph, module, lambda m: m.startswith(("megallama.training", "megallama.inference")))
              for module in sorted(graph) if module.startswith("megallama.checkpoint")]
    chains = [chain for chain in chains if chain]
    assert not chains, "\n".join(" → ".join(chain) for chain in chains)
