//! After login: copy bytes both ways with an idle timeout and byte counters. IMAP and
//! ManageSieve keep their light framers on the way: client→backend refuses `UNAUTHENTICATE`
//! locally, backend→client strips it from capability lists and is where local replies are
//! inserted, at a response boundary so they never land inside a backend response (ManageSieve,
//! whose answers carry no tag, puts its refusals in the backend's own answer order instead; see
//! `proto::sieve`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::proto::imap::framer::{ClientOutput, CommandFramer, ResponseFramer};
use crate::stream::Conn;
use crate::zerocopy::{Pipe, Stop};

/// Smallest read buffer per direction: what an idle session holds. IMAP IDLE updates and
/// interactive answers fit; anything bigger grows the buffer within a few reads.
const BUF_MIN: usize = 512;
/// Largest read buffer per direction, for bulk transfers. A plain socket fills it in one read
/// (fewer, larger reads and writes for a mailbox download); over TLS a read returns about one
/// 16 KiB record, so TLS sessions settle at 16–32 KiB.
const BUF_MAX: usize = 64 * 1024;

/// How long the backend may keep answering after the client closed its sending side.
const DRAIN: Duration = Duration::from_secs(5);

/// Opaque runs at least this long (an IMAP message body) bypass the proxy's memory when both
/// legs are cleartext (see `zerocopy`); shorter ones are not worth a pipe.
const ZERO_COPY_MIN: u64 = 16 * 1024;

/// A read buffer that grows while reads fill it (a download) and shrinks back after a few
/// small reads (an idle or interactive session), so thousands of idle IMAP IDLE sessions do
/// not each pin 128 KiB.
#[derive(Debug)]
struct AdaptiveBuf {
    buf: Vec<u8>,
    small_reads: u8,
}

impl AdaptiveBuf {
    fn new() -> Self {
        Self {
            buf: vec![0; BUF_MIN],
            small_reads: 0,
        }
    }

    fn space(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// Adapts the size after a read of `n` bytes.
    fn filled(&mut self, n: usize) {
        let len = self.buf.len();
        if n == len && len < BUF_MAX {
            self.buf = vec![0; (len * 2).min(BUF_MAX)];
            self.small_reads = 0;
        } else if n <= len / 4 && len > BUF_MIN {
            self.small_reads += 1;
            if self.small_reads >= 4 {
                self.buf = vec![0; (len / 2).max(BUF_MIN)];
                self.small_reads = 0;
            }
        } else {
            self.small_reads = 0;
        }
    }

    /// Whether the last reads were small: output vectors may give memory back too.
    fn is_small(&self) -> bool {
        self.buf.len() == BUF_MIN
    }
}

/// Writes all of `bytes` and flushes: tokio-rustls accepts bytes it could not yet send when the
/// socket is full and sends them only on a later write or flush, so without the flush the tail of
/// a large download would wait forever.
async fn write_flushed<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// Gives back the memory of a large, now empty, output vector.
fn trim(v: &mut Vec<u8>) {
    if v.is_empty() && v.capacity() > BUF_MIN {
        *v = Vec::new();
    }
}

/// How a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceEnd {
    /// One side closed and the other was drained.
    Closed,
    /// Both sides were silent for the idle timeout.
    Idle,
    /// The client broke framing (e.g. a command head over the bound).
    ClientAbuse,
    /// Shutdown deadline reached.
    Shutdown,
    /// An I/O error on either side.
    Error,
}

/// Bytes moved and how it ended.
#[derive(Debug, Clone, Copy)]
pub struct SpliceStats {
    pub to_backend: u64,
    pub to_client: u64,
    /// Of `to_client`, the bytes that went socket to socket without a copy (see `zerocopy`).
    pub to_client_zero_copy: u64,
    pub end: SpliceEnd,
}

/// What a protocol inspects on the client→backend direction.
pub trait Upstream: Send {
    /// What to forward, local replies, or abort.
    fn push(&mut self, input: &[u8]) -> ClientOutput;
}

/// What a protocol inspects on the backend→client direction.
pub trait Downstream: Send {
    /// Appends what to send to the client to `out`.
    fn push(&mut self, input: &[u8], out: &mut Vec<u8>);
    /// Whether a local reply may be inserted now.
    fn at_boundary(&self) -> bool;
    /// How many of the next backend bytes `push` would pass on unchanged and unexamined (the
    /// rest of an announced literal), so they may go to the client without it.
    fn opaque_ahead(&self) -> u64 {
        0
    }
    /// Accounts for `n` (at most [`Downstream::opaque_ahead`]) bytes sent without `push`.
    fn skipped(&mut self, _n: u64) {}
}

/// A split half of a leg, which may expose its cleartext socket for zero-copy forwarding.
trait Half {
    fn tcp(&self) -> Option<&TcpStream>;
}

impl Half for tokio::net::tcp::ReadHalf<'_> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

impl Half for tokio::net::tcp::WriteHalf<'_> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

impl Half for tokio::io::ReadHalf<Conn> {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

impl Half for tokio::io::WriteHalf<Conn> {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

/// Copies bytes unchanged (POP3, SMTP after login).
#[derive(Debug, Default, Clone, Copy)]
pub struct Passthrough;

impl Upstream for Passthrough {
    fn push(&mut self, input: &[u8]) -> ClientOutput {
        ClientOutput {
            forward: input.to_vec(),
            ..ClientOutput::default()
        }
    }
}

impl Downstream for Passthrough {
    fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(input);
    }
    fn at_boundary(&self) -> bool {
        true
    }
}

impl Upstream for CommandFramer {
    fn push(&mut self, input: &[u8]) -> ClientOutput {
        CommandFramer::push(self, input)
    }
}

impl Downstream for ResponseFramer {
    fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        ResponseFramer::push(self, input, out);
    }
    fn at_boundary(&self) -> bool {
        ResponseFramer::at_boundary(self)
    }
    fn opaque_ahead(&self) -> u64 {
        self.literal_left()
    }
    fn skipped(&mut self, n: u64) {
        self.skip_literal(n);
    }
}

/// Splices a session, with `up` and `down` watching each direction (IMAP: [`CommandFramer`]
/// and [`ResponseFramer`]; ManageSieve: `proto::sieve::splice_filters`; others:
/// [`Passthrough`]). `client_first` goes to the backend and `backend_first` to the client before
/// anything else (bytes already read during login). `stop` ends the splice (the server fires it
/// when the shutdown grace period is over).
///
/// A plain `fn` returning the session's future: an `async fn` keeps a second copy of its
/// arguments, and every idle connection would pay for it.
pub fn run<U: Upstream, D: Downstream>(
    filters: (U, D),
    client: Conn,
    backend: Conn,
    client_first: Vec<u8>,
    backend_first: Vec<u8>,
    idle: Duration,
    stop: CancellationToken,
) -> impl std::future::Future<Output = SpliceStats> {
    let (mut up, mut down) = filters;
    let (mut client, mut backend) = (client, backend);
    async move {
        let first = (client_first, backend_first);
        // Both cleartext: halves that borrow the sockets, so opaque runs can be spliced.
        if let (Conn::Plain(c), Conn::Plain(b)) = (&mut client, &mut backend) {
            let legs = (c.split(), b.split());
            return pump(&mut up, &mut down, legs, first, idle, stop).await;
        }
        let legs = (tokio::io::split(client), tokio::io::split(backend));
        pump(&mut up, &mut down, legs, first, idle, stop).await
    }
}

/// [`run`] over split legs.
async fn pump<U, D, CR, CW, BR, BW>(
    up: &mut U,
    down: &mut D,
    ((mut client_r, mut client_w), (mut backend_r, mut backend_w)): ((CR, CW), (BR, BW)),
    (client_first, backend_first): (Vec<u8>, Vec<u8>),
    idle: Duration,
    stop: CancellationToken,
) -> SpliceStats
where
    U: Upstream,
    D: Downstream,
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Half + Unpin,
    BR: AsyncRead + Half + Unpin,
    BW: AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let touch =
        |last: &AtomicU64| last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    let to_backend = AtomicU64::new(0);
    let to_client = AtomicU64::new(0);
    let zero_copied = AtomicU64::new(0);
    let (reply_tx, mut reply_rx) = mpsc::channel::<Vec<u8>>(8);

    // Pinned where they are made (not moved into the select below), so the session's task
    // holds each direction's state once: an idle connection pays for its task's size.
    // client -> backend
    let mut upstream = std::pin::pin!(async {
        let mut buf = AdaptiveBuf::new();
        let mut pending = client_first;
        loop {
            if !pending.is_empty() {
                let out = up.push(&pending);
                pending.clear();
                if out.abort {
                    return SpliceEnd::ClientAbuse;
                }
                for reply in out.replies {
                    if reply_tx.send(reply).await.is_err() {
                        return SpliceEnd::Closed;
                    }
                }
                if !out.forward.is_empty() {
                    // Flushed: a TLS stream may keep records it could not write yet, and
                    // nothing else would push them out before the next write.
                    if write_flushed(&mut backend_w, &out.forward).await.is_err() {
                        return SpliceEnd::Error;
                    }
                    to_backend.fetch_add(out.forward.len() as u64, Ordering::Relaxed);
                }
            }
            if buf.is_small() {
                trim(&mut pending);
            }
            match client_r.read(buf.space()).await {
                Ok(0) => {
                    let _ = backend_w.shutdown().await;
                    return SpliceEnd::Closed;
                }
                Ok(n) => {
                    touch(&last);
                    pending.extend_from_slice(&buf.space()[..n]);
                    buf.filled(n);
                }
                Err(_) => return SpliceEnd::Error,
            }
        }
    });

    // backend -> client
    let mut downstream = std::pin::pin!(async {
        let mut buf = AdaptiveBuf::new();
        let mut out = Vec::new();
        down.push(&backend_first, &mut out);
        let mut replies_open = true;
        // Open while a long opaque run is being forwarded.
        let mut pipe: Option<Pipe> = None;
        // A pipe could not be made (out of descriptors): copy until the next response.
        let mut no_pipe = false;
        loop {
            if !out.is_empty() {
                if write_flushed(&mut client_w, &out).await.is_err() {
                    return SpliceEnd::Error;
                }
                to_client.fetch_add(out.len() as u64, Ordering::Relaxed);
                out.clear();
            }
            if buf.is_small() {
                trim(&mut out);
            }
            let ahead = down.opaque_ahead();
            // A long run starts the pipe, which then carries it to its end.
            if ahead == 0 {
                no_pipe = false;
            }
            let zero_copy = !no_pipe && (ahead >= ZERO_COPY_MIN || (ahead > 0 && pipe.is_some()));
            if let (true, Some(from), Some(to)) = (zero_copy, backend_r.tcp(), client_w.tcp()) {
                // Nothing can be due to the client before these bytes: a local reply waits
                // for a boundary, and `out` is empty.
                if pipe.is_none() {
                    // Out of descriptors: the bytes take the copying path below, without a
                    // new attempt for every read of this body.
                    pipe = Pipe::new().ok();
                    no_pipe = pipe.is_none();
                }
                if let Some(p) = &pipe {
                    match p.forward(from, to, ahead).await {
                        Ok(n) => {
                            touch(&last);
                            down.skipped(n as u64);
                            to_client.fetch_add(n as u64, Ordering::Relaxed);
                            zero_copied.fetch_add(n as u64, Ordering::Relaxed);
                            if down.opaque_ahead() == 0 {
                                pipe = None;
                            }
                            continue;
                        }
                        Err(Stop::Eof) => {
                            let _ = client_w.shutdown().await;
                            return SpliceEnd::Closed;
                        }
                        Err(Stop::Io(_)) => return SpliceEnd::Error,
                    }
                }
            }
            tokio::select! {
                reply = reply_rx.recv(), if replies_open && down.at_boundary() => {
                    match reply {
                        Some(reply) => out.extend_from_slice(&reply),
                        None => replies_open = false,
                    }
                }
                r = backend_r.read(buf.space()) => match r {
                    Ok(0) => {
                        let _ = client_w.shutdown().await;
                        return SpliceEnd::Closed;
                    }
                    Ok(n) => {
                        touch(&last);
                        down.push(&buf.space()[..n], &mut out);
                        buf.filled(n);
                    }
                    Err(_) => return SpliceEnd::Error,
                }
            }
        }
    });

    let idle_watch = async {
        loop {
            let since = Duration::from_millis(last.load(Ordering::Relaxed));
            let quiet = start.elapsed().saturating_sub(since);
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    };

    let end = tokio::select! {
        end = async {
            tokio::select! {
                e = &mut upstream => match e {
                    // The client finished sending (a script piping `LOGOUT` or `QUIT` and
                    // closing its side): the backend's write side was shut down; let its last
                    // answers reach the client, for a bounded time.
                    SpliceEnd::Closed => tokio::time::timeout(DRAIN, &mut downstream)
                        .await
                        .unwrap_or(SpliceEnd::Closed),
                    other => other,
                },
                e = &mut downstream => e,
            }
        } => end,
        () = idle_watch => SpliceEnd::Idle,
        () = stop.cancelled() => SpliceEnd::Shutdown,
    };
    SpliceStats {
        to_backend: to_backend.load(Ordering::Relaxed),
        to_client: to_client.load(Ordering::Relaxed),
        to_client_zero_copy: zero_copied.load(Ordering::Relaxed),
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_grow_for_bulk_and_shrink_when_idle() {
        let mut b = AdaptiveBuf::new();
        assert_eq!(b.space().len(), BUF_MIN);
        while b.space().len() < BUF_MAX {
            let n = b.space().len();
            b.filled(n);
        }
        assert_eq!(b.space().len(), BUF_MAX);
        for _ in 0..3 {
            b.filled(10);
        }
        assert_eq!(b.space().len(), BUF_MAX, "three small reads keep the size");
        b.filled(10);
        assert_eq!(b.space().len(), BUF_MAX / 2);
        // Four small reads per halving, down to the floor.
        let halvings = (BUF_MAX / 2 / BUF_MIN).trailing_zeros() as usize;
        for _ in 0..4 * halvings {
            assert!(!b.is_small());
            b.filled(10);
        }
        assert!(b.is_small());
        let mut v = Vec::with_capacity(BUF_MAX);
        trim(&mut v);
        assert_eq!(v.capacity(), 0);
    }
}
