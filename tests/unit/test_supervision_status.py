"""The launcher's status file as /health reads it: what is written is read back, and a missing,
torn or foreign file reads as "nothing known" rather than failing /health."""

from pathlib import Path

from libs.supervision import FAILED, RESTARTING, STATUS_FILE, read_status, write_status


def test_written_states_are_read_back(tmp_path: Path) -> None:
    """Both states round-trip; an empty map clears them."""
    write_status(tmp_path, {"pggateway": FAILED, "network": RESTARTING})
    assert read_status(tmp_path) == {"pggateway": "failed", "network": "restarting"}
    write_status(tmp_path, {})
    assert read_status(tmp_path) == {}


def test_missing_torn_or_foreign_files_read_as_nothing_known(tmp_path: Path) -> None:
    """No file, half a JSON document, a list, or an unknown state: nothing is reported."""
    assert read_status(tmp_path) == {}
    path = tmp_path / STATUS_FILE
    path.parent.mkdir(parents=True)
    for text in ('{"pggateway": "fai', "[1, 2]", '{"caddy": "sleeping"}'):
        path.write_text(text)
        assert read_status(tmp_path) == {}
