"""The package layers written in pyproject.toml ([tool.importlinter]) hold: runtime/ imports
nothing of saap_edge, exporters or torch; exporters import no training code; prune/ imports no
stage around it and its modules no cycle; models import no exporter. A change that breaks one
fails here with the import chain that broke it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold(capsys):
    pytest.importorskip("importlinter")
    from importlinter.cli import lint_imports

    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    out = capsys.readouterr().out
    assert code == 0, out[-4000:]
    assert out.count("KEPT") >= 5


@pytest.mark.parametrize("module, line, contract", [
    ("saap_edge/prune/groups.py", "from saap_edge import reconstruct  # noqa", "prune/ is the mathematics"),
    ("saap_edge/prune/hywia.py", "from saap_edge.prune import methods  # noqa", "no cycles"),
    ("runtime/base.py", "import torch  # noqa", "runtime/ runs on a device"),
])
def test_an_import_across_a_layer_breaks_its_contract(tmp_path, module, line, contract):
    """The contracts are not vacuous: the same tree with one forbidden import added fails."""
    pytest.importorskip("importlinter")
    for package in ("saap_edge", "exporters", "runtime"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / module, "a") as f:
        f.write("\n" + line + "\n")
    code = "from importlinter.cli import lint_imports; raise SystemExit(lint_imports(no_cache=True))"
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    broken = [ln for ln in run.stdout.splitlines() if ln.endswith("BROKEN")]
    assert len(broken) == 1 and contract in run.stdout.split("BROKEN")[0].rsplit("KEPT", 1)[-1], run.stdout[-3000:]
