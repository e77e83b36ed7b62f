"""The CI-sized soak (issue 22): two minutes of steady mixed use against `editor serve` on the tiny
model. The 60-minute run and its figures are in results/ (`python -m tests.fuzz.run_soak`)."""

from __future__ import annotations

from pathlib import Path

from tests.fuzz.run_soak import BOUNDS, plot, run_soak


def test_two_minutes_of_mixed_use_lose_nothing_and_do_not_grow(tmp_path: Path) -> None:
    report = run_soak(minutes=2.0, concurrency=4)

    assert report["server_errors"] == []
    assert report["lost"] == []
    assert report["batch_jobs_unfinished"] == 0
    for key, bound in BOUNDS.items():
        assert report["growth"][key] <= bound, (key, report["growth"])
    # Every kind of action ran and was answered (a soak that only read would prove little).
    assert set(report["actions"]) >= {"fill", "edit", "read"}
    assert report["revisions"] > 0
    assert report["passed"]

    picture = tmp_path / "soak.png"
    plot(report, picture)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
