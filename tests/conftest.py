from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_curves(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Drawing curves.png at the end of each of the suite's hundreds of runs would cost a minute:
    in this process, runs draw none but where a test asks for them (``@pytest.mark.curves``)."""
    if request.node.get_closest_marker("curves") is None:
        from engine_plugins import metrics_file

        monkeypatch.setattr(metrics_file, "plot", lambda run_dirs, out: None)


# The hashes of the exports this machine verified (plugins/inference) go to a cache of the test
# session's own, not the user's.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="engine-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)


@pytest.fixture(autouse=True)
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test runs in its own directory, so `runs/` (the default runs_dir) is written there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def fresh_modules(monkeypatch: pytest.MonkeyPatch):
    """Forget plugin modules a test imports by name, so the next test imports its own version."""
    names: list[str] = []

    def forget(*modules: str) -> None:
        for name in modules:
            names.append(name)
            monkeypatch.delitem(sys.modules, name, raising=False)

    yield forget
    for name in names:
        sys.modules.pop(name, None)


@pytest.fixture
def write_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_modules):
    """Write a plugin module into tmp_path (on sys.path) and return its name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(source)
        fresh_modules(name)
        return name

    return write
