#!/usr/bin/env python3
"""Checks the library's import graph against its layers (docs/ARCHITECTURE.md).

    python3 scripts/layers.py [--graph]

Each top-level module of crates/kvferry/src may import (`crate::x`) only the
modules listed before it in LAYERS; a backend folder may not import another
backend folder; the files of one folder import one another without a cycle. Doc comments, comments and `#[cfg(test)]` modules do not
count. Exits 1 and names each offending file and edge; `--graph` prints the
edges found.
"""
import os
import re
import sys

# Lowest first: a module may use only what comes before it.
LAYERS = [
    "error", "types", "codec", "params", "host", "sys", "cuda", "os", "auth", "admission",
    "notif", "mem", "desc", "storage", "metadata", "backend", "telemetry", "request", "agent",
]
SRC = os.path.join(os.path.dirname(__file__), "..", "crates", "kvferry", "src")


def code_of(text):
    text = re.split(r"#\[cfg\(test\)\]\s*mod tests", text)[0]
    lines = [l for l in text.splitlines() if not l.lstrip().startswith("//")]
    return "\n".join(l.split(" // ")[0] for l in lines)


def sibling_cycles():
    """Cycles among the files of one folder (`super::x` between siblings;
    a file's own parent `mod.rs` does not count)."""
    out = []
    for root, _, files in os.walk(SRC):
        names = {f.removesuffix(".rs") for f in files if f.endswith(".rs") and f != "mod.rs"}
        names |= {d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))}
        edges = {}
        for f in files:
            if not f.endswith(".rs") or f in ("mod.rs", "lib.rs"):
                continue
            me = f.removesuffix(".rs")
            code = code_of(open(os.path.join(root, f)).read())
            edges[me] = {m for m in re.findall(r"\bsuper::([a-z_]+)", code) if m in names and m != me}
        seen, stack = set(), []

        def visit(n):
            if n in stack:
                out.append(f"{os.path.relpath(root, SRC)}: import cycle " + " -> ".join(stack[stack.index(n):] + [n]))
                return
            if n in seen:
                return
            seen.add(n)
            stack.append(n)
            for m in sorted(edges.get(n, ())):
                visit(m)
            stack.pop()

        for n in sorted(edges):
            visit(n)
    return out


def main():
    rank = {m: i for i, m in enumerate(LAYERS)}
    bad, graph = [], {}
    for root, _, files in os.walk(SRC):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, SRC)
            parts = rel.split(os.sep)
            top = parts[0].removesuffix(".rs")
            if top == "lib":
                continue
            if top not in rank:
                bad.append(f"{rel}: module '{top}' has no layer; add it to LAYERS in scripts/layers.py")
                continue
            code = code_of(open(path).read())
            for m in sorted(set(re.findall(r"\bcrate::([a-z_]+)", code)) - {top}):
                graph.setdefault(top, set()).add(m)
                if m in rank and rank[m] > rank[top]:
                    bad.append(f"{rel}: '{top}' imports '{m}', a higher layer")
            if top == "backend" and len(parts) > 2:
                own = parts[1]
                for other in sorted(set(re.findall(r"\bcrate::backend::([a-z_]+)", code))):
                    if other != own and os.path.isdir(os.path.join(SRC, "backend", other)):
                        bad.append(f"{rel}: backend '{own}' imports backend '{other}'")
                for other in sorted(set(re.findall(r"\bsuper::super::([a-z_]+)", code))):
                    if other != own and os.path.isdir(os.path.join(SRC, "backend", other)):
                        bad.append(f"{rel}: backend '{own}' imports backend '{other}'")
    bad += sibling_cycles()
    if "--graph" in sys.argv:
        for k in sorted(graph, key=lambda m: rank.get(m, 99)):
            print(f"{k:10} -> {' '.join(sorted(graph[k], key=lambda m: rank.get(m, 99)))}")
    for b in bad:
        print(b)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
