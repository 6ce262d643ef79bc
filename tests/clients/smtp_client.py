#!/usr/bin/env python3
"""SMTP submission test client (smtplib): EHLO, AUTH, send, print JSON.

Modes: auth-plain (AUTH PLAIN with initial response), auth-login
(AUTH LOGIN), none. Actions: send (MAIL/RCPT/DATA with --mail-from,
--rcpt and --message), noop, rset, quit, raw:<command line>.
Output adds "ehlo" (keywords) and "auth_mechanisms"; exit code as in
imap_client.py ("error" has the server's code and text).
"""

import smtplib

import clientlib


def check(code, msg, what, ok_codes):
    if code not in ok_codes:
        raise smtplib.SMTPResponseException(code, "%s failed: %s" % (what, clientlib.text(msg)))


def main(args, result):
    port = args.port or (465 if args.tls == "implicit" else 587)
    if args.tls == "implicit":
        s = smtplib.SMTP_SSL(args.host, port, timeout=args.timeout,
                             context=clientlib.tls_context(args))
    else:
        s = smtplib.SMTP(args.host, port, timeout=args.timeout)
    code, msg = s.ehlo(args.helo)
    check(code, msg, "EHLO", (250,))
    if args.tls == "starttls":
        code, msg = s.starttls(context=clientlib.tls_context(args))
        result.step("starttls", code == 220, clientlib.text(msg))
        code, msg = s.ehlo(args.helo)
        check(code, msg, "EHLO", (250,))
    result["ehlo"] = sorted(s.esmtp_features.keys())
    result["auth_mechanisms"] = s.esmtp_features.get("auth", "").split()

    if args.mode == "auth-plain":
        code, msg = s.docmd("AUTH", "PLAIN " + clientlib.plain_b64(args))
    elif args.mode == "auth-login":
        s.user, s.password = args.user, args.password
        code, msg = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
    elif args.mode in ("xoauth2", "oauthbearer"):
        # smtplib sends the initial response; a refused token gets the RFC 7628 error
        # challenge, answered with ^A.
        def answer(challenge=None):
            if challenge:
                result["oauth_error"] = clientlib.text(challenge)
                return "\x01"
            return clientlib.token_payload(args).decode()
        try:
            code, msg = s.auth(args.mode.upper(), answer)
        except smtplib.SMTPAuthenticationError as e:
            code, msg = e.smtp_code, e.smtp_error
    else:
        code, msg = None, None
    if code is not None:
        result["login_response"] = "%d %s" % (code, clientlib.text(msg))
        result.step(args.mode, code == 235, result["login_response"])
        check(code, msg, "AUTH", (235,))

    for action in args.actions:
        name, _, arg = action.partition(":")
        if name == "send":
            refused = s.sendmail(args.mail_from, args.rcpt or ["bob@example.org"],
                                 args.message.encode())
            result.step(action, not refused, {k: list(v) for k, v in refused.items()})
        elif name in ("noop", "rset"):
            code, msg = getattr(s, name)()
            result.step(action, code == 250, "%d %s" % (code, clientlib.text(msg)))
        elif name == "quit":
            code, msg = s.quit()
            result.step(action, code == 221, "%d %s" % (code, clientlib.text(msg)))
        elif name == "raw":
            code, msg = s.docmd(arg)
            result["raw_response"] = "%d %s" % (code, clientlib.text(msg))
            result.step(action, code < 400, result["raw_response"])
            check(code, msg, arg.split(" ")[0], range(200, 400))
        else:
            raise ValueError("unknown action %r" % action)


if __name__ == "__main__":
    parser = clientlib.base_parser(
        "SMTP submission test client", "auth-plain",
        ["auth-plain", "auth-login", "xoauth2", "oauthbearer", "none"])
    parser.add_argument("--helo", default="client.example.org")
    parser.add_argument("--mail-from", default="alice@example.org")
    parser.add_argument("--rcpt", action="append")
    clientlib.run(main, parser)
