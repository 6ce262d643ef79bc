"""JMAP client for the tests: the jmapc library (PyPI `jmapc==0.4.0`), not code of ours, talking
to Portcullis over HTTPS.

Modes:
  basic   Client.create_with_password(host, user, password)
  bearer  Client.create_with_api_token(host, token); the token is the password option

Actions (run in order after fetching the session, default: echo mailboxes):
  echo       Core/echo with a small object; fails unless it comes back unchanged
  mailboxes  Mailbox/get for the session's primary account; records the mailbox names

--second-user/--second-password-env add a second client whose requests alternate with the
first one's, action by action, over the same pooled HTTPS connection (the two clients share one
urllib3 connection pool), so a proxy that let an identity stick to a keep-alive connection would
show it. Both use the same mode.

Prints one JSON object: ok, username, account_id, mailboxes, echo, error, status (the HTTP
status of a failed request), connections (TLS connections the pool opened) and, with a second
user, `second` with that client's username, account_id and mailboxes. The password is never
printed.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clientlib import REDACTED, base_parser, parse_args  # noqa: E402

ECHO = {"hello": "portcullis", "n": 1}


def make_client(args, user, secret):
    from jmapc import Client

    host = f"{args.host}:{args.port}"
    if args.mode == "bearer":
        return Client.create_with_api_token(host, secret)
    return Client.create_with_password(host, user, secret)


def run_action(client, action, into):
    from jmapc.methods import CoreEcho, CoreEchoResponse, MailboxGet, MailboxGetResponse

    session = client.jmap_session
    into["username"] = session.username
    into["account_id"] = client.account_id
    if action == "session":
        pass
    elif action == "echo":
        resp = client.request(CoreEcho(data=ECHO))
        if not isinstance(resp, CoreEchoResponse) or resp.data != ECHO:
            raise RuntimeError(f"Core/echo came back as {resp!r}")
        into["echo"] = True
    elif action == "mailboxes":
        resp = client.request(MailboxGet(ids=None))
        if not isinstance(resp, MailboxGetResponse):
            raise RuntimeError(f"Mailbox/get answered {resp!r}")
        into["mailboxes"] = [m.name for m in resp.data]
    else:
        raise ValueError(f"unknown action {action}")


def main():
    p = base_parser(__doc__, "basic", ["basic", "bearer"])
    p.add_argument("--second-user")
    p.add_argument("--second-password-env")
    args = parse_args(p)
    if args.cafile:
        # requests reads its trust anchors from here.
        os.environ["REQUESTS_CA_BUNDLE"] = args.cafile
    actions = args.actions or ["echo", "mailboxes"]
    secrets = [s for s in (args.password,) if s]
    result = {"ok": False, "mailboxes": [], "echo": False}
    second = None
    try:
        first = make_client(args, args.user, args.password)
        clients = [(first, result)]
        if args.second_user:
            password2 = os.environ.get(args.second_password_env or "", "")
            if password2:
                secrets.append(password2)
            second = {"mailboxes": [], "echo": False}
            other = make_client(args, args.second_user, password2)
            # One pool for both: their requests share the keep-alive connection.
            other.requests_session.mount("https://", first.requests_session.get_adapter("https://"))
            clients.append((other, second))
            result["second"] = second
        # The session first, on its own: each action is then exactly one request per client.
        for action in ["session", *actions]:
            for client, into in clients:
                run_action(client, action, into)
        pools = first.requests_session.get_adapter("https://").poolmanager.pools
        result["connections"] = sum(pools[key].num_connections for key in pools.keys())
        result["ok"] = True
    except Exception as e:  # noqa: BLE001 (any failure is the result)
        response = getattr(e, "response", None)
        if response is not None:
            result["status"] = response.status_code
        text = f"{type(e).__name__}: {e}"
        for s in secrets:
            text = text.replace(s, REDACTED)
        result["error"] = text
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
