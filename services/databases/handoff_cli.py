"""`make handoff DB=<db_id> PROFILE=<L1…L5>`: ask the running platform for a writer handoff.

Uses the running platform's settings (the same CTRLMESH_* environment and data directory as
`make run`): the databases service's address and the internal secret, with which it signs a
system principal. Returns as soon as the handoff is accepted (the database in PREPARING;
watch /v2/events for its phases); exits non-zero with the reason when it is refused (cooldown,
a handoff in progress, a profile outside the plan, a database not running).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
from ctrlmesh.databases.v1 import databases_pb2 as pb
from ctrlmesh.databases.v1 import databases_pb2_grpc as rpc

from libs import principal as principals
from libs.peers import decode
from libs.settings import Settings


async def request(settings: Settings, db_id: str, profile: str, reason: str) -> int:
    secret_file = settings.secret_file("internal_secret")
    if settings.internal_secret:
        secret = settings.internal_secret.encode()
    elif secret_file.exists():
        secret = secret_file.read_text().strip().encode()
    else:
        sys.stderr.write(f"no platform found: {secret_file} is missing (is `make run` running here?)\n")
        return 2
    md = principals.sign(principals.system_principal("handoff-cli"), secret)
    async with grpc.aio.insecure_channel(settings.service_target("databases")) as ch:
        try:
            db = await rpc.AutoscalerServiceStub(ch).RequestHandoff(
                pb.RequestHandoffRequest(db_id=db_id, target_profile=profile, reason=reason),
                metadata=md,
                timeout=15,
            )
        except grpc.aio.AioRpcError as err:
            f = decode(err)
            sys.stderr.write(f"handoff refused: {f.reason or f.code.name}: {f.message}\n")
            return 1
    sys.stdout.write(
        f"handoff accepted: {db.db_id} {db.current_profile} → {db.candidate_profile} "
        f"(term {db.candidate_writer_term}, scale_state {db.scale_state})\n"
    )
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="make handoff", description=__doc__.splitlines()[0])
    parser.add_argument("db_id")
    parser.add_argument("profile", choices=["L1", "L2", "L3", "L4", "L5"])
    parser.add_argument("--reason", default="operator")
    args = parser.parse_args(argv)
    sys.exit(asyncio.run(request(Settings.load(), args.db_id, args.profile, args.reason)))


if __name__ == "__main__":
    main()
