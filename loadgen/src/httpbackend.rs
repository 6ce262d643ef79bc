//! A minimal HTTP/1.1 backend standing in for Stalwart's HTTP side in the HTTP cells.
//!
//! It answers `200` with a small JSON body to `Authorization: Basic` of either a user with the
//! benchmark password (the direct contestant) or `<user>%<master>` with the master secret (what
//! Portcullis replays), and `401` to anything else. Keep-alive; request bodies are not
//! expected (the generator only sends `GET`).

use base64::Engine;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

pub struct Settings {
    pub password: String,
    pub master: String,
    pub master_secret: String,
}

pub async fn serve(listener: TcpListener, settings: Settings) -> std::io::Result<()> {
    crate::httpserve::serve(listener, settings, |sock, s| async move {
        connection(sock, &s).await
    })
    .await
}

/// Whether a Basic credential (the base64 text) is one this backend accepts.
fn accepted(b64: &[u8], s: &Settings) -> bool {
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64) else {
        return false;
    };
    let Ok(text) = std::str::from_utf8(&raw) else {
        return false;
    };
    let Some((user, pass)) = text.split_once(':') else {
        return false;
    };
    match user.split_once('%') {
        Some((_, master)) => master == s.master && pass == s.master_secret,
        None => pass == s.password,
    }
}

async fn connection(mut sock: TcpStream, s: &Settings) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(2048);
    loop {
        let Some(end) = crate::httpserve::read_head(&mut sock, &mut buf).await? else {
            return Ok(());
        };
        let mut ok = false;
        let mut close = false;
        for line in buf[..end]
            .split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .skip(1)
        {
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
            if name.eq_ignore_ascii_case(b"Authorization") {
                ok = value
                    .strip_prefix(b"Basic ")
                    .is_some_and(|b64| accepted(b64.trim_ascii(), s));
            } else if name.eq_ignore_ascii_case(b"Connection") {
                close = value.eq_ignore_ascii_case(b"close");
            }
        }
        let reply: &[u8] = if ok {
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"
        } else {
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"bench\"\r\nContent-Length: 0\r\n\r\n"
        };
        sock.write_all(reply).await?;
        if close {
            return Ok(());
        }
        buf.drain(..end);
    }
}
