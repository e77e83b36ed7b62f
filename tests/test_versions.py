"""Optimistic concurrency through the API: versions, ETag, If-Match (412 when stale), and 428 for
browser writes without If-Match (docs/security.md, "Versions and If-Match")."""

from __future__ import annotations

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from editor.db.services import NewRevision, StaleVersion, Store
from editor.models.base import DiffusionModel
from editor.settings import Settings
from tests.api_fixtures import app_for

pytest_plugins = ("tests.api_fixtures",)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

LETTER = "Dear [MASK 3 name=greeting],\nthank you for [MASK 4]."
Client = TestClient[Litestar]
BROWSER = {"Origin": "http://testserver.local", "Sec-Fetch-Mode": "cors"}


def create(client: Client) -> tuple[int, str]:
    response = client.post("/api/v1/documents", json={"title": "Letter", "source": LETTER})
    assert response.status_code == 201 and response.json()["version"] == 1
    return int(response.json()["id"]), response.headers["etag"]


def test_every_change_counts_the_version_up_and_get_returns_it_as_etag(client: Client) -> None:
    doc_id, tag = create(client)
    assert tag == '"1"'
    read = client.get(f"/api/v1/documents/{doc_id}")
    assert read.headers["etag"] == '"1"' and read.json()["version"] == 1
    patched = client.patch(f"/api/v1/documents/{doc_id}", json={"title": "A"}, headers={"If-Match": '"1"'})
    assert patched.status_code == 200 and patched.headers["etag"] == '"2"' and patched.json()["version"] == 2
    put = client.put(f"/api/v1/documents/{doc_id}", json={"title": "B", "source": "x [MASK 1]"})
    assert put.headers["etag"] == '"3"'
    listed = client.get("/api/v1/documents").json()["items"][0]
    assert listed["version"] == 3
    # A fill adds a revision but leaves the document's text, and so its version, alone.
    assert client.post(f"/api/v1/documents/{doc_id}/fill", headers={"If-Match": '"3"'}).status_code == 201
    assert client.get(f"/api/v1/documents/{doc_id}").headers["etag"] == '"3"'


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
def test_a_stale_if_match_is_412_with_the_current_version_and_writes_nothing(client: Client, method: str) -> None:
    doc_id, _ = create(client)
    other = client.patch(f"/api/v1/documents/{doc_id}", json={"source": "theirs [MASK 1]"}, headers={"If-Match": '"1"'})
    assert other.status_code == 200
    body = {"PUT": {"title": "Mine", "source": "mine [MASK 1]"}, "PATCH": {"source": "mine [MASK 1]"}}.get(method)
    stale = client.request(method, f"/api/v1/documents/{doc_id}", json=body, headers={"If-Match": '"1"'})
    assert stale.status_code == 412, stale.text
    assert stale.json()["current_version"] == 2 and stale.headers["etag"] == '"2"'
    assert "version 2, not 1" in stale.json()["detail"] and stale.json()["request_id"]
    document = client.get(f"/api/v1/documents/{doc_id}").json()
    assert document["source"] == "theirs [MASK 1]" and document["version"] == 2  # theirs kept
    fresh = client.request(method, f"/api/v1/documents/{doc_id}", json=body, headers={"If-Match": '"2"'})
    assert fresh.status_code in (200, 204)


def test_if_match_star_weak_and_garbled_tags(client: Client) -> None:
    doc_id, _ = create(client)
    url = f"/api/v1/documents/{doc_id}"
    assert client.patch(url, json={"title": "x"}, headers={"If-Match": "*"}).status_code == 200
    assert (
        client.patch(url, json={"title": "y"}, headers={"If-Match": 'W/"2"'}).status_code == 412
    )  # weak never matches
    garbled = client.patch(url, json={"title": "y"}, headers={"If-Match": "two"})
    assert garbled.status_code == 400 and "entity tag" in garbled.json()["detail"]
    assert client.patch("/api/v1/documents/999", json={"title": "y"}, headers={"If-Match": "*"}).status_code == 404


def test_browser_writes_without_if_match_are_428_and_api_clients_are_not(client: Client) -> None:
    doc_id, _ = create(client)
    url = f"/api/v1/documents/{doc_id}"
    for method, body in [("PATCH", {"title": "t"}), ("PUT", {"title": "t", "source": "s"}), ("DELETE", None)]:
        refused = client.request(method, url, json=body, headers=BROWSER)
        assert refused.status_code == 428 and "If-Match" in refused.json()["detail"], refused.text
    assert client.get(url).json()["version"] == 1  # nothing written
    assert client.patch(url, json={"title": "t"}, headers=BROWSER | {"If-Match": '"1"'}).status_code == 200
    assert client.patch(url, json={"title": "u"}).status_code == 200  # a script without If-Match: as before
    # Fills never overwrite anything: a browser may fill without If-Match.
    assert client.post(f"{url}/fill", headers=BROWSER).status_code == 201


def test_if_match_always_and_never_settings(settings: Settings, api_model: DiffusionModel) -> None:
    for policy, script, browser in [("always", 428, 428), ("never", 200, 200)]:
        app = app_for(settings.model_copy(update={"if_match": policy}), api_model)
        with TestClient(app) as client:
            doc_id, _ = create(client)
            url = f"/api/v1/documents/{doc_id}"
            assert client.patch(url, json={"title": "t"}).status_code == script
            assert client.patch(url, json={"title": "t"}, headers=BROWSER).status_code == browser


def test_fills_with_a_stale_if_match_are_412_and_store_nothing(client: Client) -> None:
    doc_id, _ = create(client)
    url = f"/api/v1/documents/{doc_id}"
    client.patch(url, json={"source": "changed [MASK 2]"})
    stale = client.post(f"{url}/fill", headers={"If-Match": '"1"'})
    assert stale.status_code == 412 and stale.json()["current_version"] == 2
    assert client.get(url).json()["revision_count"] == 0
    first = client.post(f"{url}/fill", headers={"If-Match": '"2"'}).json()
    regenerated = client.post(f"{url}/revisions/{first['number']}/spans/0/regenerate", headers={"If-Match": '"1"'})
    assert regenerated.status_code == 412
    assert client.get(url).json()["revision_count"] == 1


def test_a_document_changed_while_its_fill_runs_is_412_at_store_time(client: Client) -> None:
    """The version is checked again when the fill is stored, in the same transaction."""
    app: Litestar = client.app
    store: Store = app.state.store
    doc_id, _ = create(client)
    store.update_document(doc_id, title="moved on")
    with pytest.raises(StaleVersion) as raised:
        store.add_revision(doc_id, _revision(), expected_version=1)
    assert raised.value.current == 2
    assert store.get_document(doc_id).revision_count == 0
    assert store.add_revision(doc_id, _revision(), expected_version=2).number == 1


def _revision() -> NewRevision:
    return NewRevision(
        source=LETTER, text="t", spans=[], model="m", seed=1, options={}, steps=0, queued_s=0, fill_s=0, total_s=0
    )
