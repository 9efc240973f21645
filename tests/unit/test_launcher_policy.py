"""The launcher's restart policy: backoff doubling to a cap, a restart budget per window."""

from libs.launcher import RestartPolicy


def test_backoff_doubles_to_its_cap_then_the_process_is_given_up():
    """0.5 s doubling, capped at 10 s; the 6th exit within 60 s of 5 restarts means failed."""
    p = RestartPolicy(0.5, 10, limit=5, window=60)
    assert [p.on_exit(float(t)) for t in range(5)] == [0.5, 1, 2, 4, 8]
    assert p.on_exit(5.0) is None
    capped = RestartPolicy(0.5, 3, limit=10, window=60)
    assert [capped.on_exit(float(t)) for t in range(5)] == [0.5, 1, 2, 3, 3]


def test_restarts_older_than_the_window_no_longer_count():
    """A process that crashes now and then (less than the limit per window) is restarted forever,
    and its backoff starts small again once the old restarts leave the window."""
    p = RestartPolicy(0.5, 10, limit=2, window=60)
    assert p.on_exit(0) == 0.5
    assert p.on_exit(30) == 1
    assert p.on_exit(61) == 1  # the restart at 0 has left the window, the one at 30 has not
    assert p.on_exit(200) == 0.5
    assert p.on_exit(201) == 1
    assert p.on_exit(202) is None
