"""Kernel throughput vs pandas: the same as ``scopemeter bench compute`` (see compute/benchmark.py)."""

from __future__ import annotations

import sys

from ops.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "compute", *sys.argv[1:]]))
