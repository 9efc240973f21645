"""The ingress: a real Caddy, configured only through its admin API from the network schema."""
