"""The repository as a reader meets it: it stands alone (no file points outside it), its top-level modules import
each other without a cycle, and every top-level .py file explains itself (comment and docstring lines)."""
import ast
import io
import os
import re
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP = sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))
# (written with a [] around one letter of each, so that this file does not match its own pattern)
OUTSIDE = re.compile(r"DESIG[N]|molmo2_referenc[e]|share[d]/|anchors\.m[d]|context_parallel\.m[d]|issu[e]", re.IGNORECASE)
MIN_COMMENT_SHARE = 0.20


def comment_share(path):
    """(comment lines, all non-blank lines) of a Python file. A comment line is a line that holds only a # comment
    (a comment after code on its line does not count) or a line of a docstring (the string statement that opens a
    module, class or function)."""
    src = open(path).read()
    text = src.splitlines()
    lines = {i + 1 for i, l in enumerate(text) if l.strip()}
    commented = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(src).readline)
                 if tok.type == tokenize.COMMENT and not text[tok.start[0] - 1][:tok.start[1]].strip()}
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
                    and isinstance(first.value.value, str):
                commented |= set(range(first.lineno, first.end_lineno + 1))
    return len(commented & lines), len(lines)


def import_graph():
    """{module: set of top-level modules it imports (anywhere in the file)}."""
    mods = {f[:-3] for f in TOP}
    graph = {}
    for f in TOP:
        deps = set()
        for n in ast.walk(ast.parse(open(os.path.join(ROOT, f)).read())):
            if isinstance(n, ast.Import):
                deps |= {a.name.split(".")[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                deps.add(n.module.split(".")[0])
        graph[f[:-3]] = deps & mods - {f[:-3]}
    return graph


def test_no_file_points_outside_the_repository():
    hits = []
    for dirpath, _, files in os.walk(ROOT):
        rel = os.path.relpath(dirpath, ROOT)
        if rel.startswith((".", "docs", "out")) and rel != ".":
            continue
        for f in files:
            if f.endswith((".py", ".md")) and (rel == "." or rel.startswith(("config", "tests"))):
                for i, line in enumerate(open(os.path.join(dirpath, f)), 1):
                    if OUTSIDE.search(line):
                        hits.append(f"{os.path.join(rel, f)}:{i}: {line.strip()[:80]}")
    assert not hits, "\n".join(hits)


def test_top_level_modules_import_without_a_cycle():
    graph = import_graph()
    state = {}

    def visit(m, path):
        if state.get(m) == "open":
            raise AssertionError("import cycle: " + " -> ".join(path + [m]))
        if state.get(m) == "done":
            return
        state[m] = "open"
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = "done"
    for m in sorted(graph):
        visit(m, [])


def test_every_top_level_file_is_at_least_a_fifth_comment():
    low = {}
    for f in TOP:
        c, n = comment_share(os.path.join(ROOT, f))
        if c < MIN_COMMENT_SHARE * n:
            low[f] = f"{c}/{n} = {c / n:.0%}"
    assert not low, f"comment and docstring lines under {MIN_COMMENT_SHARE:.0%}: {low}"


if __name__ == "__main__":  # python tests/test_repo.py: the figures for every top-level file, and the import graph
    for f in TOP:
        c, n = comment_share(os.path.join(ROOT, f))
        print(f"{f:<18} {c:5d} of {n:5d} non-blank lines are comments or docstrings: {c / n:.0%}")
    for m, deps in sorted(import_graph().items()):
        print(f"{m:<14} imports {', '.join(sorted(deps)) or '-'}")
