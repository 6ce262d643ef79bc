//! After login: copy bytes both ways with an idle timeout and byte counters. IMAP and
//! ManageSieve keep their framers on the way: client→backend forwards only commands that are
//! allowed and well formed (refusing `UNAUTHENTICATE` locally) and, for IMAP, holds a literal
//! until the backend asks for it; backend→client strips `UNAUTHENTICATE` from capability lists,
//! checks that every answer belongs to a forwarded command, and is where local replies are
//! inserted, at a response boundary so they never land inside a backend response (ManageSieve,
//! whose answers carry no tag, puts its refusals in the backend's own answer order instead; see
//! `proto::sieve`).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::proto::imap::framer::{ClientOutput, CommandFramer, ResponseFramer};
use crate::stream::Conn;
use crate::zerocopy::{Pipe, Run, Stop};

/// Smallest read per direction. IMAP IDLE updates and interactive answers fit; anything bigger
/// grows the reads within a few.
const BUF_MIN: usize = 512;
/// Largest read per direction (and the size of the per-thread read buffer), for bulk
/// transfers. A plain socket fills it in one read (fewer, larger reads and writes for a mailbox
/// download); over TLS a read returns about one 16 KiB record, so TLS sessions settle at
/// 16–32 KiB.
const BUF_MAX: usize = 64 * 1024;

/// Local replies that may wait for a response boundary before the client stops being read.
const REPLIES_QUEUED_MAX: usize = 8;

/// How long the backend may keep answering after the client closed its sending side.
const DRAIN: Duration = Duration::from_secs(5);

/// Opaque runs at least this long (an IMAP message body) bypass the proxy's memory when both
/// legs are cleartext (see `zerocopy`); shorter ones are not worth a pipe.
const ZERO_COPY_MIN: u64 = 16 * 1024;

/// A backend silent this long ends a bulk transfer of a session whose bytes all pass unexamined
/// (POP3, SMTP): its pipe is closed, so an idle session holds none. Between the messages of a
/// mailbox download (one round trip) the pipe stays.
const BULK_PAUSE: Duration = if cfg!(test) {
    Duration::from_millis(100)
} else {
    Duration::from_secs(1)
};

/// How much one read asks for: grows while reads fill it (a download) and shrinks back after a
/// few small reads (an idle or interactive session).
#[derive(Debug)]
struct ReadSize {
    len: usize,
    small_reads: u8,
}

impl ReadSize {
    fn new() -> Self {
        Self {
            len: BUF_MIN,
            small_reads: 0,
        }
    }

    fn get(&self) -> usize {
        self.len
    }

    /// Adapts the size after a read of `n` bytes.
    fn filled(&mut self, n: usize) {
        let len = self.len;
        if n == len && len < BUF_MAX {
            self.len = (len * 2).min(BUF_MAX);
            self.small_reads = 0;
        } else if n <= len / 4 && len > BUF_MIN {
            self.small_reads += 1;
            if self.small_reads >= 4 {
                self.len = (len / 2).max(BUF_MIN);
                self.small_reads = 0;
            }
        } else {
            self.small_reads = 0;
        }
    }

    /// Whether the last reads were small: output vectors may give memory back too.
    fn is_small(&self) -> bool {
        self.len == BUF_MIN
    }
}

thread_local! {
    /// The read buffer of every session this thread runs. A read's bytes are handed on (to
    /// the framer's output or the pending input) within the poll that read them, so between
    /// reads, which is nearly always for an idle session, a session holds no read buffer.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Reads at most `max` bytes (up to [`BUF_MAX`]) from `r` and gives them to `take` before
/// returning their count; 0 is the end of the stream.
async fn read_into<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    mut take: impl FnMut(&[u8]),
) -> std::io::Result<usize> {
    let max = max.min(BUF_MAX);
    std::future::poll_fn(|cx| {
        let mut poll = |space: &mut [u8]| {
            let mut rb = ReadBuf::new(&mut space[..max]);
            match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    take(rb.filled());
                    Poll::Ready(Ok(rb.filled().len()))
                }
                other => other.map(|r| r.map(|()| 0)),
            }
        };
        SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut space) => {
                if space.len() < BUF_MAX {
                    space.resize(BUF_MAX, 0);
                }
                poll(&mut space)
            }
            // Nothing polls a session from inside a read; should it ever, a buffer of its own.
            Err(_) => poll(&mut vec![0; max]),
        })
    })
    .await
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

/// Gives back the memory of an empty vector (an idle session holds none).
fn trim(v: &mut Vec<u8>) {
    if v.is_empty() && v.capacity() > 0 {
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
    /// The backend answered something the proxy never forwarded (a continuation request or a
    /// tag): the two sides read the client's bytes differently, so the session was closed.
    Desync,
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
    /// Of `to_backend`, the bytes that went socket to socket (IMAP `APPEND`, SMTP `DATA`).
    pub to_backend_zero_copy: u64,
    pub end: SpliceEnd,
}

/// What a protocol inspects on the client→backend direction.
pub trait Upstream: Send {
    /// What to forward, local replies, or abort.
    fn push(&mut self, input: &[u8]) -> ClientOutput;
    /// How many of the next client bytes `push` would forward unchanged and unexamined (the
    /// rest of an announced literal, an IMAP `APPEND` body), so they may go to the backend
    /// without it.
    fn opaque_ahead(&self) -> u64 {
        0
    }
    /// Accounts for `n` (at most [`Upstream::opaque_ahead`]) bytes sent without `push`.
    fn skipped(&mut self, _n: u64) {}
    /// Whether every client byte passes unchanged and unexamined, so that a bulk transfer
    /// (an SMTP `DATA` body) may go to the backend without the proxy once one is seen.
    fn all_opaque(&self) -> bool {
        false
    }
    /// Whether the client must not be read now (the backend's answer to a forwarded line is
    /// awaited). Applies an answer that came; the splice then calls `push(&[])` to forward
    /// what was held.
    fn waiting(&mut self) -> bool {
        false
    }
    /// Whether `push` stopped at a limit with input left that `push(&[])` would now take on.
    fn holding(&mut self) -> bool {
        false
    }
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
    /// Whether every backend byte passes unchanged and unexamined, so that a bulk transfer
    /// (a POP3 `RETR`) may go to the client without the proxy once one is seen.
    fn all_opaque(&self) -> bool {
        false
    }
    /// Whether the backend answered something nobody asked (see [`SpliceEnd::Desync`]).
    fn desync(&self) -> bool {
        false
    }
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
    fn all_opaque(&self) -> bool {
        true
    }
}

impl Downstream for Passthrough {
    fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(input);
    }
    fn at_boundary(&self) -> bool {
        true
    }
    fn all_opaque(&self) -> bool {
        true
    }
}

impl Upstream for CommandFramer {
    fn push(&mut self, input: &[u8]) -> ClientOutput {
        CommandFramer::push(self, input)
    }
    fn opaque_ahead(&self) -> u64 {
        self.literal_left()
    }
    fn skipped(&mut self, n: u64) {
        self.skip_literal(n);
    }
    fn waiting(&mut self) -> bool {
        CommandFramer::waiting(self)
    }
    fn holding(&mut self) -> bool {
        CommandFramer::holding(self)
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
    fn desync(&self) -> bool {
        ResponseFramer::desync(self)
    }
}

/// Splices a session, with `up` and `down` watching each direction (IMAP: the
/// [`CommandFramer`] and [`ResponseFramer`] of `proto::imap::framer::pair`; ManageSieve: `proto::sieve::splice_filters`; others:
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

/// Local replies waiting for a response boundary, shared by the two directions of one session.
#[derive(Default)]
struct Replies {
    queue: Mutex<VecDeque<Vec<u8>>>,
    /// A reply was queued.
    ready: Notify,
    /// The queue has room again.
    room: Notify,
}

impl Replies {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Vec<u8>>> {
        // Never held across an await or a panic-prone call; a poisoned lock's data is intact.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a reply, waiting while the queue is full (the client stops being read).
    async fn push(&self, reply: Vec<u8>) {
        while self.queue().len() >= REPLIES_QUEUED_MAX {
            self.room.notified().await;
        }
        self.queue().push_back(reply);
        self.ready.notify_one();
    }

    /// Appends every queued reply to `out` (call at a response boundary).
    fn take_into(&self, out: &mut Vec<u8>) {
        let mut queue = self.queue();
        if queue.is_empty() {
            return;
        }
        for reply in queue.drain(..) {
            out.extend_from_slice(&reply);
        }
        self.room.notify_one();
    }
}

/// The zero-copy state of one direction of a cleartext session.
#[derive(Default)]
struct Bypass {
    /// Open while a long opaque run (or a bulk transfer) is being forwarded.
    pipe: Option<Pipe>,
    /// A pipe could not be made (out of descriptors): copy until the next command or
    /// response, without a new attempt for every read of this body.
    no_pipe: bool,
    /// A bulk transfer is under way in a direction whose bytes all pass unexamined:
    /// everything goes through the pipe until the sender pauses.
    bulk: bool,
}

/// What [`Bypass::forward`] did.
enum Moved {
    /// `n` bytes went socket to socket; `literal` if they were part of an announced run
    /// (the filter must account for them), not of a bulk transfer.
    Bytes {
        n: usize,
        literal: bool,
    },
    /// The bulk transfer ended with a pause of the sender; the pipe is closed.
    Paused,
    /// No pipe: the next bytes take the copying path.
    Copy,
    /// The sender closed.
    Eof,
    Error,
}

impl Bypass {
    /// Whether the next bytes go through the pipe, with `ahead` bytes of an announced opaque
    /// run to come. A long run opens the pipe, which then carries the run to its end.
    fn wanted(&mut self, ahead: u64) -> bool {
        if ahead == 0 && !self.bulk {
            self.no_pipe = false;
        }
        let literal = ahead >= ZERO_COPY_MIN || (ahead > 0 && self.pipe.is_some());
        !self.no_pipe && (literal || self.bulk)
    }

    /// Moves the next bytes (at most `ahead` of an announced run; any number in bulk) from
    /// `from` to `to` through the pipe.
    ///
    /// Callers box this future: with its timer and readiness waits it is the largest state
    /// of a direction's loop, and inline it would be part of every session's task, idle or
    /// not. Boxed, only a session moving a body pays for it, one allocation per move of up
    /// to a pipe's capacity.
    async fn forward(&mut self, ahead: u64, from: &TcpStream, to: &TcpStream) -> Moved {
        if self.bulk {
            // The pipe is kept only while the sender keeps sending.
            match tokio::time::timeout(BULK_PAUSE, from.readable()).await {
                Err(_) => {
                    self.bulk = false;
                    self.pipe = None;
                    return Moved::Paused;
                }
                Ok(Err(_)) => return Moved::Error,
                Ok(Ok(())) => {}
            }
        }
        if self.pipe.is_none() {
            self.pipe = Pipe::new().ok();
            self.no_pipe = self.pipe.is_none();
            self.bulk &= !self.no_pipe;
        }
        let Some(pipe) = &self.pipe else {
            return Moved::Copy;
        };
        let run = if self.bulk {
            Run::Open
        } else {
            Run::Announced(ahead)
        };
        match pipe.forward(from, to, run).await {
            Ok(n) => Moved::Bytes {
                n,
                literal: !self.bulk,
            },
            Err(Stop::Eof) => Moved::Eof,
            Err(Stop::Io(_)) => Moved::Error,
        }
    }

    /// After an announced run's bytes were accounted for: its end closes the pipe.
    fn run_left(&mut self, ahead: u64) {
        if !self.bulk && ahead == 0 {
            self.pipe = None;
        }
    }

    /// After a copying read of `n` bytes: a long one in a direction that examines nothing
    /// starts a bulk transfer, and what follows it goes socket to socket.
    fn read(&mut self, n: usize, all_opaque: bool) {
        self.bulk = !self.no_pipe && all_opaque && n as u64 >= ZERO_COPY_MIN;
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
    CR: AsyncRead + Half + Unpin,
    CW: AsyncWrite + Half + Unpin,
    BR: AsyncRead + Half + Unpin,
    BW: AsyncWrite + Half + Unpin,
{
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let touch =
        |last: &AtomicU64| last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    let to_backend = AtomicU64::new(0);
    let to_client = AtomicU64::new(0);
    let zero_copied_up = AtomicU64::new(0);
    let zero_copied = AtomicU64::new(0);
    // Local replies from the client side, for the client at the next response boundary. Both
    // directions run in this one task: a queue and two wake-ups, nothing allocated up front.
    let replies = Replies::default();
    // The backend said something: a client side waiting for its answer looks again.
    let answered = Notify::new();

    // Pinned where they are made (not moved into the select below), so the session's task
    // holds each direction's state once: an idle connection pays for its task's size.
    // client -> backend
    let mut upstream = std::pin::pin!(async {
        let mut size = ReadSize::new();
        let mut pending = client_first;
        let mut bypass = Bypass::default();
        let mut resume = false;
        loop {
            if !pending.is_empty() || resume {
                resume = false;
                let out = up.push(&pending);
                pending.clear();
                if out.abort {
                    return SpliceEnd::ClientAbuse;
                }
                for reply in out.replies {
                    replies.push(reply).await;
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
            if size.is_small() {
                trim(&mut pending);
            }
            if up.waiting() {
                // Nothing more is read from the client until the backend has answered.
                while up.waiting() {
                    answered.notified().await;
                }
                resume = true;
                continue;
            }
            if up.holding() {
                resume = true;
                continue;
            }
            let ahead = up.opaque_ahead();
            if let (true, Some(from), Some(to)) =
                (bypass.wanted(ahead), client_r.tcp(), backend_w.tcp())
            {
                // `pending` is empty: everything read so far went through the framer. Boxed
                // (see `Bypass::forward`).
                match Box::pin(bypass.forward(ahead, from, to)).await {
                    Moved::Bytes { n, literal } => {
                        touch(&last);
                        if literal {
                            up.skipped(n as u64);
                            bypass.run_left(up.opaque_ahead());
                        }
                        to_backend.fetch_add(n as u64, Ordering::Relaxed);
                        zero_copied_up.fetch_add(n as u64, Ordering::Relaxed);
                        continue;
                    }
                    Moved::Paused => continue,
                    Moved::Copy => {}
                    Moved::Eof => {
                        let _ = backend_w.shutdown().await;
                        return SpliceEnd::Closed;
                    }
                    Moved::Error => return SpliceEnd::Error,
                }
            }
            let read = read_into(&mut client_r, size.get(), |bytes| {
                pending.extend_from_slice(bytes);
            });
            match read.await {
                Ok(0) => {
                    let _ = backend_w.shutdown().await;
                    return SpliceEnd::Closed;
                }
                Ok(n) => {
                    touch(&last);
                    size.filled(n);
                    bypass.read(n, up.all_opaque());
                }
                Err(_) => return SpliceEnd::Error,
            }
        }
    });

    // backend -> client
    let mut downstream = std::pin::pin!(async {
        let mut size = ReadSize::new();
        let mut out = Vec::new();
        down.push(&backend_first, &mut out);
        let mut bypass = Bypass::default();
        loop {
            if down.desync() {
                return SpliceEnd::Desync;
            }
            if down.at_boundary() {
                replies.take_into(&mut out);
            }
            if !out.is_empty() {
                if write_flushed(&mut client_w, &out).await.is_err() {
                    return SpliceEnd::Error;
                }
                to_client.fetch_add(out.len() as u64, Ordering::Relaxed);
                out.clear();
            }
            if size.is_small() {
                trim(&mut out);
            }
            let ahead = down.opaque_ahead();
            if let (true, Some(from), Some(to)) =
                (bypass.wanted(ahead), backend_r.tcp(), client_w.tcp())
            {
                // Nothing can be due to the client before these bytes: a local reply waits
                // for a boundary, and `out` is empty. Boxed (see `Bypass::forward`).
                match Box::pin(bypass.forward(ahead, from, to)).await {
                    Moved::Bytes { n, literal } => {
                        touch(&last);
                        if literal {
                            down.skipped(n as u64);
                            bypass.run_left(down.opaque_ahead());
                        }
                        to_client.fetch_add(n as u64, Ordering::Relaxed);
                        zero_copied.fetch_add(n as u64, Ordering::Relaxed);
                        continue;
                    }
                    Moved::Paused => continue,
                    Moved::Copy => {}
                    Moved::Eof => {
                        let _ = client_w.shutdown().await;
                        return SpliceEnd::Closed;
                    }
                    Moved::Error => return SpliceEnd::Error,
                }
            }
            tokio::select! {
                () = replies.ready.notified(), if down.at_boundary() => {}
                r = read_into(&mut backend_r, size.get(), |bytes| down.push(bytes, &mut out)) => match r {
                    Ok(0) => {
                        let _ = client_w.shutdown().await;
                        return SpliceEnd::Closed;
                    }
                    Ok(n) => {
                        touch(&last);
                        size.filled(n);
                        bypass.read(n, down.all_opaque());
                        answered.notify_one();
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
        to_backend_zero_copy: zero_copied_up.load(Ordering::Relaxed),
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zerocopy::tests::pair;
    use tokio::io::AsyncReadExt;

    /// An IMAP session spliced between two loopback legs, with the default limits.
    fn imap_session(
        client_leg: TcpStream,
        backend_leg: TcpStream,
    ) -> tokio::task::JoinHandle<SpliceStats> {
        tokio::spawn(run(
            crate::proto::imap::framer::pair(crate::proto::imap::framer::DEFAULT_COMMAND_MAX),
            Conn::Plain(client_leg),
            Conn::Plain(backend_leg),
            Vec::new(),
            Vec::new(),
            Duration::from_secs(30),
            CancellationToken::new(),
        ))
    }

    /// Reads `n` answer lines within 10 s; failing, says how many came.
    async fn read_answers(client: &mut TcpStream, n: usize) {
        let mut lines = 0;
        let done = tokio::time::timeout(Duration::from_secs(10), async {
            let mut buf = [0u8; 4096];
            while lines < n {
                let got = client.read(&mut buf).await.unwrap();
                assert!(got > 0);
                lines += buf[..got].iter().filter(|&&b| b == b'\n').count();
            }
        })
        .await;
        assert!(done.is_ok(), "stalled after {lines} answers");
    }

    /// More local replies than the queue holds, asked while a backend response is half sent:
    /// they wait for its end, arrive in order, and the client is read again once they drain.
    #[tokio::test]
    async fn local_replies_wait_for_the_response_boundary_in_order() {
        let (mut client, client_leg) = pair().await;
        let (backend_leg, mut backend) = pair().await;
        let session = imap_session(client_leg, backend_leg);
        // The backend starts a response with a literal and stops in the middle of it.
        backend
            .write_all(b"* 1 FETCH (BODY[] {10}\r\n01234")
            .await
            .unwrap();
        let head = b"* 1 FETCH (BODY[] {10}\r\n01234";
        let mut got = vec![0u8; head.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, head);
        let n = 3 * REPLIES_QUEUED_MAX;
        let mut asked = Vec::new();
        for i in 0..n {
            asked.extend_from_slice(format!("u{i} UNAUTHENTICATE\r\n").as_bytes());
        }
        asked.extend_from_slice(b"z NOOP\r\n");
        client.write_all(&asked).await.unwrap();
        // Nothing of the refusals reaches the client inside the literal, and the NOOP behind
        // them waits until the queue has room.
        let mut early = [0u8; 64];
        let read = client.read(&mut early);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), read)
                .await
                .is_err(),
            "a reply came out inside the literal"
        );
        let mut noop = [0u8; 8];
        let read = backend.read_exact(&mut noop);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), read)
                .await
                .is_err(),
            "the client was read past a full queue"
        );
        backend.write_all(b"56789)\r\n").await.unwrap();
        let mut want = b"56789)\r\n".to_vec();
        for i in 0..n {
            want.extend_from_slice(
                format!("u{i} NO [CANNOT] UNAUTHENTICATE is not available\r\n").as_bytes(),
            );
        }
        let mut all = vec![0u8; want.len()];
        client.read_exact(&mut all).await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&all),
            String::from_utf8_lossy(&want)
        );
        backend.read_exact(&mut noop).await.unwrap();
        assert_eq!(&noop, b"z NOOP\r\n");
        drop(client);
        drop(backend);
        let stats = session.await.unwrap();
        assert_eq!(stats.to_backend, 8);
    }

    /// A session that examines nothing (POP3) moves a bulk transfer socket to socket, bytes
    /// intact, and after a pause of the backend goes back to copying the small answers.
    #[tokio::test]
    async fn passthrough_bulk_goes_through_the_pipe_and_ends_with_a_pause() {
        let (mut client, client_leg) = pair().await;
        let (backend_leg, mut backend) = pair().await;
        let session = tokio::spawn(run(
            (Passthrough, Passthrough),
            Conn::Plain(client_leg),
            Conn::Plain(backend_leg),
            Vec::new(),
            b"+OK logged in\r\n".to_vec(),
            Duration::from_secs(30),
            CancellationToken::new(),
        ));
        let body: Vec<u8> = (0..2_000_000u32)
            .map(|i| {
                if i % 77 == 76 {
                    b'\n'
                } else {
                    b'a' + (i % 26) as u8
                }
            })
            .collect();
        let mut want = b"+OK logged in\r\n+OK message follows\r\n".to_vec();
        want.extend_from_slice(&body);
        want.extend_from_slice(b"\r\n.\r\n");
        let sent = want[b"+OK logged in\r\n".len()..].to_vec();
        let writer = tokio::spawn(async move {
            client.write_all(b"RETR 1\r\n").await.unwrap();
            client
        });
        let mut asked = [0u8; 8];
        backend.read_exact(&mut asked).await.unwrap();
        assert_eq!(&asked, b"RETR 1\r\n");
        let mut client = writer.await.unwrap();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; want.len()];
            client.read_exact(&mut got).await.unwrap();
            assert!(got == want, "the transfer arrived changed");
            client
        });
        for chunk in sent.chunks(50_000) {
            backend.write_all(chunk).await.unwrap();
        }
        let mut client = reader.await.unwrap();
        // A pause longer than BULK_PAUSE, then small answers both ways.
        tokio::time::sleep(BULK_PAUSE * 3).await;
        client.write_all(b"QUIT\r\n").await.unwrap();
        let mut quit = [0u8; 6];
        backend.read_exact(&mut quit).await.unwrap();
        assert_eq!(&quit, b"QUIT\r\n");
        backend.write_all(b"+OK bye\r\n").await.unwrap();
        let mut bye = [0u8; 9];
        client.read_exact(&mut bye).await.unwrap();
        assert_eq!(&bye, b"+OK bye\r\n");
        drop(backend);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let stats = session.await.unwrap();
        let total = (b"+OK logged in\r\n".len() + sent.len() + 9) as u64;
        assert_eq!(stats.to_client, total);
        assert_eq!(stats.end, SpliceEnd::Closed);
        assert!(
            stats.to_client_zero_copy > 1_500_000,
            "zero_copy={}",
            stats.to_client_zero_copy
        );
        assert!(stats.to_client_zero_copy < total - 9);
    }

    /// An `APPEND` body far over the threshold goes to the backend through the pipe, the
    /// framer's state after it is the same as if it had read it (the `UNAUTHENTICATE` that
    /// follows is still refused), and the literal of a refused command is never forwarded.
    #[tokio::test]
    async fn append_bodies_go_through_the_pipe_and_framing_survives_them() {
        let (mut client, client_leg) = pair().await;
        let (backend_leg, mut backend) = pair().await;
        let session = imap_session(client_leg, backend_leg);
        // Command-like lines inside the body must pass as data.
        let body: Vec<u8> = (0..1_500_000u32)
            .flat_map(|i| format!("x{i} UNAUTHENTICATE\r\n").into_bytes())
            .take(1_500_000)
            .collect();
        let refused_body = vec![b'z'; 100_000];
        let mut sent = format!("a APPEND INBOX {{{}+}}\r\n", body.len()).into_bytes();
        sent.extend_from_slice(&body);
        sent.extend_from_slice(b"\r\n");
        let mut refused = format!("b UNAUTHENTICATE {{{}+}}\r\n", refused_body.len()).into_bytes();
        refused.extend_from_slice(&refused_body);
        refused.extend_from_slice(b"\r\nc NOOP\r\n");
        // The non-synchronizing literal reaches the backend as a synchronizing one.
        let head = format!("a APPEND INBOX {{{}}}\r\n", body.len()).into_bytes();
        let mut want = head.clone();
        want.extend_from_slice(&sent[head.len() + 1..]);
        want.extend_from_slice(b"c NOOP\r\n");
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(70_000) {
                client.write_all(chunk).await.unwrap();
            }
            client.write_all(&refused).await.unwrap();
            client
        });
        let mut got = vec![0u8; head.len()];
        backend.read_exact(&mut got).await.unwrap();
        assert_eq!(got, head);
        // Nothing of the body comes before the backend asks for it.
        let mut early = [0u8; 1];
        let nothing =
            tokio::time::timeout(Duration::from_millis(200), backend.read(&mut early)).await;
        assert!(nothing.is_err(), "the literal was sent before the +");
        backend.write_all(b"+ Ready\r\n").await.unwrap();
        let mut rest = vec![0u8; want.len() - head.len()];
        backend.read_exact(&mut rest).await.unwrap();
        got.extend_from_slice(&rest);
        assert!(got == want, "the backend got something else");
        let mut client = writer.await.unwrap();
        backend
            .write_all(b"a OK appended\r\nc OK noop\r\n")
            .await
            .unwrap();
        let mut answers = Vec::new();
        let expected: &[u8] =
            b"a OK appended\r\nb NO [CANNOT] UNAUTHENTICATE is not available\r\nc OK noop\r\n";
        while answers.len() < expected.len() {
            let mut buf = [0u8; 256];
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0);
            answers.extend_from_slice(&buf[..n]);
        }
        // The refusal may come before or after the backend's answers (it is queued locally).
        let text = String::from_utf8(answers).unwrap();
        assert!(text.contains("b NO [CANNOT]"), "{text}");
        assert!(
            !text.contains("+ Ready"),
            "the client saw a + it did not ask for: {text}"
        );
        assert!(text.contains("a OK appended\r\n") && text.contains("c OK noop\r\n"));
        drop(client);
        let mut rest = Vec::new();
        backend.read_to_end(&mut rest).await.unwrap();
        assert!(
            rest.is_empty(),
            "forwarded after NOOP: {} bytes",
            rest.len()
        );
        drop(backend);
        let stats = session.await.unwrap();
        assert_eq!(stats.to_backend, want.len() as u64);
        assert!(
            stats.to_backend_zero_copy > 1_300_000
                && stats.to_backend_zero_copy <= body.len() as u64,
            "zero_copy_to_backend={}",
            stats.to_backend_zero_copy
        );
    }

    /// More pipelined commands than may be outstanding: the rest are held, and forwarded as
    /// the backend completes the first ones, without the client sending anything more.
    #[tokio::test]
    async fn commands_held_at_the_outstanding_limit_go_on_as_answers_come() {
        use tokio::io::AsyncBufReadExt;
        let (mut client, client_leg) = pair().await;
        let (backend_leg, backend) = pair().await;
        let session = imap_session(client_leg, backend_leg);
        const N: usize = 600;
        let many: Vec<u8> = (0..N)
            .flat_map(|i| format!("t{i} NOOP\r\n").into_bytes())
            .collect();
        client.write_all(&many).await.unwrap();
        // The backend answers each command as it reads it.
        let answering = tokio::spawn(async move {
            let (r, mut w) = backend.into_split();
            let mut lines = tokio::io::BufReader::new(r).lines();
            for _ in 0..N {
                let line = lines.next_line().await.unwrap().unwrap();
                let tag = line.split(' ').next().unwrap().to_owned();
                w.write_all(format!("{tag} OK\r\n").as_bytes())
                    .await
                    .unwrap();
            }
            (lines, w)
        });
        read_answers(&mut client, N).await;
        drop(client);
        drop(answering.await.unwrap());
        assert_eq!(session.await.unwrap().end, SpliceEnd::Closed);
    }

    /// Refused commands are answered a few per pass; the held rest is answered without the
    /// client sending anything more.
    #[tokio::test]
    async fn held_refusals_are_all_answered() {
        let (mut client, client_leg) = pair().await;
        let (backend_leg, mut backend) = pair().await;
        let session = imap_session(client_leg, backend_leg);
        const N: usize = 50;
        let bad: Vec<u8> = (0..N)
            .flat_map(|i| format!("t{i} XYZZY\r\n").into_bytes())
            .collect();
        client.write_all(&bad).await.unwrap();
        read_answers(&mut client, N).await;
        drop(client);
        let mut forwarded = Vec::new();
        backend.read_to_end(&mut forwarded).await.unwrap();
        assert!(forwarded.is_empty());
        drop(backend);
        session.await.unwrap();
    }

    #[test]
    fn reads_grow_for_bulk_and_shrink_when_idle() {
        let mut b = ReadSize::new();
        assert_eq!(b.get(), BUF_MIN);
        while b.get() < BUF_MAX {
            let n = b.get();
            b.filled(n);
        }
        assert_eq!(b.get(), BUF_MAX);
        for _ in 0..3 {
            b.filled(10);
        }
        assert_eq!(b.get(), BUF_MAX, "three small reads keep the size");
        b.filled(10);
        assert_eq!(b.get(), BUF_MAX / 2);
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
