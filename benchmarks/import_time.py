"""Import time of the core and the CLI's start-up path, as a ratio to a bare interpreter.

python benchmarks/import_time.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

# what `caikit plugins` and `caikit config show` import before doing any work
CORE = (
    "import caikit_core, caikit_core.cli, caikit_core.config;"
    "from caikit_core.plugins import get_registry; get_registry()"
)


def _time(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    base, core = [], []
    for _ in range(args.repeats):  # alternate so drift hits both equally
        base.append(_time("pass"))
        core.append(_time(CORE))
    b, c = statistics.median(base), statistics.median(core)
    print(f"bare interpreter: median {b * 1000:.0f} ms")
    print(f"core + registry:  median {c * 1000:.0f} ms")
    print(f"ratio core/bare:  {c / b:.2f}x  (import cost {1000 * (c - b):.0f} ms)")


if __name__ == "__main__":
    main()
