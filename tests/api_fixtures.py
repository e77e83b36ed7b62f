"""Fixtures for the storage, worker and API tests (loaded by those modules with `pytest_plugins`):
a tiny random native model built on conftest's `tiny_tokenizer`, settings pointing at it and at a
fresh, migrated SQLite file, and a model wrapper that slows and counts forward passes.

PYTEST_DONT_REWRITE: the test modules import helpers from here before pytest loads it as a plugin.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from litestar import Litestar
from litestar.testing import TestClient
from transformers import PreTrainedTokenizerFast

from editor.db import migrate
from editor.models.base import DiffusionModel, SpecialIds
from editor.models.loading import load_model, save_native
from editor.models.transformer import BidirectionalTransformer, TransformerConfig
from editor.server import create_app
from editor.server.worker import ModelWorker
from editor.settings import Settings


def save_tiny_model(directory: Path, tokenizer: PreTrainedTokenizerFast) -> Path:
    """A random 2-layer native checkpoint on `tokenizer` (byte-level BPE with pad, bos and mask)."""
    config = TransformerConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64
    )
    with torch.random.fork_rng():
        torch.manual_seed(7)
        network = BidirectionalTransformer(config).eval()
    pad, bos, mask = tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.mask_token_id
    assert pad is not None and bos is not None and mask is not None
    special = SpecialIds(mask=mask, pad=pad, bos=bos, eos=pad)
    return save_native(network, tokenizer, special, directory, dtype=torch.float32)


class SlowModel:
    """A model whose forward passes each take at least `delay` seconds and are counted, so tests
    can fill the queue and cancel a stream mid-fill."""

    def __init__(self, model: DiffusionModel, delay: float) -> None:
        self._model = model
        self.delay = delay
        self.forwards = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    @property
    def device(self) -> torch.device:
        return self._model.device

    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self._forward()
        return self._model.forward_logits(input_ids, attention_mask)

    # The cached sampler's calls (WindowedModel) count as forward passes too.
    def score(self, *args: Any, **kwargs: Any) -> Any:
        self._forward()
        return self._model.score(*args, **kwargs)  # type: ignore[attr-defined]

    def score_window(self, *args: Any, **kwargs: Any) -> Any:
        self._forward()
        return self._model.score_window(*args, **kwargs)  # type: ignore[attr-defined]

    def _forward(self) -> None:
        self.forwards += 1
        time.sleep(self.delay)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """A tiny model gains nothing from intra-op threads, and on a busy machine OpenMP's spinning
    barriers make its fills up to 100x slower; restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def api_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("api_model") / "tiny", tiny_tokenizer)


@pytest.fixture(scope="session")
def api_model(api_model_dir: Path) -> DiffusionModel:
    return load_model(api_model_dir, device="cpu")


def make_settings(directory: Path, model_dir: Path, **overrides: Any) -> Settings:
    """Settings on a fresh, migrated SQLite file in `directory`, ignoring any .env file."""
    values: dict[str, Any] = {
        "database_url": f"sqlite:///{directory / 'editor.db'}",
        "model": str(model_dir),
        "device": "cpu",
        "batch_window_ms": 5.0,
        # Litestar's test client sends `Host: testserver.local`.
        "allowed_hosts": ["localhost", "127.0.0.1", "[::1]", "testserver.local"],
    }
    settings = Settings(_env_file=None, **(values | overrides))
    migrate.upgrade(settings.database_url)
    return settings


@pytest.fixture
def settings(tmp_path: Path, api_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Loopback, no token, the tiny model, a migrated database; EDITOR_* variables ignored."""
    for key in [k for k in os.environ if k.startswith("EDITOR_")]:
        monkeypatch.delenv(key)
    return make_settings(tmp_path, api_model_dir)


def app_for(settings: Settings, model: Any) -> Litestar:
    """The app on `settings` with a worker that serves `model` (no loading from disk)."""
    return create_app(settings, worker=ModelWorker(settings, loader=lambda: model))


@pytest.fixture
def client(settings: Settings, api_model: DiffusionModel) -> Iterator[TestClient[Litestar]]:
    """A test client on a ready app with the tiny model."""
    app = app_for(settings, api_model)
    with TestClient(app) as test_client:
        assert app.state.worker.wait_ready(10)
        yield test_client


def load_slow_model(model_dir: Path, delay: float) -> Any:
    """A model loader for another process (a Ray replica loads it there): the checkpoint at
    `model_dir` on the CPU in float32 (as in this process, see conftest), each forward pass slowed
    by `delay` seconds."""
    return SlowModel(load_model(model_dir, device="cpu", dtype=torch.float32), delay)


def wait_for(
    client: TestClient[Litestar], job_id: int, done: Callable[[dict[str, Any]], bool], timeout: float = 60
) -> dict[str, Any]:
    """The batch job's status once `done` says so (or when `timeout` runs out: the caller asserts)."""
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get(f"/api/v1/batches/{job_id}").json()
        if done(body) or time.monotonic() > deadline:
            return body
        time.sleep(0.02)


def results(client: TestClient[Litestar], job_id: int) -> list[dict[str, Any]]:
    """A batch job's JSONL results, parsed."""
    response = client.get(f"/api/v1/batches/{job_id}/results")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/jsonl")
    return [json.loads(line) for line in response.text.splitlines()]
