//! The SMTP server Dovecot's submission service relays to in the benchmark: it accepts every
//! envelope and discards every body, at the speed of a read loop, so a submission cell measures
//! the path in front of it rather than the sink. (A scripting-language sink would cap a 4 MiB
//! `DATA` well below what the proxies can move.)

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::dotend::DotEnd;
use crate::httpserve;

/// Longest command line accepted; a longer one closes the connection.
const MAX_LINE: u64 = 4096;

pub async fn serve(listener: TcpListener) -> io::Result<()> {
    httpserve::serve(listener, (), session).await
}

async fn session(sock: TcpStream, _: Arc<()>) -> io::Result<()> {
    let mut io = BufReader::with_capacity(64 * 1024, sock);
    io.get_mut().write_all(b"220 sink ESMTP\r\n").await?;
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        if (&mut io)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .await?
            == 0
        {
            return Ok(());
        }
        let verb = line
            .split(|&b| b == b' ' || b == b'\r' || b == b'\n')
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        let reply: &[u8] = match verb.as_slice() {
            b"EHLO" => b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 1073741824\r\n",
            b"HELO" | b"MAIL" | b"RCPT" | b"RSET" | b"NOOP" => b"250 2.0.0 OK\r\n",
            b"DATA" => {
                io.get_mut().write_all(b"354 go ahead\r\n").await?;
                discard_body(&mut io).await?;
                b"250 2.0.0 OK discarded\r\n"
            }
            b"QUIT" => {
                io.get_mut().write_all(b"221 2.0.0 bye\r\n").await?;
                return Ok(());
            }
            _ => b"502 5.5.1 not here\r\n",
        };
        io.get_mut().write_all(reply).await?;
    }
}

/// Reads and drops a `DATA` body up to and including its `CRLF . CRLF`.
async fn discard_body(io: &mut BufReader<TcpStream>) -> io::Result<()> {
    let mut end = DotEnd::new();
    loop {
        let buf = io.fill_buf().await?;
        if buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed inside DATA",
            ));
        }
        let found = end.scan(buf);
        let take = found.unwrap_or(buf.len());
        io.consume(take);
        if found.is_some() {
            return Ok(());
        }
    }
}
