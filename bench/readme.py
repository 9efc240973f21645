"""Where benchmark figures land in README.md: one marked block per benchmark under the
"Benchmarks" heading, replaced in place on every run (made, with the heading, if missing)."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def write_block(name: str, text: str, readme: Path = README) -> None:
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    body = readme.read_text()
    block = f"{begin}\n{text}\n{end}"
    if begin in body:
        head, rest = body.split(begin, 1)
        body = head + block + rest.split(end, 1)[1]
    else:
        if "## Benchmarks" not in body:
            body = body.rstrip("\n") + "\n\n## Benchmarks\n"
        head, rest = body.split("## Benchmarks", 1)
        parts = rest.split("\n## ", 1)
        section = parts[0].rstrip("\n") + f"\n\n{block}\n"
        body = head + "## Benchmarks" + section + ("\n## " + parts[1] if len(parts) > 1 else "")
    readme.write_text(body)
