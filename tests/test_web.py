"""The web editor end to end: a real server, real headless Chromium (Debian's), real clicks.

Screenshots of the main pages go to `artifacts/` (git-ignored)."""

from __future__ import annotations

import re
import time

import pytest
from playwright.sync_api import Page, expect

from editor.canvas import SpanAlternative
from editor.models.base import DiffusionModel
from tests.web_fixtures import LiveServer, screenshot

pytest_plugins = ("tests.api_fixtures", "tests.web_fixtures")
pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_torch_thread")]

LETTER = "Dear [MASK 3 name=greeting],\nthank you for [MASK 4]. Kind regards, [MASK 2 name=sign]"


def open_editor(page: Page, document_id: int) -> None:
    page.goto(f"/documents/{document_id}")
    expect(page.locator("body[data-ready=true]")).to_be_attached()


def wait_for_revision(page: Page, number: int) -> None:
    expect(page.get_by_test_id("revision")).to_have_count(number)
    expect(page.locator("#result-label")).to_have_text(f"· revision {number}")


def span_texts(page: Page) -> list[str]:
    return page.get_by_test_id("span").all_inner_texts()


def record_steps(page: Page) -> None:
    """Keep every value the step counter shows (a fill can be faster than polling)."""
    page.evaluate(
        """() => {
        const counter = document.querySelector('[data-testid="step-counter"]');
        window.seenSteps = [];
        new MutationObserver(() => window.seenSteps.push(counter.textContent))
          .observe(counter, {childList: true, characterData: true, subtree: true});
    }"""
    )


def test_create_a_document_fill_it_and_watch_the_steps(page: Page, live_server: LiveServer) -> None:
    page.goto("/")
    expect(page.get_by_test_id("new-document")).to_be_visible()
    page.get_by_test_id("new-document").click()
    page.wait_for_url(re.compile(r"/documents/\d+$"))
    expect(page.locator("body[data-ready=true]")).to_be_attached()
    expect(page.get_by_test_id("source")).to_have_value(re.compile(r"\[MASK 3 name=greeting\]"))
    expect(page.locator("#parse-ok")).to_have_text("4 spans to fill")
    record_steps(page)
    live_server.model.delay = 0.12  # slow enough to photograph the canvas mid-fill
    try:
        page.get_by_test_id("fill").click()
        expect(page.locator(".tok.fresh").first).to_be_visible()
        expect(page.get_by_test_id("stop")).to_be_enabled()
        time.sleep(0.6)
        screenshot(page, "editor-mid-fill")
        expect(page.locator(".tok.mask").first).to_be_visible()  # masks are still grey mid-fill
    finally:
        live_server.model.delay = 0.02
    wait_for_revision(page, 1)
    steps = page.evaluate("window.seenSteps")
    numbers = [int(s.split()[1]) for s in steps if s.startswith("Step ") and s != "Step 0"]
    assert len(set(numbers)) >= 5 and numbers == sorted(numbers), steps
    canvas = page.get_by_test_id("canvas")
    expect(canvas.locator(".tok.mask")).to_have_count(0)
    assert "[MASK" not in canvas.inner_text()
    expect(page.get_by_test_id("span")).to_have_count(4)
    assert [page.get_by_test_id("span").nth(i).get_attribute("data-span-name") for i in range(4)] == [
        "greeting",
        "",
        "promise",
        "signature",
    ]
    expect(page.get_by_test_id("step-counter")).to_have_text(re.compile(r"Step \d+"))
    screenshot(page, "editor-filled")
    page.goto("/")
    expect(page.get_by_test_id("document-list")).to_contain_text("1 revision")
    screenshot(page, "document-list")


def test_a_broken_tag_shows_its_line_and_column_and_nothing_runs(page: Page, live_server: LiveServer) -> None:
    document_id = live_server.new_document("fine line\nstill [MASK 2]")
    open_editor(page, document_id)
    page.get_by_test_id("source").fill("fine line\nbad [MASK 3 colour=red]")
    error = page.get_by_test_id("parse-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("Line 2, column 13")
    expect(error).to_contain_text("unknown option")
    expect(page.locator(".error-mark")).to_have_text("c")  # marked in place in the source
    page.get_by_test_id("fill").click()
    expect(error).to_be_visible()
    assert live_server.revisions(document_id) == []
    assert live_server.api.get(f"/api/v1/documents/{document_id}").json()["source"] == "fine line\nstill [MASK 2]"
    page.get_by_test_id("source").fill("fine line\nbad [MASK 3]")
    expect(error).to_be_hidden()


def test_regenerate_one_span_and_only_that_span_changes(page: Page, live_server: LiveServer) -> None:
    document_id = live_server.new_document(LETTER)
    live_server.fill(document_id, options={"seed": 1}, trace=True)
    open_editor(page, document_id)
    before = span_texts(page)
    page.locator('[data-testid="span"][data-span-index="1"]').click()
    page.get_by_test_id("regenerate").click()
    wait_for_revision(page, 2)
    after = span_texts(page)
    assert after[0] == before[0] and after[2] == before[2]
    first, second = live_server.revisions(document_id)[::-1]
    assert second["kind"] == "regenerate" and second["regenerated_span"] == 1
    assert [s["text"] for i, s in enumerate(second["spans"]) if i != 1] == [
        s["text"] for i, s in enumerate(first["spans"]) if i != 1
    ]
    assert second["spans"][1]["token_ids"] != first["spans"][1]["token_ids"]


def test_lock_a_span_and_refill(page: Page, live_server: LiveServer) -> None:
    document_id = live_server.new_document(LETTER)
    live_server.fill(document_id, options={"seed": 1}, trace=True)
    open_editor(page, document_id)
    page.locator("#settings summary").click()
    page.locator("#opt-temperature").fill("1.5")
    page.locator('[data-testid="span"][data-span-name="greeting"]').click()
    page.get_by_test_id("lock").click()
    expect(page.get_by_test_id("lock")).to_have_attribute("aria-pressed", "true")
    greeting = page.locator('[data-testid="span"][data-span-name="greeting"]')
    expect(greeting).to_have_class(re.compile("locked"))
    # The padlock is drawn (an emoji shows as an empty box without an emoji font) and labelled.
    expect(greeting.get_by_role("img", name="locked")).to_be_visible()
    assert greeting.evaluate("(span) => getComputedStyle(span, '::after').content") in ("none", "normal")
    expect(greeting).to_have_attribute("aria-label", re.compile(", locked"))
    page.get_by_test_id("fill").click()
    wait_for_revision(page, 2)
    newest, oldest = live_server.revisions(document_id)
    assert newest["spans"][0]["token_ids"] == oldest["spans"][0]["token_ids"]
    assert [s["token_ids"] for s in newest["spans"][1:]] != [s["token_ids"] for s in oldest["spans"][1:]]


def test_diff_view_and_restore(page: Page, live_server: LiveServer) -> None:
    first_source = "The parcel left [MASK 3] and will arrive [MASK 3]."
    document_id = live_server.new_document(first_source)
    live_server.fill(document_id, options={"seed": 1})
    live_server.api.patch(f"/api/v1/documents/{document_id}", json={"source": "The parcel arrives [MASK 4]."})
    live_server.fill(document_id, options={"seed": 2})
    open_editor(page, document_id)
    expect(page.get_by_test_id("source")).to_have_value("The parcel arrives [MASK 4].")
    diff = page.get_by_test_id("diff")
    expect(diff).to_contain_text("#1 → #2")
    expect(diff.locator("del").first).to_be_visible()
    expect(diff.locator("ins").first).to_be_visible()
    assert "will arrive" in " ".join(diff.locator("del").all_inner_texts())
    screenshot(page, "revision-diff")
    page.get_by_test_id("revision").filter(has_text="#1").click()
    expect(page.locator("#result-label")).to_have_text("· revision 1")
    page.get_by_test_id("restore").click()
    expect(page.get_by_test_id("source")).to_have_value(first_source)
    expect(page.locator("#toast")).to_contain_text("restored")
    assert live_server.api.get(f"/api/v1/documents/{document_id}").json()["source"] == first_source


def test_mask_a_selection_in_the_source_and_refill(
    page: Page, live_server: LiveServer, api_model: DiffusionModel
) -> None:
    document_id = live_server.new_document("The quick brown fox jumps over the lazy dog. [MASK 2]")
    open_editor(page, document_id)
    source = page.get_by_test_id("source")
    source.evaluate("(box) => { box.focus(); box.setSelectionRange(4, 15); }")  # "quick brown"
    source.press("Alt+m")
    tokens = len(api_model.tokenizer(" quick brown", add_special_tokens=False)["input_ids"])
    expect(source).to_have_value(f"The [MASK {tokens}] fox jumps over the lazy dog. [MASK 2]")
    page.get_by_test_id("fill").click()
    wait_for_revision(page, 1)
    (revision,) = live_server.revisions(document_id)
    assert revision["source"] == f"The [MASK {tokens}] fox jumps over the lazy dog. [MASK 2]"
    source.evaluate("(box) => { box.focus(); box.setSelectionRange(4, 4); }")
    source.press("Control+z")  # a mask can be taken back like typing
    expect(source).to_have_value("The quick brown fox jumps over the lazy dog. [MASK 2]")
    expect(page.locator("#save-status")).to_have_text("Saved")
    assert live_server.api.get(f"/api/v1/documents/{document_id}").json()["source"] == source.input_value()
    assert len(revision["spans"][0]["token_ids"]) == tokens
    assert revision["text"].startswith("The") and " fox jumps over the lazy dog." in revision["text"]


def test_mask_a_selection_in_the_result_and_refill(page: Page, live_server: LiveServer) -> None:
    document_id = live_server.new_document("Hello world, [MASK 3] and goodbye moon.")
    live_server.fill(document_id, options={"seed": 3}, trace=True)
    open_editor(page, document_id)
    expect(page.get_by_test_id("span")).to_have_count(1)
    text = page.get_by_test_id("canvas").inner_text()
    start = text.index("goodbye")
    page.evaluate(
        """([start, end]) => {
        const canvas = document.querySelector('[data-testid="canvas"]');
        const walker = document.createTreeWalker(canvas, NodeFilter.SHOW_TEXT);
        const range = document.createRange();
        let seen = 0, node;
        while ((node = walker.nextNode())) {
          const length = node.textContent.length;
          if (seen <= start && start <= seen + length) range.setStart(node, start - seen);
          if (seen <= end && end <= seen + length) { range.setEnd(node, end - seen); break; }
          seen += length;
        }
        getSelection().removeAllRanges();
        getSelection().addRange(range);
    }""",
        [start, start + len("goodbye")],
    )
    page.get_by_test_id("mask-selection").click()
    source = page.get_by_test_id("source")
    expect(source).to_have_value(re.compile(r"^Hello world, .* and \[MASK \d+\] moon\.$"))
    assert "[MASK 3]" not in source.input_value()  # the earlier fill is now fixed text
    page.get_by_test_id("fill").click()
    wait_for_revision(page, 2)
    newest = live_server.revisions(document_id)[0]
    assert newest["text"].startswith(text[:start].rstrip()) and newest["text"].endswith(" moon.")


def test_a_script_document_renders_as_text(page: Page, live_server: LiveServer) -> None:
    title = "<script>window.pwned = 1</script>"
    source = '<img src=x onerror="window.pwned = 2"> [MASK 2] <b>bold</b> <script>window.pwned = 3</script>'
    document_id = live_server.new_document(source, title=title)
    live_server.fill(document_id, trace=True)
    page.goto("/")
    expect(page.get_by_test_id("document-list")).to_contain_text(title)
    open_editor(page, document_id)
    expect(page.get_by_test_id("document-title")).to_have_value(title)
    expect(page.get_by_test_id("canvas")).to_contain_text('<img src=x onerror="window.pwned = 2">')
    expect(page.get_by_test_id("canvas")).to_contain_text("<script>window.pwned = 3</script>")
    assert page.evaluate("window.pwned") is None
    assert page.locator("[data-testid=canvas] img, [data-testid=canvas] b, [data-testid=canvas] script").count() == 0
    assert page.locator("#highlight img, #highlight script").count() == 0
    policy = live_server.api.get(f"/documents/{document_id}").headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy


def test_keyboard_only_fill(page: Page, live_server: LiveServer) -> None:
    document_id = live_server.new_document("Kind regards,")
    open_editor(page, document_id)
    for _ in range(20):
        if page.evaluate("document.activeElement.dataset.testid") == "source":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.dataset.testid") == "source"
    outline = page.evaluate("getComputedStyle(document.activeElement.parentElement).boxShadow")
    assert outline != "none"  # the source box shows where the focus is
    page.keyboard.press("Control+End")
    page.keyboard.type(" [MASK 3 name=sign]")
    page.keyboard.press("Control+Enter")
    wait_for_revision(page, 1)
    (revision,) = live_server.revisions(document_id)
    assert revision["source"] == "Kind regards, [MASK 3 name=sign]"
    # The spans are reachable and usable by keyboard too.
    page.get_by_test_id("span").first.focus()
    page.keyboard.press("Enter")
    expect(page.get_by_test_id("regenerate")).to_be_visible()


def test_stop_cancels_the_fill_on_the_server(page: Page, live_server: LiveServer) -> None:
    document_id = live_server.new_document("A long story: [MASK 40]")
    open_editor(page, document_id)
    live_server.model.delay = 0.15
    try:
        page.get_by_test_id("fill").click()
        expect(page.get_by_test_id("step-counter")).to_have_text(re.compile(r"Step [3-9]"))
        page.get_by_test_id("stop").click()
        expect(page.locator("#fill-state")).to_have_text("Stopped · nothing was saved")
        time.sleep(0.5)  # the worker sees the cancel flag at its next step
        forwards = live_server.model.forwards
        time.sleep(0.6)
        assert live_server.model.forwards == forwards  # no more model work
    finally:
        live_server.model.delay = 0.02
    assert live_server.revisions(document_id) == []
    expect(page.get_by_test_id("fill")).to_be_enabled()


def test_replay_copy_and_export(page: Page, live_server: LiveServer) -> None:
    document_id = live_server.new_document("Dear [MASK 3],\nsee you [MASK 4].")
    revision = live_server.fill(document_id, trace=True)
    open_editor(page, document_id)
    record_steps(page)
    page.locator("#replay-speed").fill("40")
    page.get_by_test_id("replay").click()
    expect(page.locator("#fill-state")).to_have_text(f"Replayed {len(revision['trace'])} steps")
    steps = page.evaluate("window.seenSteps")
    assert f"Step {len(revision['trace'])}" in steps and "Step 1" in steps
    assert page.get_by_test_id("canvas").inner_text() == revision["text"]
    with page.expect_download() as download:
        page.get_by_test_id("export-txt").click()
    path = download.value.path()
    assert path is not None and path.read_text(encoding="utf-8") == revision["text"]
    assert download.value.suggested_filename == "letter.txt"


def test_weak_words_are_underlined_and_refilled(page: Page, live_server: LiveServer) -> None:
    document_id = live_server.new_document("Our team [MASK 6] every week.")
    live_server.fill(document_id, trace=True)
    open_editor(page, document_id)
    page.locator("#show-weak").check()
    page.locator("#weak-threshold").fill("0.95")  # a random model is unsure of everything
    expect(page.locator(".tok.weak").first).to_be_visible()
    page.get_by_test_id("span").first.click()
    expect(page.get_by_test_id("regenerate")).to_be_visible()
    screenshot(page, "editor-weak-words-and-span-tools")
    page.locator("#refill-weak").click()
    wait_for_revision(page, 2)
    newest = live_server.revisions(document_id)[0]
    assert re.fullmatch(r"Our team.*\[MASK \d+\].* every week\.", newest["source"])


def test_document_list_search_rename_delete(page: Page, live_server: LiveServer) -> None:
    keep = live_server.new_document("a [MASK 1]", title="Quarterly report")
    gone = live_server.new_document("b [MASK 1]", title="Old shopping list")
    page.goto("/")
    page.get_by_role("searchbox").fill("quarterly")
    listing = page.get_by_test_id("document-list")
    expect(listing.locator("li")).to_have_count(1)
    expect(listing).to_contain_text("Quarterly report")
    row = listing.locator(f'li[data-document-id="{keep}"]')
    row.get_by_role("button", name="Rename Quarterly report").click()
    page.get_by_role("textbox", name="New title").fill("Annual report")
    page.keyboard.press("Enter")
    expect(row).to_contain_text("Annual report")
    assert live_server.api.get(f"/api/v1/documents/{keep}").json()["title"] == "Annual report"
    page.get_by_role("searchbox").fill("shopping")
    expect(listing.locator("li")).to_have_count(1)
    listing.get_by_role("button", name="Delete Old shopping list").click()
    dialog = page.locator("#confirm-delete")
    expect(dialog).to_be_visible()
    dialog.get_by_role("button", name="Cancel").click()
    assert live_server.api.get(f"/api/v1/documents/{gone}").status_code == 200
    listing.get_by_role("button", name="Delete Old shopping list").click()
    dialog.get_by_role("button", name="Delete").click()
    expect(page.locator("#list-status")).to_contain_text("No document title contains")
    assert live_server.api.get(f"/api/v1/documents/{gone}").status_code == 404


def test_narrow_screen(browser_narrow_page: Page, live_server: LiveServer) -> None:
    page = browser_narrow_page
    document_id = live_server.new_document(LETTER, title="Reply to Ms Novak")
    live_server.fill(document_id, trace=True)
    open_editor(page, document_id)
    expect(page.get_by_test_id("span")).to_have_count(3)
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    for testid in ("fill", "stop", "source", "canvas", "revision-list"):
        box = page.get_by_test_id(testid).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 375, testid
    screenshot(page, "editor-narrow")
    page.goto("/")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    screenshot(page, "document-list-narrow")


def alternatives(*texts: str) -> list[SpanAlternative]:
    return [SpanAlternative(text=text, token_ids=[i + 1], score=-1.0 - i) for i, text in enumerate(texts)]


def test_choose_another_candidate_from_a_span_menu(page: Page, live_server: LiveServer) -> None:
    document_id = live_server.new_document(LETTER)
    offers = alternatives("the lovely scarf", "it")
    live_server.store_fill(document_id, [("Ms Novak", []), ("your kind letter", offers), ("Jan", [])])
    open_editor(page, document_id)
    span = page.locator('[data-testid="span"][data-span-index="1"]')
    expect(span).to_have_attribute("aria-haspopup", "menu")
    expect(page.locator('[data-testid="span"][data-span-index="0"]')).not_to_have_attribute("aria-haspopup", "menu")
    span.click()
    menu = page.get_by_role("menu", name="Other candidates for span 2")
    expect(menu).to_be_visible()
    assert menu.get_by_role("menuitem").all_inner_texts() == ["the lovely scarf", "it"]
    expect(menu.get_by_role("menuitem").first).to_be_focused()
    screenshot(page, "editor-alternatives")
    page.keyboard.press("ArrowDown")
    expect(menu.get_by_role("menuitem").nth(1)).to_be_focused()
    page.keyboard.press("Escape")  # closes the menu, back on the span
    expect(menu).to_be_hidden()
    expect(span).to_be_focused()
    page.keyboard.press("Enter")  # the keyboard opens it too
    expect(menu).to_be_visible()
    page.keyboard.press("End")
    page.keyboard.press("Enter")
    wait_for_revision(page, 2)
    assert span_texts(page) == ["Ms Novak", "it", "Jan"]
    expect(page.get_by_test_id("canvas")).to_have_text("Dear Ms Novak,\nthank you for it. Kind regards, Jan")
    newest = live_server.revisions(document_id)[0]
    assert (newest["kind"], newest["parent"], newest["steps"], newest["regenerated_span"]) == ("choose", 1, 0, 1)
    assert [a["text"] for a in newest["spans"][1]["alternatives"]] == ["the lovely scarf", "your kind letter"]
    expect(page.locator(".revision-kind").first).to_have_text("alternative for span 2")
    page.locator('[data-testid="span"][data-span-index="1"]').click()  # the replaced text is offered back
    expect(menu.get_by_role("menuitem").nth(1)).to_have_text("your kind letter")
    page.mouse.click(5, 890)  # a click elsewhere closes it
    expect(menu).to_be_hidden()


def test_the_revision_list_names_a_regenerated_span(page: Page, live_server: LiveServer) -> None:
    document_id = live_server.new_document(LETTER)
    live_server.fill(document_id, options={"seed": 1})
    for key in ("sign", "1"):
        response = live_server.api.post(f"/api/v1/documents/{document_id}/revisions/1/spans/{key}/regenerate")
        assert response.status_code == 201, response.text
    open_editor(page, document_id)
    kinds = page.locator(".revision-kind")
    expect(kinds).to_have_text(["regenerated span 2", "regenerated sign", "fill"])
    expect(kinds.nth(1).locator("code")).to_have_text("sign")


def test_the_diff_summary_counts_the_spans_of_each_revision(page: Page, live_server: LiveServer) -> None:
    document_id = live_server.new_document(LETTER)
    live_server.store_fill(document_id, [("Ms Novak", []), ("the scarf", alternatives("it")), ("Jan", [])])
    choose = f"/api/v1/documents/{document_id}/revisions/1/spans/1/choose"
    assert live_server.api.post(choose, json={"alternative": 0}).status_code == 201
    live_server.api.patch(f"/api/v1/documents/{document_id}", json={"source": "Yours, [MASK 2 name=closing]"})
    live_server.store_fill(document_id, [("Jan K", [])])
    open_editor(page, document_id)
    summary = page.locator(".diff-summary")
    expect(summary).to_have_text("#2 → #3: 1 span added · 3 removed · different source")  # not "4 of 4 changed"
    page.get_by_test_id("revision").filter(has_text="#2").click()
    expect(summary).to_have_text("#1 → #2: 1 of 3 spans changed")


def test_the_word_diff_keeps_a_space_between_removed_and_added_words(page: Page, live_server: LiveServer) -> None:
    document_id = live_server.new_document("The [MASK 4] fox jumps.")
    live_server.store_fill(document_id, [("quick brown", alternatives("slow red"))])
    live_server.api.post(f"/api/v1/documents/{document_id}/revisions/1/spans/0/choose", json={"alternative": 0})
    open_editor(page, document_id)
    diff = page.get_by_test_id("diff")
    expect(diff.locator("del")).to_have_text(["quick brown"])
    expect(diff.locator("ins")).to_have_text(["slow red"])
    assert diff.locator(".diff-text").inner_text() == "The quick brown slow red fox jumps."


def test_candidates_from_the_sampler_settings_reach_the_fill(page: Page, live_server: LiveServer) -> None:
    """The Candidates setting runs that many fills side by side: the revision records it, and a
    span the candidates filled differently offers the others."""
    document_id = live_server.new_document(LETTER)
    open_editor(page, document_id)
    page.get_by_text("Sampler settings").click()
    page.get_by_label("Candidates").fill("3")
    page.get_by_test_id("fill").click()
    wait_for_revision(page, 1)
    newest = live_server.revisions(document_id)[0]
    assert newest["options"]["candidates"] == 3
    assert any(span["alternatives"] for span in newest["spans"])
    expect(page.locator('[data-testid="span"][aria-haspopup="menu"]').first).to_be_visible()
