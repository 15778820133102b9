"""Thin script: the same as ``supcon-stream bench throughput`` (``make bench-throughput``).

python bench/throughput.py --events 20000 --bank-items 20000   # a quick run
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "throughput", *sys.argv[1:]]))
