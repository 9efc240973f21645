pytest_plugins = ["tests.fixtures.mesh", "tests.fixtures.postgres"]
