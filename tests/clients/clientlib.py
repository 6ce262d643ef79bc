"""Shared plumbing for the protocol client scripts used by the Rust tests.

Each client takes its settings from argv or from a JSON object (--json, or
--json - for stdin), runs a list of actions, prints one JSON object on stdout
and exits 0 when every step succeeded, 1 otherwise. Secrets given to the
client never appear in its output: they are replaced by "<redacted>".
"""

import argparse
import base64
import json
import os
import ssl
import sys

REDACTED = "<redacted>"


def base_parser(description, default_mode, modes):
    """Options every client understands; the caller adds protocol specifics."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", help="JSON object with the same keys as the long options "
                   "(dashes as underscores) plus 'actions'; '-' reads stdin")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int)
    p.add_argument("--tls", choices=["none", "starttls", "implicit"], default="none")
    p.add_argument("--cafile", help="CA bundle to verify the server with")
    p.add_argument("--insecure", action="store_true",
                   help="TLS without certificate verification")
    p.add_argument("--server-name", help="name for SNI and the certificate check "
                   "(default: --host)")
    p.add_argument("--alpn", action="append", default=None,
                   help="ALPN protocol to offer (repeatable)")
    p.add_argument("--user")
    p.add_argument("--password")
    p.add_argument("--password-env", help="read the password from this variable")
    p.add_argument("--password-file", help="read the password from this file")
    p.add_argument("--authzid", default="",
                   help="SASL PLAIN authorization identity (default empty)")
    p.add_argument("--mode", choices=modes, default=default_mode)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--message", help="message text for append/send "
                   "(default: a small test message)")
    p.add_argument("--message-file", help="read the message from this file")
    p.add_argument("actions", nargs="*")
    return p


def parse_args(parser, argv=None):
    """argv first, then the JSON object on top of it (JSON wins)."""
    args = parser.parse_args(argv)
    if args.json:
        text = sys.stdin.read() if args.json == "-" else args.json
        for key, value in json.loads(text).items():
            setattr(args, key.replace("-", "_"), value)
    if args.password is None and args.password_env:
        args.password = os.environ.get(args.password_env)
    if args.password is None and args.password_file:
        with open(args.password_file, encoding="utf-8") as f:
            args.password = f.read().rstrip("\r\n")
    if args.message is None and args.message_file:
        with open(args.message_file, "rb") as f:
            args.message = f.read().decode("utf-8", "surrogateescape")
    if args.message is None:
        args.message = ("From: alice@example.org\r\nTo: bob@example.org\r\n"
                        "Subject: portcullis test\r\n\r\nHello from the test client.\r\n")
    return args


def tls_context(args):
    """Client TLS context: verify with --cafile unless --insecure."""
    if args.insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cafile=args.cafile)
    if args.alpn:
        ctx.set_alpn_protocols(args.alpn)
    return ctx


def server_name(args):
    return args.server_name or args.host


def plain_payload(args):
    """SASL PLAIN message: authzid NUL authcid NUL password."""
    return "\0".join([args.authzid or "", args.user or "", args.password or ""]).encode()


def xoauth2_payload(args):
    """XOAUTH2 initial response; the token is passed as the password."""
    return ("user=%s\x01auth=Bearer %s\x01\x01" % (args.user, args.password)).encode()


def oauthbearer_payload(args):
    """RFC 7628 OAUTHBEARER initial response; the token is passed as the password."""
    user = args.user.replace("=", "=3D").replace(",", "=2C")
    return ("n,a=%s,\x01host=%s\x01port=%d\x01auth=Bearer %s\x01\x01"
            % (user, args.host, args.port or 0, args.password)).encode()


def token_payload(args):
    return xoauth2_payload(args) if args.mode.startswith("xoauth2") else oauthbearer_payload(args)


def plain_b64(args):
    return base64.b64encode(plain_payload(args)).decode()


def secrets_of(args):
    """Strings that must never be printed.

    Replaced wherever they occur, even inside other words: use passwords
    that cannot appear in protocol text (not "bad" or "OK").
    """
    out = []
    if args.password:
        out.append(args.password)
        out.append(plain_b64(args))
        out.append(base64.b64encode(args.password.encode()).decode())
    return [s for s in out if s]


def redact(value, secrets):
    if isinstance(value, str):
        for s in secrets:
            value = value.replace(s, REDACTED)
        return value
    if isinstance(value, bytes):
        return redact(value.decode("utf-8", "replace"), secrets)
    if isinstance(value, list):
        return [redact(v, secrets) for v in value]
    if isinstance(value, dict):
        return {k: redact(v, secrets) for k, v in value.items()}
    return value


def text(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class Result:
    """Collects what happened; `finish` prints it and exits."""

    def __init__(self, args):
        self.args = args
        self.data = {"ok": False, "error": None, "steps": []}

    def step(self, action, ok, response=None):
        self.data["steps"].append({"action": action, "ok": ok, "response": response})

    def __setitem__(self, key, value):
        self.data[key] = value

    def __getitem__(self, key):
        return self.data[key]

    def finish(self, error=None):
        if error is not None:
            self.data["error"] = error
        self.data["ok"] = self.data["error"] is None
        out = redact(self.data, secrets_of(self.args))
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
        sys.exit(0 if self.data["ok"] else 1)


def run(main, parser):
    """Runs `main(args, result)`; any exception becomes the JSON error."""
    args = parse_args(parser)
    result = Result(args)
    try:
        main(args, result)
    except Exception as e:  # every library raises its own types
        if isinstance(e, OSError) and e.errno is not None:
            detail = str(e)  # socket and TLS errors
        else:
            # smtplib's (code, text), imaplib's and poplib's server line
            detail = " ".join(text(a) for a in e.args) if e.args else str(e)
        result.finish("%s: %s" % (type(e).__name__, detail))
    result.finish()
