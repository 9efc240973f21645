pytest_plugins = ["tests.fixtures.mesh"]
