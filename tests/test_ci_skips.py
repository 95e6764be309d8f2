"""Under CI=true a test that skips for a missing dependency fails (tests/conftest.py), so a
package that quietly goes missing from CI cannot turn tests into skips."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

PROBE = '''
import pytest

def test_needs_a_missing_package():
    pytest.importorskip("a_package_no_one_installs")

@pytest.mark.gpu
def test_on_a_gpu():
    pytest.importorskip("a_package_no_one_installs")
'''


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci else {})
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_probe.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True)


def test_a_missing_dependency_fails_under_ci_and_skips_elsewhere(tmp_path):
    ci = _run(tmp_path, "true")
    assert ci.returncode == 1 and "1 failed" in ci.stdout and "1 skipped" in ci.stdout, ci.stdout[-2000:]
    assert "CI=true: a dependency is missing" in ci.stdout
    local = _run(tmp_path, None)
    assert local.returncode == 0 and "2 skipped" in local.stdout, local.stdout[-2000:]
