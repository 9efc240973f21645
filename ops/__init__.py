"""The platform's own observability: a Prometheus configuration generated from the settings,
alert rules, Grafana dashboards, and `make observe` (see ops/README.md)."""
