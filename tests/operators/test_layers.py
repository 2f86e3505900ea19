"""operators/ is the bottom layer: every operator module imports with `pipelines` unavailable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A meta-path finder placed first refuses `pipelines` and its submodules, as on a machine that has only the
# operators; any import of them, at module level or inside a module's top-level code, then fails loudly.
PROBE = r"""
import importlib, pkgutil, sys

class NoPipelines:
    def find_spec(self, name, path=None, target=None):
        if name == "pipelines" or name.startswith("pipelines."):
            raise ImportError(f"layer violation: {name} imported from operators")
        return None

sys.meta_path.insert(0, NoPipelines())
import operators
names = sorted(m.name for m in pkgutil.iter_modules(operators.__path__))
for name in names:
    importlib.import_module(f"operators.{name}")
assert not any(m == "pipelines" or m.startswith("pipelines.") for m in sys.modules), sorted(sys.modules)
print(" ".join(names))
"""


def test_every_operator_imports_without_pipelines():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    imported = set(out.stdout.split())
    on_disk = {p.stem for p in (REPO / "operators").glob("*.py") if p.stem != "__init__"}
    assert imported == on_disk, (imported, on_disk)


def test_the_probe_catches_an_upward_import(tmp_path):
    """The same probe fails when an operator reaches up: a copy of the package with one such import."""
    pkg = tmp_path / "operators"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text("from pipelines.runtime.config import ConfigError\n")
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode != 0
    assert "layer violation: pipelines" in out.stderr
