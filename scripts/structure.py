"""Structure figures of issue 21, by an AST count of `src/jaxlayer`.

    python scripts/structure.py [src/jaxlayer]

Import cycles (lazy imports included), the largest classes and files,
`x._private` reads and writes on objects other than `self`/`cls`, private
names imported from another module, and `object.__setattr__` calls.
"""

import ast
import collections
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "src/jaxlayer")
base = root.parent
modules = {}
for path in sorted(root.rglob("*.py")):
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    modules[".".join(parts)] = path


def resolve(name):
    return name if name in modules else None


graph = collections.defaultdict(set)
private_imports, private_attrs, setattrs = (
    [],
    collections.Counter(),
    collections.Counter(),
)
classes, files = [], []
for mod, path in modules.items():
    text = path.read_text()
    tree = ast.parse(text)
    files.append((len(text.splitlines()), mod))
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if resolve(a.name):
                    graph[mod].add(a.name)
        elif isinstance(node, ast.ImportFrom):
            src = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                src = ".".join(up + ([src] if src else []))
            for a in node.names:
                target = resolve(f"{src}.{a.name}") or resolve(src)
                if target:
                    graph[mod].add(target)
                    if (
                        a.name.startswith("_")
                        and not a.name.startswith("__")
                        and not resolve(f"{src}.{a.name}")
                    ):
                        private_imports.append(f"{mod}: {src}.{a.name}")
        elif isinstance(node, ast.ClassDef):
            classes.append((node.end_lineno - node.lineno + 1, f"{mod}.{node.name}"))
        elif isinstance(node, ast.Attribute):
            a = node.attr
            if a.startswith("_") and not a.startswith("__"):
                v = node.value
                mine = isinstance(v, ast.Name) and v.id in ("self", "cls")
                # `super()._hook(...)`: the class's own method.
                mine = mine or (
                    isinstance(v, ast.Call)
                    and isinstance(v.func, ast.Name)
                    and v.func.id == "super"
                )
                if not mine:
                    private_attrs[mod] += 1
        elif isinstance(node, ast.Call):
            f = node.func
            if (
                isinstance(f, ast.Attribute)
                and f.attr == "__setattr__"
                and isinstance(f.value, ast.Name)
                and f.value.id == "object"
            ):
                setattrs[mod] += 1

# Cycles: strongly connected components of more than one module.
index, low, stack, on, sccs = {}, {}, [], set(), []


def strong(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph[v]:
        if w not in index:
            strong(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            sccs.append(sorted(comp))


for m in list(modules):
    if m not in index:
        strong(m)
print("import cycles (SCCs):", len(sccs))
for c in sccs:
    print("   ", " <-> ".join(c))
print("largest classes:", sorted(classes, reverse=True)[:4])
print("largest files:", sorted(files, reverse=True)[:5])
print(
    "x._private on non-self:",
    sum(private_attrs.values()),
    dict(private_attrs.most_common()),
)
print("private names imported:", len(private_imports), private_imports)
print("object.__setattr__:", sum(setattrs.values()), dict(setattrs))
