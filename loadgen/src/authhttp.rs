//! A small, fast nginx mail `auth_http` answerer that both proxies ask.
//!
//! Any user with the shared benchmark password is accepted. The answer differs only in what the
//! proxy must replay upstream, so that both end up doing the same master login to the backend:
//!
//! - a request path starting with `/master` (nginx) gets `Auth-User: <user>%<master>` and
//!   `Auth-Pass: <master secret>`: nginx logs in upstream with exactly those;
//! - any other path (Portcullis) gets `Auth-User: <user>`, the canonical account: Portcullis logs
//!   in as `<user>%<master>` with its own copy of the master secret.
//!
//! HTTP/1.0 with `Connection: keep-alive` keeps the connection open (Portcullis asks for it;
//! nginx never does).

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

pub struct Settings {
    pub password: String,
    pub master: String,
    pub master_secret: String,
    pub imap_port: u16,
    pub pop3_port: u16,
    pub smtp_port: u16,
}

pub async fn serve(listener: TcpListener, settings: Settings) -> std::io::Result<()> {
    crate::httpserve::serve(listener, settings, |sock, s| async move {
        connection(sock, &s).await
    })
    .await
}

fn unescape(v: &[u8]) -> String {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'%' && i + 2 < v.len() {
            let hex = std::str::from_utf8(&v[i + 1..i + 3]).unwrap_or("zz");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(v[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn connection(mut sock: TcpStream, s: &Settings) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(2048);
    loop {
        let Some(end) = crate::httpserve::read_head(&mut sock, &mut buf).await? else {
            return Ok(());
        };
        let head = &buf[..end];
        let mut lines = head
            .split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let request = lines.next().unwrap_or_default();
        let path = request.split(|&b| b == b' ').nth(1).unwrap_or_default();
        let master_form = path.starts_with(b"/master");
        let (mut user, mut pass, mut proto, mut keepalive) = (None, None, Vec::new(), false);
        for line in lines {
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let name = &line[..colon];
            let value = line[colon + 1..].trim_ascii();
            if name.eq_ignore_ascii_case(b"Auth-User") {
                user = Some(unescape(value));
            } else if name.eq_ignore_ascii_case(b"Auth-Pass") {
                pass = Some(unescape(value));
            } else if name.eq_ignore_ascii_case(b"Auth-Protocol") {
                proto = value.to_ascii_lowercase();
            } else if name.eq_ignore_ascii_case(b"Connection") {
                keepalive = value.eq_ignore_ascii_case(b"keep-alive");
            }
        }
        let port = match proto.as_slice() {
            b"pop3" => s.pop3_port,
            b"smtp" => s.smtp_port,
            _ => s.imap_port,
        };
        let conn = if keepalive {
            "Connection: keep-alive\r\nContent-Length: 0\r\n"
        } else {
            ""
        };
        let reply = match (user, pass) {
            (Some(user), Some(pass)) if pass == s.password && !user.contains('%') => {
                if master_form {
                    format!(
                        "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: {port}\r\nAuth-User: {user}%{}\r\nAuth-Pass: {}\r\n{conn}\r\n",
                        s.master, s.master_secret
                    )
                } else {
                    format!(
                        "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: {port}\r\nAuth-User: {user}\r\n{conn}\r\n"
                    )
                }
            }
            _ => format!(
                "HTTP/1.0 200 OK\r\nAuth-Status: Invalid login or password\r\nAuth-Error-Code: 535 5.7.8\r\n{conn}\r\n"
            ),
        };
        sock.write_all(reply.as_bytes()).await?;
        if !keepalive {
            return Ok(());
        }
        buf.drain(..end);
    }
}
