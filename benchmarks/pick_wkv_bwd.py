"""Which rwkv_cuda backward gpu_check.sh's end-to-end runs use: the fastest (bf16 forward+backward, at H=12 when
timed there, the 0.1B model's heads, else at the main shape) among the backwards no CUDA test failed for.

    python benchmarks/pick_wkv_bwd.py PYTEST_OUTPUT BENCH_JSON     (prints new, chunk, fused or old)

A backward "failed" when a FAILED/ERROR line of the pytest output names it as its test parameter. Missing
files count as nothing timed / nothing failed; with nothing timed the answer is "new", the default.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

VARIANTS = ("new", "chunk", "fused", "old")


def failed_variants(pytest_text: str) -> set:
    bad = set()
    for line in pytest_text.splitlines():
        if line.startswith(("FAILED", "ERROR")):
            bad.update(v for v in VARIANTS if re.search(rf"[\[-]{v}[\]-]", line))
    return bad


def pick(pytest_text: str, bench: dict) -> str:
    bad = failed_variants(pytest_text)
    timed = {}
    for r in bench.get("results", []):
        m = re.fullmatch(r"rwkv_cuda bwd=(\w+)( H=12)?", r["impl"])
        if m and r["dtype"] == "bf16" and m.group(1) not in bad:
            timed.setdefault(bool(m.group(2)), {})[m.group(1)] = r["fwd_bwd_ms"]
    rows = timed.get(True) or timed.get(False)
    if rows:
        return min(rows, key=rows.get)
    return next((v for v in VARIANTS if v not in bad), "new")


def main(argv: list) -> int:
    text = Path(argv[0]).read_text() if Path(argv[0]).exists() else ""
    bench = json.loads(Path(argv[1]).read_text()) if Path(argv[1]).exists() else {}
    print(pick(text, bench))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
