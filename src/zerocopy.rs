//! Zero-copy forwarding between two cleartext sockets: `splice(2)` from one socket into a pipe
//! and from the pipe into the other, so the bytes of a message body never enter the proxy's
//! memory. Used after login, in both directions, for the bytes a framer has no interest in: an
//! IMAP literal (a `FETCH` body to the client, an `APPEND` body to the backend), whose length
//! the framer already read in its announcement, and the bulk transfers of sessions that examine
//! nothing after login (a POP3 `RETR`, an SMTP `DATA`), from their first long read until the
//! sender pauses.
//!
//! On loopback a downloaded mailbox otherwise costs a copy from the kernel into a buffer and a
//! copy back, and that share of a core was taken from the backend and the reader (see
//! bench/RESULTS.md). TLS legs are untouched: their bytes must pass through rustls anyway.

use std::io;
use std::os::fd::OwnedFd;

use nix::fcntl::{splice, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// The pipe size asked for: fewer, larger moves (and wake-ups) per message body, like a
/// 256 KiB proxy buffer. The kernel may refuse (a user's pipes are limited by
/// `fs.pipe-user-pages-soft`); the default 64 KiB then serves.
const WANT_CAPACITY: usize = 256 * 1024;
/// What a Linux pipe holds by default (16 pages).
const DEFAULT_CAPACITY: usize = 64 * 1024;

/// A pipe for one message body (or one bulk transfer): made when it starts and closed when it
/// ends, so sessions hold no pipe (and no share of the user's pipe pages) between them.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Most bytes moved into the pipe per call.
    capacity: usize,
}

/// What is being forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    /// The rest of a run whose length was announced (an IMAP literal): this many bytes.
    Announced(u64),
    /// A transfer of unknown length (a POP3 `RETR` seen as bulk).
    Open,
}

/// How a forward ended early.
#[derive(Debug)]
pub enum Stop {
    /// The source closed before the promised bytes came.
    Eof,
    /// An I/O error on either socket or the pipe.
    Io(io::Error),
}

impl Pipe {
    /// A non-blocking, close-on-exec pipe.
    ///
    /// # Errors
    /// If the process is out of descriptors.
    pub fn new() -> io::Result<Self> {
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(io::Error::from)?;
        let capacity = nix::fcntl::fcntl(
            &write,
            nix::fcntl::FcntlArg::F_SETPIPE_SZ(WANT_CAPACITY as nix::libc::c_int),
        )
        .ok()
        .and_then(|size| usize::try_from(size).ok())
        .unwrap_or(DEFAULT_CAPACITY);
        Ok(Self {
            read,
            write,
            capacity,
        })
    }

    /// Moves bytes of `run` (at least one unless `from` is at its end; never more than an
    /// announced run's rest) from `from` to `to`, waiting for readiness as needed, and returns
    /// how many. Whatever enters the pipe is sent out before this returns, so the pipe is empty
    /// between calls and a dropped future (the session ending) loses only bytes of a session
    /// that is over.
    ///
    /// # Errors
    /// [`Stop::Eof`] if `from` closed first; [`Stop::Io`] on an error.
    pub async fn forward(&self, from: &TcpStream, to: &TcpStream, run: Run) -> Result<usize, Stop> {
        let max = match run {
            Run::Announced(left) => usize::try_from(left).unwrap_or(usize::MAX),
            Run::Open => usize::MAX,
        };
        let want = max.min(self.capacity);
        let filled = loop {
            match from.try_io(Interest::READABLE, || {
                splice(
                    from,
                    None,
                    &self.write,
                    None,
                    want,
                    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
                )
                .map_err(io::Error::from)
            }) {
                Ok(0) => return Err(Stop::Eof),
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    from.readable().await.map_err(Stop::Io)?;
                }
                Err(e) => return Err(Stop::Io(e)),
            }
        };
        // The rest of an announced run will follow: say so, and the kernel fills whole
        // segments on `to` instead of sending one per pipe buffer (a backend reading an
        // upload gets fewer, larger reads). Never for a run of unknown length, whose last
        // piece must not wait for bytes that may never come.
        let mut out_flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        if let Run::Announced(left) = run {
            if (filled as u64) < left {
                out_flags |= SpliceFFlags::SPLICE_F_MORE;
            }
        }
        let mut left = filled;
        while left > 0 {
            match to.try_io(Interest::WRITABLE, || {
                splice(&self.read, None, to, None, left, out_flags).map_err(io::Error::from)
            }) {
                Ok(0) => return Err(Stop::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    to.writable().await.map_err(Stop::Io)?;
                }
                Err(e) => return Err(Stop::Io(e)),
            }
        }
        Ok(filled)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Two ends of one loopback TCP connection (also used by the splice tests).
    pub(crate) async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn moves_exactly_what_is_asked_and_leaves_the_rest() {
        let (mut src_far, src) = pair().await;
        let (dst, mut dst_far) = pair().await;
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let writer = tokio::spawn(async move {
            src_far.write_all(&body).await.unwrap();
            src_far.write_all(b"TAIL").await.unwrap();
            src_far
        });
        let reader = tokio::spawn(async move {
            let mut got = vec![0; 300_000];
            dst_far.read_exact(&mut got).await.unwrap();
            got
        });
        let pipe = Pipe::new().unwrap();
        let mut left = 300_000u64;
        while left > 0 {
            let n = pipe
                .forward(&src, &dst, Run::Announced(left))
                .await
                .unwrap();
            assert!(n > 0 && n as u64 <= left && n <= pipe.capacity);
            left -= n as u64;
        }
        let got = reader.await.unwrap();
        assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
        // What follows the body stays in the source for an ordinary read.
        let _far = writer.await.unwrap();
        let mut src = src;
        let mut tail = [0u8; 4];
        src.read_exact(&mut tail).await.unwrap();
        assert_eq!(&tail, b"TAIL");
    }

    #[tokio::test]
    async fn a_source_that_closes_early_is_reported() {
        let (mut src_far, src) = pair().await;
        let (dst, _dst_far) = pair().await;
        src_far.write_all(b"short").await.unwrap();
        drop(src_far);
        let pipe = Pipe::new().unwrap();
        assert_eq!(
            pipe.forward(&src, &dst, Run::Announced(100)).await.unwrap(),
            5
        );
        assert!(matches!(
            pipe.forward(&src, &dst, Run::Announced(95)).await,
            Err(Stop::Eof)
        ));
    }
}
