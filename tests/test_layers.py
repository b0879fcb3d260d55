"""Layers 1-2 (anchors, delta, optim) import without Lightning; checked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

LAYERED = ["lifelong_delta.anchors", "lifelong_delta.delta", "lifelong_delta.optim"]

# every module of the three packages, not only what their __init__ pulls in
SCRIPT = """
import importlib, json, pkgutil, sys
imported = []
for name in {names!r}:
    pkg = importlib.import_module(name)
    imported.append(name)
    for info in pkgutil.walk_packages(pkg.__path__, prefix=name + "."):
        importlib.import_module(info.name)
        imported.append(info.name)
print(json.dumps({{"imported": imported,
                  "lightning": sorted(m for m in sys.modules if m.split(".")[0] in ("lightning",
                  "pytorch_lightning"))}}))
"""


def test_anchors_delta_optim_import_without_lightning():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(names=LAYERED)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(LAYERED) <= set(report["imported"])
    assert {"lifelong_delta.delta.analytic_q", "lifelong_delta.delta.io", "lifelong_delta.optim.adamr"} <= set(
        report["imported"]
    )
    assert report["lightning"] == [], f"importing {report['imported']} pulled in {report['lightning'][:5]}"
