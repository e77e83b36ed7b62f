"""Two browser pages on one document (issue 22): the web editor sends If-Match with every save,
and when the other page saved first it says so and lets the writer load the other version or keep
their own as the next one; nothing is overwritten unseen. Screenshots go to `artifacts/`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.web_fixtures import LiveServer, screenshot

pytest_plugins = ("tests.api_fixtures", "tests.web_fixtures")
pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_torch_thread")]

START = "Dear [MASK 3 name=greeting],\nthank you for [MASK 4]."
MINE = "Dear [MASK 3 name=greeting],\nthank you for the lovely [MASK 4]. (tab B)"
THEIRS = "Dear [MASK 3 name=greeting],\nthank you so much for [MASK 4]. (tab A)"


@pytest.fixture
def two_pages(browser: Browser, live_server: LiveServer) -> Iterator[tuple[Page, Page]]:
    """Two tabs of one browser; script errors fail the test (a refused save's 412 is expected)."""
    context = browser.new_context(viewport={"width": 1440, "height": 900}, base_url=live_server.url)
    context.set_default_timeout(15_000)
    errors: list[str] = []
    pages = (context.new_page(), context.new_page())
    for page in pages:
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on(
            "console",
            lambda message: (
                errors.append(message.text) if message.type == "error" and "status of 412" not in message.text else None
            ),
        )
    yield pages
    context.close()
    assert not errors, f"errors on the pages: {errors}"


def open_editor(page: Page, document_id: int) -> None:
    page.goto(f"/documents/{document_id}")
    expect(page.locator("body[data-ready=true]")).to_be_attached()


def type_and_save(page: Page, text: str) -> None:
    page.get_by_test_id("source").fill(text)


def stored(live_server: LiveServer, document_id: int) -> dict[str, object]:
    return dict(live_server.api.get(f"/api/v1/documents/{document_id}").json())


def test_two_pages_on_one_document_never_overwrite_each_other_unseen(
    two_pages: tuple[Page, Page], live_server: LiveServer
) -> None:
    a, b = two_pages
    document_id = live_server.new_document(START)
    open_editor(a, document_id)
    open_editor(b, document_id)

    type_and_save(a, THEIRS)
    expect(a.locator("#save-status")).to_have_text("Saved")
    assert stored(live_server, document_id)["source"] == THEIRS

    # B still shows version 1: its save is refused, and it says so instead of overwriting A's text.
    type_and_save(b, MINE)
    conflict = b.get_by_test_id("conflict")
    expect(conflict).to_be_visible()
    expect(conflict).to_contain_text("changed in another tab or by someone else")
    expect(b.locator("#save-status")).to_have_text("Not saved: changed elsewhere")
    b.locator(".conflict-details summary").click()
    expect(b.get_by_test_id("conflict-theirs")).to_have_text(THEIRS)
    screenshot(b, "conflict-banner")
    assert stored(live_server, document_id)["source"] == THEIRS  # A's words are still there
    expect(b.get_by_test_id("source")).to_have_value(MINE)  # and B's are still on B's screen
    # While the writer has not chosen, more typing does not save either.
    b.get_by_test_id("source").fill(MINE + "!")
    b.wait_for_timeout(1200)
    assert stored(live_server, document_id)["source"] == THEIRS
    b.get_by_test_id("source").fill(MINE)

    # B keeps its own text: it becomes the next version, knowingly on top of A's.
    b.get_by_test_id("conflict-keep").click()
    expect(conflict).to_be_hidden()
    expect(b.locator("#save-status")).to_have_text("Saved")
    after = stored(live_server, document_id)
    assert after["source"] == MINE and after["version"] == 3

    # A has nothing unsaved: when it comes back to the front it shows B's version, and says so.
    a.evaluate("window.dispatchEvent(new Event('focus'))")
    expect(a.get_by_test_id("source")).to_have_value(MINE)
    expect(a.locator("#toast")).to_contain_text("Updated to version 3")
    expect(a.get_by_test_id("conflict")).to_be_hidden()


def test_the_writer_can_load_the_other_version_instead(two_pages: tuple[Page, Page], live_server: LiveServer) -> None:
    a, b = two_pages
    document_id = live_server.new_document(START)
    open_editor(a, document_id)
    open_editor(b, document_id)
    type_and_save(a, THEIRS)
    expect(a.locator("#save-status")).to_have_text("Saved")
    type_and_save(b, MINE)
    expect(b.get_by_test_id("conflict")).to_be_visible()
    b.get_by_test_id("conflict-reload").click()
    expect(b.get_by_test_id("conflict")).to_be_hidden()
    expect(b.get_by_test_id("source")).to_have_value(THEIRS)
    expect(b.locator("#save-status")).to_have_text("Saved")
    # B now edits on top of version 2 and saves normally; A, with unsaved text of its own, is asked.
    b.get_by_test_id("source").fill(THEIRS + " More.")
    expect(b.locator("#save-status")).to_have_text("Saved")
    assert stored(live_server, document_id)["version"] == 3
    a.evaluate("document.getElementById('source').value += ' typing'")  # unsaved, no input event yet
    a.evaluate("window.dispatchEvent(new Event('focus'))")
    expect(a.get_by_test_id("conflict")).to_be_visible()
    screenshot(a, "conflict-on-focus")
    assert stored(live_server, document_id)["source"] == THEIRS + " More."


def test_a_fill_from_a_stale_page_is_refused_and_explained(
    two_pages: tuple[Page, Page], live_server: LiveServer
) -> None:
    a, b = two_pages
    document_id = live_server.new_document(START)
    open_editor(a, document_id)
    open_editor(b, document_id)
    type_and_save(a, THEIRS)
    expect(a.locator("#save-status")).to_have_text("Saved")
    b.get_by_test_id("fill").click()  # B's source is unchanged here, but the stored one moved on
    expect(b.get_by_test_id("conflict")).to_be_visible()
    assert live_server.revisions(document_id) == []  # nothing filled from text B never showed
