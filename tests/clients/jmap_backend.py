"""A minimal JMAP server (RFC 8620 core, one Inbox from RFC 8621) standing in for Stalwart's JMAP
side in the tests. No JMAP server with master-user logins runs here, and the client under test
(jmapc) needs a server that speaks real JMAP, so this is just enough of one.

It knows only the Basic credentials it is given: the master forms `<account>%<master>:<secret>`
that Portcullis sends. A user's own password therefore only works through the proxy. Anything
else is answered 401 with `WWW-Authenticate: Basic`.

Usage: jmap_backend.py LOGFILE [PORT]
  The accepted `user:password` lines come in the environment variable JMAP_BACKEND_ACCEPT
  (newline separated), never in argv where `ps` would show them.
  Prints `READY <port>` once listening on 127.0.0.1, and exits when stdin closes.

Every request appends one JSON line to LOGFILE: method, path, the decoded Basic user (never the
password; null without Basic), and the client's port, so a test can see what the backend saw.
"""

import base64
import hashlib
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CORE = "urn:ietf:params:jmap:core"
MAIL = "urn:ietf:params:jmap:mail"
STATE = "s1"

ACCEPT = {line for line in os.environ.get("JMAP_BACKEND_ACCEPT", "").splitlines() if line}
LOG_LOCK = threading.Lock()


def account_id(account):
    """A stable JMAP Id (URL-safe characters only) for an account name."""
    return "a" + hashlib.sha256(account.encode()).hexdigest()[:16]


def basic_credentials(header):
    """(user, password) from a Basic Authorization header, or None."""
    if not header or not header.startswith("Basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return user, password


class Handler(BaseHTTPRequestHandler):
    # Keep-alive, as Stalwart does: Portcullis pools backend connections.
    protocol_version = "HTTP/1.1"
    log_file = None

    def log_message(self, *args):
        pass

    def record(self, user):
        line = json.dumps({
            "method": self.command,
            "path": self.path,
            "user": user,
            "peer_port": self.client_address[1],
        })
        with LOG_LOCK, open(self.log_file, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def reply(self, status, body, content_type="application/json", extra=()):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def authenticate(self):
        """The account name (before `%` in the master login) if the credentials are known."""
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        creds = basic_credentials(self.headers.get("Authorization"))
        self.record(creds[0] if creds else None)
        if creds is None or f"{creds[0]}:{creds[1]}" not in ACCEPT:
            self.reply(401, b"unauthorized\n", "text/plain",
                       [("WWW-Authenticate", 'Basic realm="jmap-backend"')])
            return None
        return creds[0].partition("%")[0]

    def do_GET(self):
        account = self.authenticate()
        if account is None:
            return
        if self.path != "/.well-known/jmap":
            self.reply(404, {"type": "about:blank", "status": 404})
            return
        # Built from Host, so the client's next requests come back through the proxy.
        base = f"https://{self.headers.get('Host')}/jmap"
        aid = account_id(account)
        session = {
            "capabilities": {
                CORE: {
                    "maxSizeUpload": 50_000_000,
                    "maxConcurrentUpload": 4,
                    "maxSizeRequest": 10_000_000,
                    "maxConcurrentRequests": 4,
                    "maxCallsInRequest": 16,
                    "maxObjectsInGet": 500,
                    "maxObjectsInSet": 500,
                    "collationAlgorithms": ["i;ascii-casemap"],
                },
                MAIL: {},
            },
            "accounts": {
                aid: {
                    "name": account,
                    "isPersonal": True,
                    "isReadOnly": False,
                    "accountCapabilities": {CORE: {}, MAIL: {}},
                },
            },
            "primaryAccounts": {CORE: aid, MAIL: aid},
            "username": account,
            "apiUrl": f"{base}/api/",
            "downloadUrl": f"{base}/download/{{accountId}}/{{blobId}}/{{name}}?accept={{type}}",
            "uploadUrl": f"{base}/upload/{{accountId}}/",
            "eventSourceUrl": f"{base}/eventsource/?types={{types}}&closeafter={{closeafter}}&ping={{ping}}",
            "state": STATE,
        }
        self.reply(200, session)

    def do_POST(self):
        account = self.authenticate()
        if account is None:
            return
        if self.path != "/jmap/api/":
            self.reply(404, {"type": "about:blank", "status": 404})
            return
        try:
            request = json.loads(self.body)
            calls = request["methodCalls"]
        except (ValueError, KeyError, TypeError):
            self.reply(400, {"type": "urn:ietf:params:jmap:error:notRequest", "status": 400})
            return
        own = account_id(account)
        responses = []
        for name, args, call_id in calls:
            if name == "Core/echo":
                responses.append(["Core/echo", args, call_id])
            elif name == "Mailbox/get":
                # Only the authenticated account's own mailboxes: a request for another
                # account (an identity mix-up somewhere in between) is an error, as in Stalwart.
                if args.get("accountId") != own:
                    responses.append(["error", {"type": "accountNotFound"}, call_id])
                    continue
                inbox = {
                    "id": "inbox-" + own,
                    "name": "Inbox",
                    "parentId": None,
                    "role": "inbox",
                    "sortOrder": 1,
                    "totalEmails": 0,
                    "unreadEmails": 0,
                    "totalThreads": 0,
                    "unreadThreads": 0,
                    "isSubscribed": True,
                    "myRights": {"mayReadItems": True},
                }
                responses.append(["Mailbox/get", {
                    "accountId": own, "state": "m1", "list": [inbox], "notFound": [],
                }, call_id])
            else:
                responses.append(["error", {"type": "unknownMethod"}, call_id])
        self.reply(200, {"methodResponses": responses, "sessionState": STATE})


def main():
    Handler.log_file = sys.argv[1]
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"READY {server.server_address[1]}", flush=True)
    # The test holds our stdin: when it goes away (test done or crashed), so do we.
    sys.stdin.read()
    server.shutdown()


if __name__ == "__main__":
    main()
