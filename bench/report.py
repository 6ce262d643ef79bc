#!/usr/bin/env python3
"""Turns the JSON lines of bench/compare.sh into the Markdown tables of bench/RESULTS.md.

Medians over repetitions; ratios Portcullis/nginx and Portcullis/direct; the targets of the
benchmark checked one by one.
"""
import argparse
import json
import statistics
from collections import defaultdict

ap = argparse.ArgumentParser()
ap.add_argument("raw")
ap.add_argument("--machine", default="")
ap.add_argument("--versions", default="")
ap.add_argument("--command", default="bench/compare.sh")
ap.add_argument("--load", default="")
a = ap.parse_args()

rows = [json.loads(l) for l in open(a.raw) if l.strip()]
cells = defaultdict(list)
for r in rows:
    if r.get("rep", 1) == 0 and r.get("mode") == "login":
        continue  # the leak loop, reported separately
    if "error" in r:
        continue  # a cell that could not even start (printed while running)
    key = (r["mode"], r.get("proto"), r.get("tls"), r.get("concurrency"), r["label"])
    cells[key].append(r)


def med(key, field, sub=None):
    vals = []
    for r in cells.get(key, []):
        v = r.get(field)
        if sub is not None and isinstance(v, dict):
            v = v.get(sub)
        if v is not None:
            vals.append(v)
    return statistics.median(vals) if vals else None


def fmt(v, digits=0):
    if v is None:
        return "—"
    return f"{v:,.{digits}f}"


def ratio(x, y):
    return None if x is None or not y else x / y


def rfmt(v):
    return "—" if v is None else f"{v:.2f}×"


out = []
p = out.append
p("## Comparison with nginx's mail proxy and direct Dovecot")
p("")
p(f"Machine: {a.machine}. {a.versions}. Load average at start / end: {a.load}.")
p("")
p("Reproduce with:")
p("")
p("```sh")
p(a.command)
p("```")
p("")
p("All on 127.0.0.1: Dovecot (master passdb, separator `%`, high-performance login processes, one")
p("`imap` process per session) is the backend and the ceiling (`direct`); one auth_http server")
p("(`loadgen authhttp`) answers both proxies; nginx (`libnginx-mod-mail`, `worker_processes auto`,")
p("default `proxy_buffer` 4k, and a second listener with 256k) and Portcullis (release build, `nginx`")
p("authenticator with keep-alive) both log in to Dovecot as `userN%master`. TLS rows: TLS 1.3 on the")
p("client leg, full handshake every login (no resumption), the same ECDSA P-256 certificate")
p("everywhere; backend legs are plain. Each login cell: N clients loop connect → (TLS) → login → NOOP")
p("(POP3 STAT, SMTP NOOP) → logout. Proxy CPU = utime + stime of the proxy's processes (nginx master")
p("+ workers; Portcullis) from /proc, over the cell, divided by logins or MiB: it does not depend on")
p("the backend. Latency is connect → login OK as the client sees it.")
p("")

logins = sorted({(k[1], k[2], k[3]) for k in cells if k[0] == "login" and k[1] != "http"},
                key=lambda x: (["imap", "pop3", "smtp"].index(x[0]) if x[0] in ["imap", "pop3", "smtp"] else 9, x[1], x[2]))
checks = []
if logins:
    p("### Logins")
    p("")
    p("| proto | TLS | c | direct /s | nginx /s | Portcullis /s | P/nginx | P/direct | p50 ms d / n / P | p99 ms d / n / P | CPU µs/login nginx | CPU µs/login P | CPU P/nginx | errors d/n/P |")
    p("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for proto, tls, c in logins:
        k = lambda who: ("login", proto, tls, c, who)
        d, n, pc = (med(k(w), "logins_per_s") for w in ("direct", "nginx", "portcullis"))
        p50 = [med(k(w), "login_latency_us", "p50") for w in ("direct", "nginx", "portcullis")]
        p99 = [med(k(w), "login_latency_us", "p99") for w in ("direct", "nginx", "portcullis")]
        cn, cp = med(k("nginx"), "proxy_cpu_us_per_login"), med(k("portcullis"), "proxy_cpu_us_per_login")
        errs = [sum(r.get("errors", 0) for r in cells.get(k(w), [])) for w in ("direct", "nginx", "portcullis")]
        ms = lambda v: fmt(v / 1000 if v is not None else None, 1)
        p(f"| {proto} | {'yes' if tls else 'no'} | {c} | {fmt(d)} | {fmt(n)} | {fmt(pc)} | {rfmt(ratio(pc, n))} | {rfmt(ratio(pc, d))} "
          f"| {' / '.join(ms(v) for v in p50)} | {' / '.join(ms(v) for v in p99)} | {fmt(cn)} | {fmt(cp)} | {rfmt(ratio(cp, cn))} | {'/'.join(map(str, errs))} |")
        tl = "TLS" if tls else "plain"
        if cn and cp:
            checks.append((f"{proto} {tl} c={c}: proxy CPU per login ≤ 0.75× nginx", ratio(cp, cn) <= 0.75, f"{ratio(cp, cn):.2f}×"))
        if c == 64 and n and pc and d:
            checks.append((f"{proto} {tl} c=64: logins/s ≥ 1.25× nginx", pc / n >= 1.25, f"{pc / n:.2f}×"))
            checks.append((f"{proto} {tl} c=64: logins/s ≥ 0.85× direct", pc / d >= 0.85, f"{pc / d:.2f}×"))
        if c == 16 and all(v is not None for v in p99):
            added_n, added_p = p99[1] - p99[0], p99[2] - p99[0]
            checks.append((f"{proto} {tl} c=16: login p99 ≤ nginx's", p99[2] <= p99[1],
                           f"{p99[2] / 1000:.1f} ms vs {p99[1] / 1000:.1f} ms (added over direct: {added_p / 1000:+.1f} vs {added_n / 1000:+.1f} ms)"))
    p("")

http = sorted({(k[2], k[3]) for k in cells if k[0] == "login" and k[1] == "http"})
if http:
    p("### HTTP with Basic auth (no nginx row: its mail proxy has no HTTP side)")
    p("")
    p("Each connection: connect → (TLS) → `GET` with `Authorization: Basic` → a second `GET` on the same")
    p("keep-alive connection → close. Portcullis authenticates each request on its own (`nginx`")
    p("authenticator, no auth cache) and replays the master Basic to the backend (`loadgen")
    p("httpbackend`, which checks it). Rates are connections per second (two requests each); latency")
    p("is connect → first response.")
    p("")
    p("| TLS | c | direct conn/s | Portcullis conn/s | P/direct | p50 ms d / P | p99 ms d / P | CPU µs/request P | errors d/P |")
    p("|---|---|---|---|---|---|---|---|---|")
    for tls, c in http:
        k = lambda who: ("login", "http", tls, c, who)
        d, pc = (med(k(w), "logins_per_s") for w in ("direct", "portcullis"))
        p50 = [med(k(w), "login_latency_us", "p50") for w in ("direct", "portcullis")]
        p99 = [med(k(w), "login_latency_us", "p99") for w in ("direct", "portcullis")]
        cp = med(k("portcullis"), "proxy_cpu_us_per_login")
        errs = [sum(r.get("errors", 0) for r in cells.get(k(w), [])) for w in ("direct", "portcullis")]
        ms = lambda v: fmt(v / 1000 if v is not None else None, 1)
        p(f"| {'yes' if tls else 'no'} | {c} | {fmt(d)} | {fmt(pc)} | {rfmt(ratio(pc, d))} | {' / '.join(ms(v) for v in p50)} "
          f"| {' / '.join(ms(v) for v in p99)} | {fmt(cp / 2 if cp is not None else None)} | {'/'.join(map(str, errs))} |")
    p("")

for mode, proto, title in (("fetch", "imap", "FETCH of a 4 MiB message (logged in once, repeated)"),
                           ("append", "imap", "APPEND of a 4 MiB message (then expunged)"),
                           ("retr", "pop3", "POP3 RETR of a 4 MiB message (logged in once, repeated)"),
                           ("send", "smtp", "SMTP submission of a 4 MiB message (MAIL, RCPT, DATA; logged in once, repeated)")):
    keys = sorted({(k[2], k[3]) for k in cells if k[0] == mode})
    if not keys:
        continue
    p(f"### {title}")
    p("")
    p("| TLS | c | direct MiB/s | nginx 4k MiB/s | nginx 256k MiB/s | Portcullis MiB/s | P/direct | P/nginx 4k | P/nginx 256k | CPU µs/MiB nginx 256k | CPU µs/MiB P |")
    p("|---|---|---|---|---|---|---|---|---|---|---|")
    for tls, c in keys:
        k = lambda who: (mode, proto, tls, c, who)
        d, n4, n256, pc = (med(k(w), "mib_per_s") for w in ("direct", "nginx", "nginx-256k", "portcullis"))
        cn, cp = med(k("nginx-256k"), "proxy_cpu_us_per_mib"), med(k("portcullis"), "proxy_cpu_us_per_mib")
        p(f"| {'yes' if tls else 'no'} | {c} | {fmt(d)} | {fmt(n4)} | {fmt(n256)} | {fmt(pc)} | {rfmt(ratio(pc, d))} | {rfmt(ratio(pc, n4))} | {rfmt(ratio(pc, n256))} | {fmt(cn)} | {fmt(cp)} |")
        if mode == "fetch" and pc and d:
            checks.append((f"FETCH {'TLS' if tls else 'plain'} c={c}: ≥ 0.95× direct", pc / d >= 0.95, f"{pc / d:.2f}×"))
    p("")

idle = sorted({k[2] for k in cells if k[0] == "idle"})
if idle:
    p("### Idle authenticated IMAP connections (SELECT INBOX, then IDLE)")
    p("")
    p("RSS growth of the proxy's processes divided by the connections. Each cell starts the proxy")
    p("afresh and warms it with one second of logins of the same kind (a process that served other")
    p("cells would hand their freed memory to the new connections and hardly grow). Median over the")
    p("repetitions; the single repetitions follow in brackets.")
    p("")
    p("| TLS | connections | nginx KiB/conn | Portcullis KiB/conn | P/nginx |")
    p("|---|---|---|---|---|")
    for tls in idle:
        k = lambda who: ("idle", "imap", tls, None, who)
        by_rep = lambda key: [r["proxy_kib_per_connection"] for r in sorted(cells.get(key, []), key=lambda r: r.get("rep", 1)) if "proxy_kib_per_connection" in r]
        reps = lambda key: " (" + ", ".join(f"{v:.1f}" for v in by_rep(key)) + ")" if len(by_rep(key)) > 1 else ""
        n, pc = med(k("nginx"), "proxy_kib_per_connection"), med(k("portcullis"), "proxy_kib_per_connection")
        conns = med(k("portcullis"), "connections")
        p(f"| {'yes' if tls else 'no'} | {fmt(conns)} | {fmt(n, 1)}{reps(k('nginx'))} | {fmt(pc, 1)}{reps(k('portcullis'))} | {rfmt(ratio(pc, n))} |")
        if pc is not None and n is not None:
            checks.append((f"idle {'TLS' if tls else 'plain'}: KiB/conn ≤ nginx's", pc <= n, f"{pc:.1f} vs {n:.1f} KiB"))
        if tls and pc is not None:
            checks.append(("idle TLS: ≤ 24 KiB/conn", pc <= 24, f"{pc:.1f} KiB"))
    p("")

leak = [r for r in rows if r.get("rep") == 0 and r.get("mode") == "login"]
if leak:
    r = leak[-1]
    s = r.get("proxy_rss_kib_samples", [])
    p(f"### RSS across a {r['seconds']:.0f} s login loop (Portcullis, IMAP over TLS, c={r['concurrency']})")
    p("")
    p(f"{r['logins']:,} logins ({r['logins_per_s']:.0f}/s, {r['errors']} errors). RSS (KiB) over time: "
      + ", ".join(f"{t:.0f} s: {kib:,}" for t, kib in s))
    if len(s) >= 3:
        mid, last = s[len(s) // 2][1], s[-1][1]
        checks.append(("no RSS growth in the second half of the login loop", last <= mid * 1.02 + 512, f"{mid:,} → {last:,} KiB"))
    p("")

if checks:
    p("### Targets")
    p("")
    p("| target | met | measured |")
    p("|---|---|---|")
    for name, ok, val in checks:
        p(f"| {name} | {'yes' if ok else '**no**'} | {val} |")
    p("")
print("\n".join(out))
