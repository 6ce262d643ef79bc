//! A tiny SMTP server that accepts every message and keeps it in memory.
//!
//! Dovecot's submission service relays to it, so tests can check what a
//! client submitted through the proxy (envelope and body) without a real MTA.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// One message accepted by the sink, with its envelope as the relay sent it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SinkMessage {
    /// Argument of the last EHLO/HELO of the session.
    pub helo: String,
    /// Reverse path without the angle brackets (empty for the null sender).
    pub mail_from: String,
    /// Whatever followed `MAIL FROM:<...>` (ESMTP parameters), trimmed.
    pub mail_params: String,
    /// Forward paths without angle brackets, in RCPT order.
    pub rcpt_to: Vec<String>,
    /// Message content with dot-stuffing undone and the final `.` line removed.
    pub data: Vec<u8>,
}

impl SinkMessage {
    /// The message content as (lossy) UTF-8, for `contains` assertions.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// Handle to a running sink; the server stops when it is dropped.
///
/// It runs on its own thread and runtime so that it keeps answering while a
/// synchronous test (or a blocked `#[tokio::test]` runtime) waits on Dovecot.
pub struct SmtpSink {
    addr: SocketAddr,
    messages: Arc<Mutex<Vec<SinkMessage>>>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl SmtpSink {
    /// Starts the sink on 127.0.0.1 at a kernel-chosen port.
    pub fn start() -> SmtpSink {
        let std_listener =
            std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind SMTP sink");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("sink addr");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = oneshot::channel();
        let store = Arc::clone(&messages);
        let thread = thread::Builder::new()
            .name("smtp-sink".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("sink runtime");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).expect("sink listener");
                    tokio::select! {
                        _ = rx => {}
                        _ = accept_loop(listener, store) => {}
                    }
                });
            })
            .expect("spawn sink thread");
        SmtpSink {
            addr,
            messages,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// Address the sink listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Port the sink listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// A copy of every message accepted so far.
    pub fn messages(&self) -> Vec<SinkMessage> {
        self.messages.lock().expect("sink lock").clone()
    }

    /// Waits until at least `n` messages arrived (relaying is asynchronous).
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<SinkMessage> {
        let deadline = Instant::now() + timeout;
        loop {
            let messages = self.messages();
            if messages.len() >= n || Instant::now() >= deadline {
                return messages;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, store: Arc<Mutex<Vec<SinkMessage>>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let _ = session(stream, store).await;
        });
    }
}

/// Strips `<...>` from a path and splits off ESMTP parameters.
fn parse_path(arg: &str) -> (String, String) {
    let arg = arg.trim();
    if let Some(rest) = arg.strip_prefix('<') {
        if let Some(end) = rest.find('>') {
            return (rest[..end].to_string(), rest[end + 1..].trim().to_string());
        }
    }
    let mut parts = arg.splitn(2, ' ');
    let path = parts.next().unwrap_or_default().to_string();
    (path, parts.next().unwrap_or_default().trim().to_string())
}

async fn session(stream: TcpStream, store: Arc<Mutex<Vec<SinkMessage>>>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    write
        .write_all(b"220 sink.test ESMTP test sink\r\n")
        .await?;
    let mut current = SinkMessage::default();
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        let upper = text.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            current = SinkMessage {
                helo: text[4..].trim().to_string(),
                ..SinkMessage::default()
            };
            if upper.starts_with("EHLO") {
                b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 104857600\r\n"
            } else {
                b"250 sink.test\r\n"
            }
        } else if upper.starts_with("MAIL FROM:") {
            let (path, params) = parse_path(&text[10..]);
            current.mail_from = path;
            current.mail_params = params;
            current.rcpt_to.clear();
            b"250 2.1.0 Ok\r\n"
        } else if upper.starts_with("RCPT TO:") {
            current.rcpt_to.push(parse_path(&text[8..]).0);
            b"250 2.1.5 Ok\r\n"
        } else if upper == "DATA" {
            write
                .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                .await?;
            current.data = read_data(&mut reader).await?;
            store.lock().expect("sink lock").push(current.clone());
            current.mail_from.clear();
            current.mail_params.clear();
            current.rcpt_to.clear();
            b"250 2.0.0 Ok: queued\r\n"
        } else if upper == "RSET" {
            current.mail_from.clear();
            current.rcpt_to.clear();
            b"250 2.0.0 Ok\r\n"
        } else if upper.starts_with("NOOP") {
            b"250 2.0.0 Ok\r\n"
        } else if upper == "QUIT" {
            write.write_all(b"221 2.0.0 Bye\r\n").await?;
            return Ok(());
        } else {
            b"502 5.5.2 Command not recognized\r\n"
        };
        write.write_all(reply).await?;
    }
}

/// Reads a DATA body up to the lone `.` line, undoing dot-stuffing.
async fn read_data<R: AsyncBufReadExt + Unpin>(reader: &mut R) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == b".\r\n" || line == b".\n" {
            return Ok(data);
        }
        let content = if line.starts_with(b"..") {
            &line[1..]
        } else {
            &line[..]
        };
        data.extend_from_slice(content);
    }
}
