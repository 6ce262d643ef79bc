#!/usr/bin/env python3
"""IMAP test client (imaplib): connect, log in, run actions, print JSON.

Example:
  imap_client.py --port 1143 --user alice@example.org --password-env PW \
      --mode authenticate-plain select append fetch idle logout

Modes: login (LOGIN), authenticate-plain (AUTHENTICATE PLAIN with a
continuation), authenticate-plain-ir (SASL-IR), none (stay unauthenticated).
Actions (an optional ':arg' follows the name):
  capability, select[:mailbox], examine[:mailbox], append[:mailbox],
  fetch[:seq] (BODY.PEEK[] into "fetched"), search, list, noop,
  idle[:seconds] (default 1), logout, raw:<command line without tag>.
Output: {"ok", "error", "greeting", "capabilities" (before login),
"login_response", "post_login_capabilities", "fetched", "steps": [...]}.
Exit 0 when every step succeeded, 1 otherwise ("error" has the server's text).
"""

import imaplib
import time

import clientlib


class TlsImap(imaplib.IMAP4_SSL):
    """IMAP4_SSL with a separate name for SNI/verification (--server-name)."""

    def __init__(self, host, port, ssl_context, timeout, sni):
        self._sni = sni
        super().__init__(host, port, ssl_context=ssl_context, timeout=timeout)

    def _create_socket(self, timeout):
        sock = imaplib.IMAP4._create_socket(self, timeout)
        return self.ssl_context.wrap_socket(sock, server_hostname=self._sni)


def caps(m):
    return sorted(c if isinstance(c, str) else c.decode() for c in m.capabilities)


def check(typ, data, what):
    if typ != "OK":
        raise imaplib.IMAP4.error("%s failed: %s" % (what, clientlib.text(data[-1] if data else typ)))


def idle(m, seconds, result):
    """IDLE for `seconds`, then DONE (imaplib in 3.11 has no idle())."""
    tag = m._new_tag()
    m.send(tag + b" IDLE\r\n")
    first = m.readline()
    if not first.startswith(b"+"):
        raise imaplib.IMAP4.error("IDLE refused: %s" % clientlib.text(first).strip())
    time.sleep(seconds)
    m.send(b"DONE\r\n")
    seen = []
    while True:
        line = m.readline()
        if not line:
            raise imaplib.IMAP4.abort("connection closed during IDLE")
        if line.startswith(tag):
            status = clientlib.text(line[len(tag):]).strip()
            result.step("idle", status.startswith("OK"), seen + [status])
            if not status.startswith("OK"):
                raise imaplib.IMAP4.error("IDLE failed: %s" % status)
            return
        seen.append(clientlib.text(line).strip())


def main(args, result):
    ctx = clientlib.tls_context(args) if args.tls != "none" else None
    port = args.port or (993 if args.tls == "implicit" else 143)
    if args.tls == "implicit":
        m = TlsImap(args.host, port, ctx, args.timeout, clientlib.server_name(args))
    else:
        m = imaplib.IMAP4(args.host, port, timeout=args.timeout)
    result["greeting"] = clientlib.text(m.welcome)
    if args.tls == "starttls":
        m.host = clientlib.server_name(args)  # imaplib uses it for SNI
        typ, data = m.starttls(ssl_context=ctx)
        result.step("starttls", typ == "OK", clientlib.text(data[-1]))
    result["capabilities"] = caps(m)

    if args.mode == "login":
        typ, data = m.login(args.user, args.password)
    elif args.mode == "authenticate-plain":
        typ, data = m.authenticate("PLAIN", lambda _: clientlib.plain_payload(args))
    elif args.mode == "authenticate-plain-ir":
        typ, data = m._simple_command("AUTHENTICATE", "PLAIN", clientlib.plain_b64(args))
        check(typ, data, "AUTHENTICATE")
        m.state = "AUTH"
    elif args.mode in ("xoauth2", "oauthbearer"):
        # A refused token gets an RFC 7628 error challenge, answered with ^A.
        def answer(challenge):
            if challenge:
                result["oauth_error"] = clientlib.text(challenge)
                return b"\x01"
            return clientlib.token_payload(args)
        try:
            typ, data = m.authenticate(args.mode.upper(), answer)
        except imaplib.IMAP4.error as e:
            typ, data = "NO", [str(e).encode()]
    else:
        typ, data = "OK", [b"not logged in"]
    if args.mode != "none":
        result["login_response"] = clientlib.text(data[-1])
        result.step(args.mode, typ == "OK", result["login_response"])
        typ, data = m.capability()
        result["post_login_capabilities"] = sorted(clientlib.text(data[-1]).split())

    for action in args.actions:
        name, _, arg = action.partition(":")
        if name == "capability":
            typ, data = m.capability()
            result.step(action, typ == "OK", clientlib.text(data[-1]))
        elif name in ("select", "examine"):
            typ, data = m.select(arg or "INBOX", readonly=(name == "examine"))
            check(typ, data, name)
            result.step(action, True, clientlib.text(data[-1]))
        elif name == "append":
            typ, data = m.append(arg or "INBOX", None, None, args.message.encode())
            check(typ, data, "APPEND")
            result.step(action, True, clientlib.text(data[-1]))
        elif name == "fetch":
            typ, data = m.fetch(arg or "1", "(BODY.PEEK[])")
            check(typ, data, "FETCH")
            if not data or not isinstance(data[0], tuple):
                raise imaplib.IMAP4.error("FETCH returned no message")
            result["fetched"] = clientlib.text(data[0][1])
            result.step(action, True, clientlib.text(data[0][0]))
        elif name == "search":
            typ, data = m.search(None, arg or "ALL")
            check(typ, data, "SEARCH")
            result["search"] = clientlib.text(data[0]).split()
            result.step(action, True, result["search"])
        elif name == "list":
            typ, data = m.list()
            check(typ, data, "LIST")
            result["mailboxes"] = [clientlib.text(d) for d in data]
            result.step(action, True, result["mailboxes"])
        elif name == "noop":
            typ, data = m.noop()
            result.step(action, typ == "OK", clientlib.text(data[-1]))
        elif name == "idle":
            idle(m, float(arg or 1), result)
        elif name == "logout":
            typ, data = m.logout()
            result.step(action, typ == "BYE", clientlib.text(data[-1]))
        elif name == "raw":
            command, _, rest = arg.partition(" ")
            typ, data = m.xatom(command, *([rest] if rest else []))
            result["raw_response"] = clientlib.text(data[-1]) if data else typ
            result.step(action, typ == "OK", result["raw_response"])
            check(typ, data, command)
        else:
            raise ValueError("unknown action %r" % action)


if __name__ == "__main__":
    parser = clientlib.base_parser(
        "IMAP test client", "login",
        ["login", "authenticate-plain", "authenticate-plain-ir", "xoauth2", "oauthbearer",
         "none"])
    clientlib.run(main, parser)
