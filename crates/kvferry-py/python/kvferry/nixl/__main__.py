"""``python -m kvferry.nixl script.py args...``: runs an unmodified NIXL
program on kvferry (``import nixl`` loads :mod:`kvferry.nixl`)."""

from __future__ import annotations

import runpy
import sys


def main() -> None:
    """Installs the aliases and runs the script (or ``-m module``) as ``__main__``."""
    from . import install

    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m kvferry.nixl script.py [args...]\n       python -m kvferry.nixl -m module [args...]")
        sys.exit(0 if args else 2)
    install()
    if args[0] == "-m" and len(args) > 1:
        sys.argv = args[1:]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(args[0])))
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()
