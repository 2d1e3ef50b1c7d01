"""benchmarks/gpu_session.sh's smoke form: every mode a CPU runs, one markdown table, a row per mode."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_ON_CPU = ["dynamic", "bucket32", "tf32", "group4", "group8", "lora-qwen0.5b"]
SKIPPED_ON_CPU = ["nccl-2ranks", "compile-bucket32"]


def _rows(table: str) -> dict[str, list[str]]:
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:  # after the header and the |---| line
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(header), line
        rows[cells[0]] = dict(zip(header, cells))
    return rows


@pytest.mark.slow
def test_quick_session_on_cpu(tmp_path):
    out = tmp_path / "session"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "--device", "cpu", "--quick", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "gpu_session.md").read_text()
    assert table in proc.stdout  # printed as well as written
    assert table.startswith("**CPU")  # the device's name heads the table
    rows = _rows(table)
    assert list(rows) == RUN_ON_CPU + SKIPPED_ON_CPU  # one row per mode, in the order they ran
    for mode in RUN_ON_CPU:
        row = rows[mode]
        assert row["status"] == "ok", row
        for column in ("ex/s", "TFLOP/s", "peak GiB"):
            value = float(row[column])
            assert math.isfinite(value) and value > 0, (mode, column, value)
        assert 0 < float(row["MFU"].rstrip("%")) and 0 <= float(row["eval share"].rstrip("%")) < 100
        assert row["timed rounds"] == "2"  # round 1 (warm-up) left out
    for mode in SKIPPED_ON_CPU:
        assert rows[mode]["status"].startswith("skipped:"), rows[mode]
