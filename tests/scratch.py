"""Directories for module-scoped fixtures that go when their module passes.

pyproject's `tmp_path_retention_policy = "failed"` deletes a passing test's `tmp_path` at once,
but a module fixture's `tmp_path_factory.mktemp` directory lives until the session ends; the
largest (checkpoints of a dozen runs) are made with `module_dir` instead, so the suite's disk use
peaks at about one module's worth. A module with a failure keeps its directory for a look."""
import shutil
from pathlib import Path

import pytest


def module_dir(request: pytest.FixtureRequest, name: str) -> Path:
    """`tmp_path_factory.mktemp(name)`, removed when the requesting fixture's scope ends with no
    new failure or error in the session."""
    path = request.getfixturevalue("tmp_path_factory").mktemp(name)
    failed_before = request.session.testsfailed

    def drop():
        if request.session.testsfailed == failed_before:
            shutil.rmtree(path, ignore_errors=True)

    request.addfinalizer(drop)
    return path
