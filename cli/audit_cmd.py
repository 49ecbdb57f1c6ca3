"""`fedsight audit verify|show`: check an audit log's hash chain, list its entries by kind/time."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from vocab.audit import KEY_FILE_ENV, KINDS

    a = sub.add_parser("audit", help="audit log: verify the hash chain, show entries")
    a_sub = a.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")

    v = a_sub.add_parser("verify", help="check the chain; exit 0 intact, 1 broken (line and "
                         "reason), 2 unreadable")
    v.add_argument("file", type=Path, metavar="FILE")
    v.add_argument("--key-file", type=Path, default=None, metavar="K",
                   help=f"HMAC key file the log was written with (default ${KEY_FILE_ENV})")
    v.set_defaults(func=_verify)

    s = a_sub.add_parser("show", help="list entries (no chain check: use verify)")
    s.add_argument("file", type=Path, metavar="FILE")
    s.add_argument("--kind", action="append", default=[], choices=KINDS, metavar="K",
                   help=f"only this kind, repeatable ({', '.join(KINDS)})")
    s.add_argument("--since", default=None, metavar="ISO", help="entries at or after this time "
                   "(ISO-8601; no zone = UTC)")
    s.add_argument("--until", default=None, metavar="ISO", help="entries before this time")
    s.add_argument("--json", action="store_true", help="one JSON entry per line")
    s.set_defaults(func=_show)


def _verify(args: argparse.Namespace) -> int:
    from vocab.audit import key_from_env, read_key, verify

    try:
        key = read_key(args.key_file, args.file) if args.key_file else key_from_env(args.file)
        result = verify(args.file, key)
    except OSError as e:
        print(f"fedsight audit verify: {args.file}: unreadable "
              f"({e.strerror or type(e).__name__})", file=sys.stderr)
        return 2
    print(result, file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


def _show(args: argparse.Namespace) -> int:
    from vocab.audit import parse_time, read_events

    since = parse_time(args.since) if args.since else None
    until = parse_time(args.until) if args.until else None
    kinds = set(args.kind)
    for e in read_events(args.file):  # AuditError (unreadable, torn, malformed): exit 2
        if (kinds and e.kind not in kinds) or (since and e.when < since) \
                or (until and e.when >= until):
            continue
        if args.json:
            print(json.dumps(e.to_dict(), sort_keys=True))
        else:
            data = json.dumps(dict(e.data), sort_keys=True, separators=(",", ":"))
            print(f"{e.seq:>6}  {e.time}  {e.kind:<17} {e.actor or '-':<14} {data}")
    return 0
