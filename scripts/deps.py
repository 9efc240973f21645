"""Print the runtime and dev requirements of pyproject.toml, one per line (for pip -r).

The repository is a set of top-level packages run from the source tree, not an installable
distribution, so pyproject.toml is only the single place where dependencies are declared.
"""

import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
for req in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
    print(req)
