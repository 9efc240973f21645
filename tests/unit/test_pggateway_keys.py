"""The gateway's BackendKeyData: session ids outside every real pid, owner worker encoded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pggateway import keys
from pggateway.server import GatewayServer


@pytest.mark.parametrize("worker", [0, 1, 7, 255])
def test_issued_ids_are_never_real_pids_and_name_their_worker(worker: int) -> None:
    """Every id the listener issues lies in [2^22, 2^31) (Linux never gives a process such a pid)
    and its low byte names the worker that issued it; secrets are positive int32 and vary."""
    fake = SimpleNamespace(config=SimpleNamespace(worker_index=worker), _sessions={})
    issued = [GatewayServer._new_cancel_key(fake) for _ in range(20000)]  # type: ignore[arg-type]
    assert all(keys.LINUX_PID_MAX_LIMIT <= pid < 2**31 for pid, _ in issued)
    assert {keys.key_worker(pid) for pid, _ in issued} == {worker}
    assert all(0 <= secret < 2**31 for _, secret in issued)
    assert len({secret for _, secret in issued}) > 19900
    assert len({pid for pid, _ in issued}) > 19900


def test_ids_no_gateway_issues_have_no_owner() -> None:
    """A cancel naming a real-looking pid (or a negative one) is routed to no worker."""
    assert keys.key_worker(32768) is None
    assert keys.key_worker(keys.LINUX_PID_MAX_LIMIT - 1) is None
    assert keys.key_worker(-5) is None
    with pytest.raises(ValueError):
        keys.new_key(256)
