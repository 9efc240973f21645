pytest_plugins = [
    "tests.fixtures.mesh",
    "tests.fixtures.postgres",
    "tests.fixtures.docker",
    "tests.fixtures.instances",
]
