#!/usr/bin/env python3
"""Lists library functions longer than a limit (default 80 lines).

    python3 scripts/long_fns.py [--limit 80] [PATH ...]

A function may be longer when the line just above its doc/attributes or
signature says why, with a comment starting `// Long:`. Counting is by
braces on lines with strings and comments stripped: good enough for this
code base's style (rustfmt), not a Rust parser. Exits 1 when it finds any.
"""
import argparse
import pathlib
import re
import sys

FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(async\s+)?(unsafe\s+)?(const\s+)?fn\s+(\w+)")


def strip(line):
    line = re.sub(r'"(\\.|[^"\\])*"', '""', line)
    line = re.sub(r"'(\\.|[^'\\])'", "''", line)
    return line.split("//", 1)[0]


def scan(path, limit):
    lines = path.read_text().splitlines()
    out = []
    i = 0
    in_test = None
    while i < len(lines):
        m = FN.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        depth, opened, j = 0, False, i
        while j < len(lines):
            s = strip(lines[j])
            if not opened and ";" in s and "{" not in s:
                break  # a declaration without a body
            depth += s.count("{") - s.count("}")
            opened = opened or "{" in s
            if opened and depth <= 0:
                break
            j += 1
        n = j - start + 1
        k = start - 1
        while k >= 0 and (lines[k].strip().startswith(("///", "#[", "//!")) or lines[k].strip() == ""):
            if lines[k].strip() == "":
                break
            k -= 1
        reason = k >= 0 and lines[k].strip().startswith("// Long:")
        if opened and n > limit and not reason:
            out.append((n, f"{path}:{start + 1}", m.group(6)))
        i = start + 1
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=80)
    ap.add_argument("paths", nargs="*", default=["crates/kvferry/src", "crates/kvferry-cli/src"])
    a = ap.parse_args()
    found = []
    for p in a.paths:
        for f in sorted(pathlib.Path(p).rglob("*.rs")):
            found += scan(f, a.limit)
    for n, where, name in sorted(found, reverse=True):
        print(f"{n:5} {where} {name}")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
