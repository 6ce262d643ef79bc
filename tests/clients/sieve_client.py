#!/usr/bin/env python3
"""ManageSieve (RFC 5804) test client over a plain socket, printing JSON.

Modes: authenticate-plain (initial response in the command),
authenticate-plain-cont (empty challenge, then the response), none.
Actions: capability, listscripts, putscript[:name] (--script),
getscript[:name] (into "fetched"), setactive[:name], havespace,
noop, logout, raw:<command line>. Output and exit code as in imap_client.py.
"""

import re
import base64
import socket

import clientlib

DEFAULT_SCRIPT = 'require "fileinto";\r\nif header :contains "subject" "x" { fileinto "INBOX"; }\r\n'


class SieveError(Exception):
    pass


class Conn:
    def __init__(self, sock):
        self.sock = sock
        self.f = sock.makefile("rb")

    def send(self, line):
        self.sock.sendall(line.encode() + b"\r\n")

    def response(self):
        """Reads until OK/NO/BYE; returns (status, final line, data lines)."""
        lines = []
        while True:
            raw = self.f.readline()
            if not raw:
                raise SieveError("connection closed by server")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not line:
                continue  # the CRLF that ends a literal
            literal = re.search(r"\{(\d+)\+?\}$", line)
            if literal:
                body = self.f.read(int(literal.group(1)))
                lines.append(line[:literal.start()] + body.decode("utf-8", "replace"))
                continue
            word = line.split(" ", 1)[0].upper()
            if word in ("OK", "NO", "BYE"):
                return word, line, lines
            lines.append(line)

    def command(self, line, what):
        status, final, lines = self.response_to(line)
        if status != "OK":
            raise SieveError("%s failed: %s" % (what, final))
        return final, lines

    def response_to(self, line):
        self.send(line)
        return self.response()


def quoted(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def literal(s):
    data = s.encode()
    return "{%d+}\r\n%s" % (len(data), s)


def main(args, result):
    sock = socket.create_connection((args.host, args.port or 4190), timeout=args.timeout)
    c = Conn(sock)
    status, final, caps = c.response()
    result["greeting"] = final
    if args.tls == "starttls":
        c.command("STARTTLS", "STARTTLS")
        ctx = clientlib.tls_context(args)
        c = Conn(ctx.wrap_socket(sock, server_hostname=clientlib.server_name(args)))
        status, final, caps = c.response()
        result.step("starttls", status == "OK", final)
    elif args.tls == "implicit":
        raise SieveError("ManageSieve has no implicit TLS")
    result["capabilities"] = caps

    if args.mode == "authenticate-plain":
        final, _ = c.command('AUTHENTICATE "PLAIN" ' + quoted(clientlib.plain_b64(args)),
                             "AUTHENTICATE")
        result["login_response"] = final
        result.step(args.mode, True, final)
    elif args.mode == "authenticate-plain-cont":
        c.send('AUTHENTICATE "PLAIN"')
        challenge = c.f.readline()
        if challenge.strip() not in (b'""', b"{0}"):
            raise SieveError("unexpected challenge: %s" % challenge.decode("utf-8", "replace"))
        final, _ = c.command(quoted(clientlib.plain_b64(args)), "AUTHENTICATE")
        result["login_response"] = final
        result.step(args.mode, True, final)

    elif args.mode in ("xoauth2", "oauthbearer"):
        payload = base64.b64encode(clientlib.token_payload(args)).decode()
        c.send('AUTHENTICATE %s %s' % (quoted(args.mode.upper()), quoted(payload)))
        line = c.f.readline().strip()
        if line.startswith(b'"'):
            # The RFC 7628 error challenge of a refused token, answered with ^A.
            result["oauth_error"] = clientlib.text(base64.b64decode(line.strip(b'"')))
            final, _ = c.command(quoted("AQ=="), "AUTHENTICATE")
        elif line.startswith(b"OK"):
            final = clientlib.text(line)
        else:
            raise SieveError("AUTHENTICATE failed: %s" % clientlib.text(line))
        result["login_response"] = final
        result.step(args.mode, True, final)

    script = args.script or DEFAULT_SCRIPT
    for action in args.actions:
        name, _, arg = action.partition(":")
        if name == "capability":
            final, lines = c.command("CAPABILITY", "CAPABILITY")
            result["post_login_capabilities"] = lines
            result.step(action, True, lines)
        elif name == "listscripts":
            final, lines = c.command("LISTSCRIPTS", "LISTSCRIPTS")
            result["scripts"] = lines
            result.step(action, True, lines)
        elif name == "putscript":
            final, _ = c.command("PUTSCRIPT %s %s" % (quoted(arg or "test"), literal(script)),
                                 "PUTSCRIPT")
            result.step(action, True, final)
        elif name == "getscript":
            final, lines = c.command("GETSCRIPT " + quoted(arg or "test"), "GETSCRIPT")
            result["fetched"] = "".join(lines)
            result.step(action, True, final)
        elif name == "setactive":
            final, _ = c.command("SETACTIVE " + quoted(arg or "test"), "SETACTIVE")
            result.step(action, True, final)
        elif name == "havespace":
            final, _ = c.command("HAVESPACE %s 100" % quoted(arg or "test"), "HAVESPACE")
            result.step(action, True, final)
        elif name in ("noop", "logout"):
            final, _ = c.command(name.upper(), name.upper())
            result.step(action, True, final)
        elif name == "raw":
            status, final, lines = c.response_to(arg)
            result["raw_response"] = final
            result.step(action, status == "OK", lines + [final])
            if status != "OK":
                raise SieveError("%s failed: %s" % (arg.split(" ")[0], final))
        else:
            raise ValueError("unknown action %r" % action)


if __name__ == "__main__":
    parser = clientlib.base_parser(
        "ManageSieve test client", "authenticate-plain",
        ["authenticate-plain", "authenticate-plain-cont", "xoauth2", "oauthbearer", "none"])
    parser.add_argument("--script", help="script text for putscript")
    clientlib.run(main, parser)
