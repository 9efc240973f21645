"""Generate the Python stubs for every contract under protos/ into gen/ (a build output).

protovalidate's Python wheel ships `buf/validate/validate.proto` only as a compiled descriptor,
so we lift that descriptor out of the wheel and hand it to protoc with `--descriptor_set_in`;
protoc then resolves `import "buf/validate/validate.proto"` exactly as if the source were here,
and we also emit a classic `validate_pb2` so the generated modules import cleanly.
Skips the work when no .proto changed since the last run (a stamp of their hashes).
"""

from __future__ import annotations

import ast
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN = ROOT / "gen"


def _validate_descriptor_set() -> bytes:
    import protovalidate._gen.buf.validate.validate_pb as vpb
    from google.protobuf import descriptor_pb2, duration_pb2, field_mask_pb2, timestamp_pb2

    raw: bytes | None = None
    for node in ast.walk(ast.parse(Path(vpb.__file__).read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "file_desc":
            raw = node.args[0].value  # type: ignore[attr-defined]
            break
    if raw is None:
        sys.exit("genproto: could not find buf/validate/validate.proto in the protovalidate wheel")
    fds = descriptor_pb2.FileDescriptorSet()
    for mod in (descriptor_pb2, duration_pb2, field_mask_pb2, timestamp_pb2):
        fdp = descriptor_pb2.FileDescriptorProto()
        mod.DESCRIPTOR.CopyToProto(fdp)
        fds.file.append(fdp)
    fds.file.append(descriptor_pb2.FileDescriptorProto.FromString(raw))
    return fds.SerializeToString()


def _fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def _protoc(args: list[str]) -> None:
    """Run protoc quietly (the mypy plugin chatters on stderr); show everything on failure."""
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        sys.exit(f"genproto: protoc failed ({done.returncode})")


def main() -> None:
    import grpc_tools

    files = sorted(PROTOS.rglob("*.proto"))
    stamp = GEN / ".stamp"
    fp = _fingerprint(files)
    if stamp.exists() and stamp.read_text() == fp and "--force" not in sys.argv:
        return
    shutil.rmtree(GEN, ignore_errors=True)
    GEN.mkdir(parents=True)
    build = ROOT / "build"
    build.mkdir(exist_ok=True)
    dset = build / "validate.pb"
    dset.write_bytes(_validate_descriptor_set())

    site = Path(grpc_tools.__file__).parent.parent
    wkt = Path(grpc_tools.__file__).parent / "_proto"
    base = [sys.executable, "-m", "grpc_tools.protoc", f"--descriptor_set_in={dset}"]
    _protoc([*base, f"--python_out={GEN}", "buf/validate/validate.proto"])
    rel = [str(f.relative_to(PROTOS)) for f in files]
    _protoc(
        [
            *base,
            f"-I{PROTOS}",
            f"-I{site}",
            f"-I{wkt}",
            f"--python_out={GEN}",
            f"--grpc_python_out={GEN}",
            f"--plugin=protoc-gen-mypy={Path(sys.executable).parent / 'protoc-gen-mypy'}",
            f"--mypy_out={GEN}",
            f"--descriptor_set_out={build / 'ctrlmesh.pb'}",
            "--include_imports",
            "--include_source_info",
            *rel,
        ]
    )
    # Namespace packages would work, but explicit packages keep mypy and tooling simple.
    for d in [p for p in GEN.rglob("*") if p.is_dir()]:
        (d / "__init__.py").touch()
    (GEN / "py.typed").touch()
    stamp.write_text(fp)
    print(f"genproto: generated {len(files)} contracts into gen/")


if __name__ == "__main__":
    main()
