"""Fixtures for the end-to-end tests of the web editor: a real uvicorn server on a free loopback
port (in a thread, with the tiny random model slowed a little so fills can be watched and
stopped) and Debian's headless Chromium driven by Playwright.

PYTEST_DONT_REWRITE: test modules import helpers from here before pytest loads it as a plugin.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from playwright.sync_api import Browser, Page, sync_playwright

from editor.canvas import SpanAlternative, SpanFill, split_literals
from editor.db.services import NewRevision, Store
from editor.models.base import DiffusionModel
from editor.models.loading import load_model
from editor.parser import parse_document
from editor.server import create_app
from editor.server.worker import ModelWorker
from tests.api_fixtures import SlowModel, make_settings
from tests.servers import free_port

CHROMIUM = Path(os.environ.get("EDITOR_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
STEP_DELAY = 0.02  # seconds per forward pass: fills take a fraction of a second but are visible


@dataclass
class LiveServer:
    url: str
    model: SlowModel
    api: httpx.Client
    store: Store

    def new_document(self, source: str, title: str = "Letter") -> int:
        response = self.api.post("/api/v1/documents", json={"title": title, "source": source})
        assert response.status_code == 201, response.text
        return int(response.json()["id"])

    def fill(self, document_id: int, **body: Any) -> dict[str, Any]:
        response = self.api.post(f"/api/v1/documents/{document_id}/fill", json=body)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def store_fill(self, document_id: int, fills: list[tuple[str, list[SpanAlternative]]]) -> int:
        """Store a fill of the document's source with these span texts and alternatives, as a run
        of judged candidates leaves it (the tiny model runs one candidate); returns its number."""
        source = self.api.get(f"/api/v1/documents/{document_id}").json()["source"]
        literals, spans = split_literals(parse_document(source))
        text, records = literals[0], []
        for span, (fill, alternatives) in zip(spans, fills, strict=True):
            start = len(text)
            text += fill + literals[span.index + 1]
            ids = list(range(1, len(fill.split()) + 2))
            records.append(
                SpanFill(
                    index=span.index,
                    name=span.name,
                    start=start,
                    end=start + len(fill),
                    text=fill,
                    token_ids=ids,
                    confidence=0.9,
                    alternatives=alternatives,
                )
            )
        new = NewRevision(
            source=source,
            text=text,
            spans=records,
            model="judged",
            seed=1,
            options={"seed": 1},
            steps=8,
            queued_s=0.0,
            fill_s=0.5,
            total_s=0.5,
        )
        return self.store.add_revision(document_id, new).number

    def revisions(self, document_id: int) -> list[dict[str, Any]]:
        items = self.api.get(f"/api/v1/documents/{document_id}/revisions?limit=100").json()["items"]
        return [self.api.get(f"/api/v1/documents/{document_id}/revisions/{r['number']}").json() for r in items]


@pytest.fixture(scope="module")
def live_server(
    tmp_path_factory: pytest.TempPathFactory, api_model_dir: Path, api_model: DiffusionModel
) -> Iterator[LiveServer]:
    # EDITOR_E2E_MODEL=editor/bundled/tiny runs the pages on a real model (for the docs' screenshots).
    chosen = os.environ.get("EDITOR_E2E_MODEL")
    model_dir = Path(chosen) if chosen else api_model_dir
    settings = make_settings(tmp_path_factory.mktemp("web"), model_dir)
    model = SlowModel(load_model(model_dir, device="cpu") if chosen else api_model, delay=STEP_DELAY)
    app = create_app(settings, worker=ModelWorker(settings, loader=lambda: model))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn-e2e", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not (server.started and app.state.worker.ready):
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.05)
    with httpx.Client(base_url=url, timeout=30) as client:
        yield LiveServer(url=url, model=model, api=client, store=app.state.store)
    server.should_exit = True
    thread.join(15)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"the end-to-end tests need Debian's chromium at {CHROMIUM}: run `apt-get install -y chromium` "
            "(or set EDITOR_TEST_CHROMIUM to a Chromium binary)"
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, live_server: LiveServer) -> Iterator[Page]:
    """A fresh browser context at 1440x900; any script error on the page fails the test."""
    context = browser.new_context(viewport={"width": 1440, "height": 900}, base_url=live_server.url)
    context.set_default_timeout(15_000)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    yield opened
    context.close()
    assert not errors, f"errors on the page: {errors}"


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    viewport = page.viewport_size
    assert viewport is not None
    # Down to the end of the page's content (and no further than the window), not empty margin.
    bottom = page.evaluate(
        "Math.ceil(document.querySelector('.workspace, .documents-page').getBoundingClientRect().bottom)"
    )
    height = min(viewport["height"], max(200, int(bottom) + 24))
    page.screenshot(path=str(path), clip={"x": 0, "y": 0, "width": viewport["width"], "height": height})
    return path


@pytest.fixture
def browser_narrow_page(browser: Browser, live_server: LiveServer) -> Iterator[Page]:
    """A phone-sized page (375 px wide)."""
    context = browser.new_context(
        viewport={"width": 375, "height": 812}, device_scale_factor=2, base_url=live_server.url, has_touch=True
    )
    context.set_default_timeout(15_000)
    yield context.new_page()
    context.close()
