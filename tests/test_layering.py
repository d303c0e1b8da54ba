"""The import structure: layers that import only downwards, no cycles, TensorFlow only in input_pipeline's record
modules, and no private name used outside its module. Parses the sources (no import), so it runs in a second.

The layers, lowest first, as docs/architecture.md draws them."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fvlm_jax", "input_pipeline", "configs")

# Rank of each module (a prefix names a package or a group of modules). An import may only go to the same or a
# lower rank, and the graph of modules must have no cycle.
LAYERS = [
    ("data", ["input_pipeline"]),
    ("core", ["fvlm_jax.layout", "fvlm_jax.prefetch", "fvlm_jax.plots", "fvlm_jax.text_lengths",
              "fvlm_jax.anatomy", "fvlm_jax.losses", "fvlm_jax.sharding", "fvlm_jax.augment", "fvlm_jax.synthetic",
              "fvlm_jax.scan_figure", "fvlm_jax.eval_stats"]),
    ("models", ["fvlm_jax.models"]),
    ("training and inference", ["fvlm_jax.train_state", "fvlm_jax.train_step", "fvlm_jax.checkpoint",
                                "fvlm_jax.train_log", "fvlm_jax.train", "fvlm_jax.evaluate", "fvlm_jax.zero_shot",
                                "fvlm_jax.export", "fvlm_jax.portable", "fvlm_jax.predict", "fvlm_jax.flops",
                                "fvlm_jax.pretrained"]),
    ("orchestration", ["fvlm_jax.config_checks", "fvlm_jax.stages", "fvlm_jax.tools"]),
    ("configs", ["configs"]),
    ("entry points", ["run"]),
]
# TensorFlow (and tensorflow_datasets) imported only here (input_pipeline.records and .tfdata take them from it);
# everything else runs without it.
TENSORFLOW_MODULES = {"input_pipeline.tf_modules"}


def project_files():
    files = {"run": ROOT / "run.py"}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            files[name] = path
    return files


def rank(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layering.py (and docs/architecture.md)")
    return best[0]


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """Project modules imported anywhere in the file (top level or inside functions)."""
    out = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def graph():
    files = project_files()
    return files, {m: imports_of(p, m, set(files)) for m, p in files.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(edges):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_every_module_has_a_layer_and_imports_only_downwards():
    _, edges = graph()
    upward = [f"{a} ({LAYERS[rank(a)][0]}) imports {b} ({LAYERS[rank(b)][0]})"
              for a, targets in sorted(edges.items()) for b in sorted(targets)
              if not b.endswith("__init__") and rank(b) > rank(a)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle():
    _, edges = graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_finds_what_it_should():
    """The checks themselves: an upward edge, a cycle, a layer-less module."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    assert rank("fvlm_jax.models.fvlm") > rank("fvlm_jax.losses") > rank("input_pipeline.tfdata")
    assert rank("fvlm_jax.stages") > rank("fvlm_jax.train")
    with pytest.raises(AssertionError, match="no layer"):
        rank("fvlm_jax.not_a_module_in_any_layer")


def test_tensorflow_only_in_the_record_modules():
    files = project_files()
    direct = set()
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in ("tensorflow", "tensorflow_datasets") for n in names):
                direct.add(module)
    assert direct == TENSORFLOW_MODULES


def private_uses(path: Path, known: set[str]) -> list[str]:
    """`module._name` and `from module import _name` where module is a project module (dunders allowed)."""
    tree = ast.parse(path.read_text())
    aliases = {}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in known:
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in known:
                    aliases[a.asname or a.name] = full
                elif node.module in known and a.name.startswith("_") and not a.name.startswith("__"):
                    out.append(f"{path.name}:{node.lineno} from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            out.append(f"{path.name}:{node.lineno} {aliases[node.value.id]}.{node.attr}")
    return out


def test_no_private_name_used_outside_its_module():
    files = project_files()
    known = set(files)
    paths = list(files.values()) + sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
    found = [u for p in paths for u in private_uses(p, known)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_private_use_checker_sees_both_forms(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from fvlm_jax import train\nfrom fvlm_jax.train import _hidden\ntrain._loop()\ntrain.__name__\n")
    found = private_uses(f, {"fvlm_jax", "fvlm_jax.train"})
    assert len(found) == 2 and "_hidden" in found[0] and "fvlm_jax.train._loop" in found[1]


def test_no_bench_script_hides_a_package():
    """`python bench/x.py` puts bench/ first on sys.path: a bench/input_pipeline.py would be imported instead of the
    input_pipeline package (configs/demo.py imports it), breaking every bench script."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages >= {"fvlm_jax", "input_pipeline", "configs"}
    assert not {p.stem for p in (ROOT / "bench").glob("*.py")} & packages
