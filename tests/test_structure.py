"""The code's structure, checked on its source: no import cycles in effnet_exp/, imports at module level (the
optional heavy ones in effnet_exp/optional.py), no getattr defaults on config objects, and no branching on the
device's name outside effnet_exp/devices/."""
import ast
import os
import re
import subprocess
import sys

from conftest import REPO

PACKAGE = os.path.join(REPO, "effnet_exp")

# Function-level imports that have a reason to be there (the rest of the package imports at the top).
LAZY_IMPORTS = {
    ("effnet_exp/optional.py", "npu_bridge"), ("effnet_exp/optional.py", "matplotlib"),
    ("effnet_exp/optional.py", "PIL"), ("effnet_exp/optional.py", "sklearn"), ("effnet_exp/optional.py", "keras"),
    ("effnet_exp/optional.py", "mlflow"),
    # TensorFlow loaded once with stderr sent to run.log (its C++ start-up lines).
    ("effnet_exp/reporting/console.py", "tensorflow"),
    # Every spawn worker of the converter re-imports the tool's module: TensorFlow only in the parent.
    ("effnet_exp/tools/make_tfrecords.py", "effnet_exp"),
}


def modules():
    """{module name: (path relative to the repository, parsed tree)} of effnet_exp/."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, REPO).replace(os.sep, "/")
                module = rel[:-3].replace("/", ".")
                module = module[:-len(".__init__")] if module.endswith(".__init__") else module
                with open(path) as f:
                    found[module] = (rel, ast.parse(f.read(), rel))
    return found


def imported(node, module, is_package):
    """The effnet_exp modules an import statement names (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".")[:len(module.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join(parts + ([base] if base else []))
    return [base] + ["{}.{}".format(base, a.name) for a in node.names]


def import_graph():
    mods = modules()
    graph = {}
    for module, (rel, tree) in mods.items():
        is_package = rel.endswith("__init__.py")
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets.update(t for t in imported(node, module, is_package) if t in mods and t != module)
        graph[module] = targets
    return graph


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_effnet_exp():
    assert cycles(import_graph()) == []


def test_imports_are_at_module_level():
    late = []
    for module, (rel, tree) in sorted(modules().items()):
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    name = node.names[0].name if isinstance(node, ast.Import) else node.module or ""
                    if (rel, name.split(".")[0]) not in LAZY_IMPORTS:
                        late.append("{}:{} {}".format(rel, node.lineno, name))
    assert late == []


CONFIG_GETATTR = re.compile(r"getattr\(\s*\w*(cfg|config|conf)\w*\s*,")
DEVICE_NAME_TEST = re.compile(r"""\.name\s*[!=]=\s*["'](cpu|gpu|ascend)["']|["'](cpu|gpu|ascend)["']\s*[!=]=""")


def source_lines():
    for module, (rel, _) in sorted(modules().items()):
        with open(os.path.join(REPO, rel)) as f:
            for number, line in enumerate(f, 1):
                yield rel, number, line


def test_no_getattr_defaults_on_config_objects():
    found = ["{}:{}".format(rel, n) for rel, n, line in source_lines() if CONFIG_GETATTR.search(line)]
    assert found == []


def test_only_devices_know_the_device_names():
    found = ["{}:{}".format(rel, n) for rel, n, line in source_lines()
             if DEVICE_NAME_TEST.search(line) and not rel.startswith("effnet_exp/devices/")]
    assert found == []
    assert DEVICE_NAME_TEST.search('if device_cfg.name == "ascend":') and CONFIG_GETATTR.search(
        'getattr(device_cfg, "loss_scale", None)')


def test_config_and_validation_import_no_tensorflow():
    """run.py composes and validates the config before TensorFlow loads (a bad value costs no TF start-up)."""
    code = ("import sys; import effnet_exp.config, effnet_exp.validate, effnet_exp.resume, effnet_exp.run_folder; "
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, universal_newlines=True,
                         check=True).stdout
    assert out.strip() == "False"
