"""What the head node imports stays light: Snakemake builds its DAG (on the login node and again
in every cluster job) and `fedsweep cluster-check` runs with these modules, where importing
torch, transformers, pandas or matplotlib would cost seconds per start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The modules the head node imports; none of them may import HEAVY.
HEAD_NODE_MODULES = [
    "fedsweep.modelspec",
    "fedsweep.dataspec",
    "fedsweep.estimate",
    "fedsweep.slurm",
    "fedsweep.cluster_check",
    "fedsweep.grid",
    "fedsweep.settings",
    "fedsweep.algorithm",
    "fedsweep.adapters",
    "fedsweep.schemes",
    "fedsweep.trainconfig",
    "fedsweep.config",
    "fedsweep.configfile",
    "fedsweep.inputs",
    "fedsweep.failures",
    "fedsweep.shard_sizes",
    "fedsweep.report",
    "fedsweep.status",
    "fedsweep.progress",
]
HEAVY = ["torch", "transformers", "pandas", "matplotlib"]


def test_head_node_modules_import_no_heavy_library():
    code = (
        "import importlib, sys\n"
        f"for name in {HEAD_NODE_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [], f"imported by {', '.join(HEAD_NODE_MODULES)}: {out.stdout.strip()}"


def test_checking_the_shipped_configs_imports_no_heavy_library():
    """What the Snakefile runs at every start (fedsweep.config.load: schema, grid, inputs, plans)
    on the demo's synthetic data and the paper's hub presets."""
    code = (
        "import sys\n"
        "from fedsweep import config\n"
        "for name in ('demo', 'config', 'llm'):\n"
        "    config.load([f'config/{name}.yaml'], '.')\n"
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [], out.stdout
