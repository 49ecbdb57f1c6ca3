"""`fedsight node receive` and `fedsight node pull`: the DICOM network entry (registered under
`node` in data_cmds). Arguments become frozen configs here; the work is in
hospital_node.dicom_net."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

_PATHS_HELP = {
    "secret": "site pseudonymisation key, created 0600 on first use; must be outside DATA "
              "(default ~/.config/fedsight/receive-secret)",
    "lookup": "re-identification table (SQLite: case id -> original PatientID, "
              "StudyInstanceUID, time); must be outside DATA "
              "(default ~/.config/fedsight/receive-lookup.sqlite)",
    "staging": "where incomplete studies wait, outside DATA/ct and on its filesystem "
               "(default DATA/../.fedsight-incoming-<hash>)",
}


def _intake_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, metavar="DIR",
                   help="site data root; studies are filed as DIR/ct/<case_id>/")
    p.add_argument("--ae-title", default="FEDSIGHT", help="our AE title (default FEDSIGHT)")
    p.add_argument("--secret-file", type=Path, default=None, metavar="F",
                   help=_PATHS_HELP["secret"])
    p.add_argument("--lookup", type=Path, default=None, metavar="FILE",
                   help=_PATHS_HELP["lookup"])
    p.add_argument("--staging", type=Path, default=None, metavar="DIR",
                   help=_PATHS_HELP["staging"])
    p.add_argument("--max-pixel-bytes", type=int, default=1 << 30, metavar="N",
                   help="refuse an instance whose decoded pixels would exceed N bytes "
                   "(default 1 GiB)")


def register_node_net(node_sub: argparse._SubParsersAction) -> None:
    r = node_sub.add_parser(
        "receive", help="DICOM Storage SCP: receive CT studies, de-identify, file as cases",
        description="Runs until SIGTERM/Ctrl-C. A study becomes DIR/ct/<case_id>/ once its "
        "sending association released and no instance arrived for --quiet-seconds; an "
        "interrupted study stays in staging until it is sent again.")
    _intake_args(r)
    r.add_argument("--port", type=int, required=True, help="DICOM port to listen on")
    r.add_argument("--allow", action="append", default=[], metavar="AE@HOST",
                   help="peer allowed to send (repeatable); without it only loopback peers "
                   "are accepted and the server listens on 127.0.0.1")
    r.add_argument("--bind", default="", metavar="ADDR",
                   help="listen address (default 127.0.0.1, or 0.0.0.0 with --allow)")
    r.add_argument("--quiet-seconds", type=float, default=10.0, metavar="S",
                   help="a study is complete S seconds after its last instance (default 10)")
    r.set_defaults(func=_receive)

    g = node_sub.add_parser(
        "pull", help="retrieve studies from a PACS with C-GET, de-identify, file as cases",
        description="Exit code 0 when every retrieve succeeded, 1 otherwise.")
    _intake_args(g)
    g.add_argument("--pacs", required=True, metavar="AE@HOST:PORT", help="the PACS to query")
    g.add_argument("--study", action="append", default=[], metavar="UID",
                   help="StudyInstanceUID to retrieve (repeatable)")
    g.add_argument("--patient", action="append", default=[], metavar="ID",
                   help="PatientID whose studies to retrieve (repeatable)")
    g.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="network/DIMSE timeout in seconds (default 600)")
    g.set_defaults(func=_pull)


def _intake(args: argparse.Namespace, quiet_s: float):
    from hospital_node.dicom_net.config import IntakeConfig

    return IntakeConfig.build(args.data, staging=args.staging, secret_file=args.secret_file,
                              lookup=args.lookup, quiet_s=quiet_s,
                              max_pixel_bytes=args.max_pixel_bytes)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


def _receive(args: argparse.Namespace) -> int:
    from hospital_node.dicom_net.config import Peer, ReceiveConfig
    from hospital_node.dicom_net.scp import serve

    config = ReceiveConfig(_intake(args, args.quiet_seconds), args.port, args.ae_title,
                           tuple(Peer.parse(a) for a in args.allow), args.bind)
    _logging()
    return serve(config)


def _pull(args: argparse.Namespace) -> int:
    from hospital_node.dicom_net.config import PullConfig, RemoteAE
    from hospital_node.dicom_net.scu import pull

    config = PullConfig(_intake(args, 0.0), RemoteAE.parse(args.pacs), tuple(args.study),
                        tuple(args.patient), args.ae_title, args.timeout)
    _logging()
    result = pull(config)
    print(json.dumps(result.to_json(), indent=2))
    return 0 if result.ok else 1
