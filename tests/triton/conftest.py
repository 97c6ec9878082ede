"""Fixtures for the deploy tests: a toy export (see toy_export.py) and the tritonserver install (or a skip)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.triton.toy_export import build_toy_export


@pytest.fixture(scope="session")
def toy_export(tmp_path_factory) -> Path:
    return build_toy_export(tmp_path_factory.mktemp("export") / "toy")


@pytest.fixture(scope="session")
def tritonserver_install():
    """The tritonserver these tests run, or a skip that says why there is none."""
    from slim_trt.errors import MissingDependencyError

    try:
        from slim_trt.triton import find_tritonserver

        return find_tritonserver()
    except MissingDependencyError as e:
        pytest.skip(f"no tritonserver can be installed here: {e}")


_MEASURED: list[str] = []


@pytest.fixture
def report_measurement():
    """Lines that go into the test log (the terminal summary), whatever pytest's output capture."""
    return _MEASURED.append


def pytest_terminal_summary(terminalreporter):
    if _MEASURED:
        terminalreporter.section("slim-trt deploy: measured")
        for line in _MEASURED:
            terminalreporter.write_line(line)
