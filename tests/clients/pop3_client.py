#!/usr/bin/env python3
"""POP3 test client (poplib): connect, log in, run actions, print JSON.

Modes: user-pass (USER/PASS), authenticate-plain (AUTH PLAIN with initial
response), none. Actions: capa, stat, list, uidl, retr[:n] (into "fetched"),
noop, quit, raw:<command line>. Output and exit code as in imap_client.py.
"""

import base64
import poplib

import clientlib


def main(args, result):
    port = args.port or (995 if args.tls == "implicit" else 110)
    if args.tls == "implicit":
        p = poplib.POP3_SSL(args.host, port, timeout=args.timeout,
                            context=clientlib.tls_context(args))
    else:
        p = poplib.POP3(args.host, port, timeout=args.timeout)
    result["greeting"] = clientlib.text(p.getwelcome())
    if args.tls == "starttls":
        result.step("stls", True, clientlib.text(p.stls(context=clientlib.tls_context(args))))
    result["capabilities"] = sorted(p.capa().keys())

    if args.mode == "user-pass":
        p.user(args.user)
        response = p.pass_(args.password)
    elif args.mode == "authenticate-plain":
        response = p._shortcmd("AUTH PLAIN " + clientlib.plain_b64(args))
    elif args.mode in ("xoauth2", "oauthbearer"):
        payload = base64.b64encode(clientlib.token_payload(args)).decode()
        response = p._shortcmd("AUTH %s %s" % (args.mode.upper(), payload))
        if response.startswith(b"+ "):
            # The RFC 7628 error challenge of a refused token, answered with ^A.
            result["oauth_error"] = clientlib.text(base64.b64decode(response[2:]))
            response = p._shortcmd("AQ==")
    else:
        response = None
    if response is not None:
        result["login_response"] = clientlib.text(response)
        result.step(args.mode, True, result["login_response"])

    for action in args.actions:
        name, _, arg = action.partition(":")
        if name == "capa":
            result["post_login_capabilities"] = sorted(p.capa().keys())
            result.step(action, True, result["post_login_capabilities"])
        elif name == "stat":
            count, size = p.stat()
            result["stat"] = [count, size]
            result.step(action, True, [count, size])
        elif name == "list":
            resp, lines, _ = p.list()
            result.step(action, True, [clientlib.text(x) for x in lines])
        elif name == "uidl":
            resp, lines, _ = p.uidl()
            result.step(action, True, [clientlib.text(x) for x in lines])
        elif name == "retr":
            resp, lines, _ = p.retr(int(arg or 1))
            result["fetched"] = "\r\n".join(clientlib.text(x) for x in lines) + "\r\n"
            result.step(action, True, clientlib.text(resp))
        elif name == "noop":
            result.step(action, True, clientlib.text(p.noop()))
        elif name == "quit":
            result.step(action, True, clientlib.text(p.quit()))
        elif name == "raw":
            result["raw_response"] = clientlib.text(p._shortcmd(arg))
            result.step(action, True, result["raw_response"])
        else:
            raise ValueError("unknown action %r" % action)


if __name__ == "__main__":
    parser = clientlib.base_parser(
        "POP3 test client", "user-pass", ["user-pass", "authenticate-plain", "xoauth2", "oauthbearer", "none"])
    clientlib.run(main, parser)
