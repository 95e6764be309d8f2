"""The package layers written in pyproject.toml ([tool.importlinter]) hold: runtime/ imports
nothing of saap_edge, exporters or torch; exporters import no training code; models import no
exporter. A change that breaks one fails here with the import chain that broke it."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold(capsys):
    pytest.importorskip("importlinter")
    from importlinter.cli import lint_imports

    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    out = capsys.readouterr().out
    assert code == 0, out[-4000:]
    assert out.count("KEPT") >= 3
