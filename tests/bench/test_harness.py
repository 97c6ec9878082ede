"""bench/harness.py's peer helpers, shared by bench/accuracy.py and bench/speed.py: where a peer's venv is, the
one-line error when it is missing, its package version read without importing it, and a log's last lines."""
from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))  # the bench modules import their sibling harness by name
import harness  # noqa: E402


def test_a_missing_peer_venv_is_a_failed_row_saying_how_to_make_it(tmp_path):
    with pytest.raises(harness.RowFailed) as e:
        harness.peer_python(tmp_path, "modelopt", "bench-peers")
    assert e.value.error.startswith(f"no venv for modelopt at {tmp_path / '.venv-modelopt'}: create it with "
                                    f"`make bench-peers`")
    assert "requirements-modelopt.txt" in e.value.error and e.value.log_tail is None and e.value.report is None
    py = harness.venv_python(tmp_path, "modelopt")
    py.parent.mkdir(parents=True)
    py.write_text("")
    assert harness.peer_python(tmp_path, "modelopt", "bench-peers") == py


def test_venv_version_reads_the_interpreters_own_packages(tmp_path):
    assert harness.venv_version(Path(sys.executable), "pytest") == importlib.metadata.version("pytest")
    assert harness.venv_version(Path(sys.executable), "no-such-package-here") is None
    assert harness.venv_version(tmp_path / "missing" / "python", "pytest") is None


def test_log_tail_and_peer_env(tmp_path):
    log = tmp_path / "peer.log"
    log.write_text("".join(f"line {i}\n" for i in range(20)) + "\n")
    assert harness.log_tail(log) == "\n".join(f"line {i}" for i in range(5, 20))
    assert harness.log_tail(log, 1) == "line 19"
    assert harness.log_tail(tmp_path / "none.log") == ""
    env = harness.peer_env()
    assert env["PYTHONPATH"] == "" and env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["PATH"] == os.environ["PATH"]


def test_portable_path_keeps_a_linked_sibling_relative(tmp_path, monkeypatch):
    data = tmp_path / "elsewhere" / "data"
    data.mkdir(parents=True)
    (data / "test.txt").write_text("x")
    checkouts = tmp_path / "wt"
    (checkouts / "repo").mkdir(parents=True)
    (checkouts / "shared").symlink_to(tmp_path / "elsewhere")  # a worktree whose ../shared links to the data
    monkeypatch.setattr(harness, "REPO", checkouts / "repo")
    assert harness.portable_path(str(checkouts / "shared" / "data" / "test.txt")) == "../shared/data/test.txt"
    assert harness.portable_path(str(data / "test.txt")) == str((data / "test.txt").resolve())  # not beside it
