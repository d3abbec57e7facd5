"""Which rwkv_cuda kernels gpu_check.sh's end-to-end runs use: the fastest among those no CUDA test failed for,
timed in bf16 at H=12 when timed there (the 0.1B model's heads), else at the main shape.

    python benchmarks/pick_wkv_bwd.py PYTEST_OUTPUT BENCH_JSON             (prints new, chunk, fused, scan or old)
    python benchmarks/pick_wkv_bwd.py --forward PYTEST_OUTPUT BENCH_JSON   (prints seq or chunk)

Backward: by forward+backward time of the "rwkv_cuda bwd=X" rows (sequential forward). Forward: "chunk" when
its rows ("rwkv_cuda fwd=chunk bwd=X") time a faster forward than the sequential rows. A backward "failed"
when a FAILED/ERROR line of the pytest output names it as its test parameter, except in the chunk forward's
own tests (test_chunk_forward_*), whose failures count against the chunk forward. Without pytest's closing
summary line (a run cut off by its time cap, or a missing file) nothing counts as tested and the answers are
the defaults, "new" and "seq"; likewise with nothing timed.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

VARIANTS = ("new", "chunk", "fused", "scan", "old")


def tests_finished(pytest_text: str) -> bool:
    """Whether pytest got to its closing summary ("12 passed, 3 skipped in 9.08s")."""
    return re.search(r"\b\d+ (passed|failed|error|errors)\b[^\n]* in [\d.]+s", pytest_text) is not None


def _failed_lines(pytest_text: str) -> list:
    return [line for line in pytest_text.splitlines() if line.startswith(("FAILED", "ERROR"))]


def failed_variants(pytest_text: str) -> set:
    bad = set()
    for line in _failed_lines(pytest_text):
        if "chunk_forward" not in line:
            bad.update(v for v in VARIANTS if re.search(rf"[\[-]{v}[\]-]", line))
    return bad


def _timed(bench: dict, pattern: str, column: str) -> dict:
    """{variant: ms} of the bf16 rows matching pattern (group 1: the variant), H=12 rows if any, else the rest."""
    timed = {}
    for r in bench.get("results", []):
        m = re.fullmatch(pattern + r"( H=12)?", r["impl"])
        if m and r["dtype"] == "bf16":
            timed.setdefault(bool(m.group(2)), {})[m.group(1)] = r[column]
    return timed.get(True) or timed.get(False) or {}


def pick(pytest_text: str, bench: dict) -> str:
    if not tests_finished(pytest_text):
        return "new"
    bad = failed_variants(pytest_text)
    rows = {v: ms for v, ms in _timed(bench, r"rwkv_cuda bwd=(\w+)", "fwd_bwd_ms").items() if v not in bad}
    if rows:
        return min(rows, key=rows.get)
    return next((v for v in VARIANTS if v not in bad), "new")


def pick_forward(pytest_text: str, bench: dict) -> str:
    if not tests_finished(pytest_text) or any("chunk_forward" in line for line in _failed_lines(pytest_text)):
        return "seq"
    seq = _timed(bench, r"rwkv_cuda bwd=(\w+)", "fwd_ms")
    chunk = _timed(bench, r"rwkv_cuda fwd=chunk bwd=(\w+)", "fwd_ms")
    return "chunk" if seq and chunk and min(chunk.values()) < min(seq.values()) else "seq"


def main(argv: list) -> int:
    forward = argv[:1] == ["--forward"]
    argv = argv[1:] if forward else argv
    text = Path(argv[0]).read_text() if Path(argv[0]).exists() else ""
    bench = json.loads(Path(argv[1]).read_text()) if Path(argv[1]).exists() else {}
    print(pick_forward(text, bench) if forward else pick(text, bench))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
