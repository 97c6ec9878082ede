"""Fixtures the CLI tests share: a tiny LLaMA source folder and a compressed checkpoint of it (module-scoped)."""
import pytest

from tests.conftest import save_tiny_model
from tests.exporter.conftest import save_compressed_checkpoint


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("src") / "tiny-llama", "llama")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return save_compressed_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt", "llama")
