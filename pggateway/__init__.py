"""The PG Gateway: the PostgreSQL wire-protocol front door of ctrlmesh's serverless PostgreSQL.

Layers, bottom up: `protocol` (message framing, no I/O) and `classify` (which SQL leaves session
state behind) → `scram` and `tls` (authentication and certificates) → `controlplane` (the small
interface to accounts and the databases leases, and its gRPC implementation) → `errors` (the one
place that turns failures into PostgreSQL ErrorResponses) → `backend` and `pool` (connections to
the compute) → `route` (one lease and one pool per database) → `session` (the relay of one
client) → `server` (listener, negotiation, authentication) → `main` (the process).
"""
