"""Run every benchmark in turn (``make bench``); each prints a markdown table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent

if __name__ == "__main__":
    quick = ["--quick"] if "--quick" in sys.argv else []
    for script in ("bench_extract.py", "bench_heads.py"):
        print(f"\n## {script}\n", flush=True)
        subprocess.run([sys.executable, str(HERE / script), *quick], check=True)
