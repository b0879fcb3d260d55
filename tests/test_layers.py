"""Layers 1-2 (anchors, delta, optim) import without Lightning; checked in a fresh interpreter."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

LAYERED = ["lifelong_delta.anchors", "lifelong_delta.delta", "lifelong_delta.optim"]

SCRIPT = """
import importlib, importlib.util, json, sys
imported = []
for name in {names!r}:
    if importlib.util.find_spec(name) is None:
        continue
    importlib.import_module(name)
    imported.append(name)
print(json.dumps({{"imported": imported,
                  "lightning": sorted(m for m in sys.modules if m.split(".")[0] in ("lightning",
                  "pytorch_lightning"))}}))
"""


def test_anchors_delta_optim_import_without_lightning():
    missing = [n for n in LAYERED if importlib.util.find_spec(n) is None]
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(names=LAYERED)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "lifelong_delta.anchors" in report["imported"]
    assert report["lightning"] == [], f"importing {report['imported']} pulled in {report['lightning'][:5]}"
    if missing:
        pytest.skip(f"not written yet: {missing} (the rest import without lightning)")
