"""Client programs the PG Gateway tests run in a process of their own (a driver chosen by its
environment, like psycopg's PSYCOPG_IMPL, cannot be switched inside the test process)."""
