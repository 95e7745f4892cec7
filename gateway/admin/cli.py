"""`prefixgate admin ...`: the admin REST API from the command line (httpx, one call each).

```
prefixgate admin [--url URL] [--admin-key KEY] RESOURCE ACTION ...
  tenants create ID [--name N] [--metadata K=V] [--disabled] [QUOTA FLAGS]
  tenants list | get ID | delete ID
  tenants update ID [--name N] [--metadata K=V] [--disable | --enable] [QUOTA FLAGS]
  quota set ID [QUOTA FLAGS]            (replaces the whole quota: limits not given are unlimited)
  keys issue ID [--name N] [--expires-in SECONDS]
  keys list ID | revoke ID KEY_ID | rotate ID KEY_ID [--grace SECONDS]
  usage get ID | reset ID
  prefixes create NAME (--text TEXT | --system TEXT | --messages-file FILE) [--pin] [--ttl S]
  prefixes list | get NAME | delete NAME   (public prefixes: every tenant uses and hits them)
```

QUOTA FLAGS are the quota fields with dashes (`--requests-per-minute 50`), `none` for
unlimited; `tenants update` changes only the limits given. The answer's JSON goes to stdout;
an error's message to stderr with exit status 1 (2 for a usage error, such as no admin key).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import httpx

from gateway.settings import DEFAULT_URL, AdminClientSettings
from tenants import Quota

QUOTA_FIELDS = tuple(Quota.model_fields)

Request = tuple[str, str, dict[str, Any] | None]  # method, path, JSON body


def _integer(text: str) -> int | None:
    if text.lower() in ("none", "null", "unlimited"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def _limit(text: str) -> int | None:
    value = _integer(text)
    if value is not None and value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {value}")
    return value


def _add_quota_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "quota (a positive integer, or 'none' for unlimited; --priority: any integer, lower "
        "first, 'none' for 0)"
    )
    for name in QUOTA_FIELDS:
        flag = "--" + name.replace("_", "-")
        kind = _integer if name == "priority" else _limit
        group.add_argument(flag, dest=name, type=kind, default=argparse.SUPPRESS, metavar="N")


def _quota(args: argparse.Namespace) -> dict[str, int | None]:
    return {name: getattr(args, name) for name in QUOTA_FIELDS if hasattr(args, name)}


def _metadata(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"prefixgate admin: --metadata expects KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def add_admin_parser(commands: Any) -> None:
    """Add `admin` to the `prefixgate` subcommands."""
    admin = commands.add_parser(
        "admin",
        help="manage tenants, API keys, quotas and usage through a gateway's admin API",
        description="Call a running gateway's admin API (/admin). Prints the JSON answer.",
    )
    admin.add_argument(
        "--url",
        default=AdminClientSettings().url,
        help=f"gateway base URL (default: $PREFIXGATE_URL or {DEFAULT_URL})",
    )
    admin.add_argument("--admin-key", help="admin key (default: $PREFIXGATE_ADMIN_KEY)")
    admin.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    resources = admin.add_subparsers(dest="resource", required=True, metavar="RESOURCE")
    _tenants_parser(resources)
    quota = resources.add_parser("quota", help="replace a tenant's quota")
    actions = quota.add_subparsers(dest="action", required=True, metavar="ACTION")
    set_quota = actions.add_parser("set", help="replace the quota (limits not given: unlimited)")
    set_quota.add_argument("tenant_id")
    _add_quota_flags(set_quota)
    _keys_parser(resources)
    usage = resources.add_parser("usage", help="read or reset a tenant's usage")
    actions = usage.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("get", help="today, this month, the last hour by minute").add_argument(
        "tenant_id"
    )
    actions.add_parser("reset", help="zero today's and this month's usage").add_argument(
        "tenant_id"
    )
    _prefixes_parser(resources)


def _prefixes_parser(resources: Any) -> None:
    prefixes = resources.add_parser(
        "prefixes", help="register, list, read, delete public prefixes (shared system prompts)"
    )
    actions = prefixes.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="register (or replace) a public prefix")
    create.add_argument("name")
    content = create.add_mutually_exclusive_group(required=True)
    content.add_argument("--text", help="the prefix as plain text")
    content.add_argument("--system", help="the prefix as one system message")
    content.add_argument("--messages-file", metavar="FILE",
                         help="a JSON file holding the chat messages")  # fmt: skip
    create.add_argument("--pin", action="store_true", help="keep its KV blocks pinned")
    create.add_argument("--ttl", type=int, metavar="SECONDS",
                        help="forget it after this long unused (default: never)")  # fmt: skip
    actions.add_parser("list", help="list the public prefixes")
    actions.add_parser("get", help="describe one, with its counters").add_argument("name")
    actions.add_parser("delete", help="delete one (its pin ends)").add_argument("name")


def _tenants_parser(resources: Any) -> None:
    tenants = resources.add_parser("tenants", help="create, list, read, change, delete tenants")
    actions = tenants.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="create a tenant")
    create.add_argument("tenant_id")
    create.add_argument("--name")
    create.add_argument("--metadata", action="append", metavar="KEY=VALUE")
    create.add_argument("--disabled", action="store_true", help="create it disabled")
    _add_quota_flags(create)
    actions.add_parser("list", help="list tenants")
    actions.add_parser("get", help="describe a tenant").add_argument("tenant_id")
    update = actions.add_parser("update", help="change the fields given (quota: limits given)")
    update.add_argument("tenant_id")
    update.add_argument("--name")
    update.add_argument("--metadata", action="append", metavar="KEY=VALUE")
    enabled = update.add_mutually_exclusive_group()
    enabled.add_argument("--disable", dest="disabled", action="store_const", const=True)
    enabled.add_argument("--enable", dest="disabled", action="store_const", const=False)
    _add_quota_flags(update)
    delete = actions.add_parser("delete", help="delete a tenant, its keys and usage")
    delete.add_argument("tenant_id")


def _keys_parser(resources: Any) -> None:
    keys = resources.add_parser("keys", help="issue, list, revoke, rotate API keys")
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    issue = actions.add_parser("issue", help="issue a key (printed once, never again)")
    issue.add_argument("tenant_id")
    issue.add_argument("--name")
    issue.add_argument("--expires-in", type=int, metavar="SECONDS")
    actions.add_parser("list", help="list a tenant's keys").add_argument("tenant_id")
    revoke = actions.add_parser("revoke", help="revoke a key now")
    revoke.add_argument("tenant_id")
    revoke.add_argument("key_id")
    rotate = actions.add_parser("rotate", help="issue a replacement and revoke the old key")
    rotate.add_argument("tenant_id")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace", type=float, default=0.0, metavar="SECONDS",
                        help="old key stays valid this long (default 0: revoked now)")  # fmt: skip


def _tenants_request(args: argparse.Namespace) -> Request:
    base = "/admin/tenants"
    if args.action == "list":
        return "GET", base, None
    path = f"{base}/{args.tenant_id}"
    if args.action == "create":
        body: dict[str, Any] = {"id": args.tenant_id, "quota": _quota(args)}
        body |= {"metadata": _metadata(args.metadata), "disabled": args.disabled}
        return "POST", base, body | ({"name": args.name} if args.name is not None else {})
    if args.action == "update":
        patch: dict[str, Any] = {}
        if args.name is not None:
            patch["name"] = args.name
        if args.metadata:
            patch["metadata"] = _metadata(args.metadata)
        if args.disabled is not None:
            patch["disabled"] = args.disabled
        if quota := _quota(args):
            patch["quota"] = quota
        return "PATCH", path, patch
    return {"get": "GET", "delete": "DELETE"}[args.action], path, None


def _keys_request(args: argparse.Namespace) -> Request:
    keys = f"/admin/tenants/{args.tenant_id}/keys"
    if args.action == "issue":
        body = {"name": args.name, "expires_in_s": args.expires_in}
        return "POST", keys, {k: v for k, v in body.items() if v is not None}
    if args.action == "list":
        return "GET", keys, None
    if args.action == "revoke":
        return "DELETE", f"{keys}/{args.key_id}", None
    return "POST", f"{keys}/{args.key_id}/rotate", {"grace_s": args.grace}


def _quota_request(args: argparse.Namespace) -> Request:
    return "PUT", f"/admin/tenants/{args.tenant_id}/quota", _quota(args)


def _usage_request(args: argparse.Namespace) -> Request:
    usage = f"/admin/tenants/{args.tenant_id}/usage"
    if args.action == "get":
        return "GET", usage, None
    return "POST", f"{usage}/reset", None


def _prefixes_request(args: argparse.Namespace) -> Request:
    base = "/admin/prefixes"
    if args.action == "list":
        return "GET", base, None
    if args.action != "create":
        return {"get": "GET", "delete": "DELETE"}[args.action], f"{base}/{args.name}", None
    body: dict[str, Any] = {"name": args.name, "pin": args.pin, "ttl_seconds": args.ttl}
    if args.text is not None:
        body["text"] = args.text
    elif args.system is not None:
        body["messages"] = [{"role": "system", "content": args.system}]
    else:
        with open(args.messages_file, encoding="utf-8") as f:
            body["messages"] = json.load(f)
    return "POST", base, body


_REQUESTS: dict[str, Callable[[argparse.Namespace], Request]] = {
    "tenants": _tenants_request,
    "keys": _keys_request,
    "quota": _quota_request,
    "usage": _usage_request,
    "prefixes": _prefixes_request,
}


def run_admin(args: argparse.Namespace) -> int:
    """Make the call; print the answer (stdout) or the error (stderr). Returns the exit status."""
    admin_key = args.admin_key or AdminClientSettings().admin_key_value()
    if not admin_key:
        print("prefixgate admin: no admin key: pass --admin-key or set PREFIXGATE_ADMIN_KEY",
              file=sys.stderr)  # fmt: skip
        return 2
    method, path, body = _REQUESTS[args.resource](args)
    headers = {"authorization": f"Bearer {admin_key}"}
    try:
        with httpx.Client(base_url=args.url, headers=headers, timeout=args.timeout) as client:
            response = client.request(method, path, json=body)
    except httpx.HTTPError as exc:
        print(f"prefixgate admin: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if response.is_success:
        print(json.dumps(answer, indent=2))
        return 0
    error = answer.get("error", {}) if isinstance(answer, dict) else {}
    message = error.get("message") or response.text or response.reason_phrase
    code = f" ({error['code']})" if error.get("code") else ""
    print(f"prefixgate admin: {response.status_code}{code}: {message}", file=sys.stderr)
    return 1
