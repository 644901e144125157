"""The decode benchmark lives in the package: ``adafuse-bench`` (``adafuse_compile/bench/cli.py``).

    python benchmarks/bench_decode.py [adafuse-bench flags]   # same as adafuse-bench
"""

import sys

from adafuse_compile.bench import main

if __name__ == "__main__":
    sys.exit(main())
