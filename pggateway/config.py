"""The settings of one PG Gateway process (built from libs.settings by `pggateway.main`)."""

from __future__ import annotations

from dataclasses import dataclass

from pggateway.route import RouteConfig


@dataclass(frozen=True)
class GatewayConfig:
    host: str
    port: int
    holder_id: str
    pool_size: int = 20
    wake_timeout: float = 30.0
    checkout_timeout: float = 30.0
    lease_ttl: float = 30.0
    credentials_ttl: float = 2.0
    # A database's lease is released this long after its last client left.
    release_grace: float = 1.0
    # Named prepared statements kept by the gateway, at most this many per backend (0: a named
    # statement pins its session instead). See pggateway/prepared.py.
    max_prepared_statements: int = 200
    # This process's place among the gateway workers sharing the port (`pggateway.workers`),
    # and every worker's private socket for passed-on cancels, by index (empty: the only one).
    worker_index: int = 0
    peers: tuple[str, ...] = ()
    # The Unix socket (libpq's `<dir>/.s.PGSQL.<port>`; see libs/pg_socket.py): a listening
    # socket inherited from the supervisor (its fd), else a directory this process binds in
    # itself; neither: TCP only.
    unix_fd: int | None = None
    unix_dir: str = ""

    def route_config(self) -> RouteConfig:
        return RouteConfig(
            holder_id=self.holder_id,
            pool_size=self.pool_size,
            wake_timeout=self.wake_timeout,
            checkout_timeout=self.checkout_timeout,
            lease_ttl=self.lease_ttl,
            release_grace=self.release_grace,
        )
