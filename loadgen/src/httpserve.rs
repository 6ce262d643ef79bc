//! What the generator's small servers (`authhttp`, `httpbackend`, `smtpsink`) share: binding and
//! announcing the port, the accept loop, and reading one bounded request head.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

/// Largest request head accepted; a longer one closes the connection.
const MAX_HEAD: usize = 64 * 1024;

/// Binds `addr` and prints the bound port on stdout (the benchmark script reads it).
pub async fn bind(addr: SocketAddr) -> TcpListener {
    let listener = TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let port = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("local addr: {e}"))
        .port();
    println!("{port}");
    listener
}

/// Accepts forever, running `handle` for each connection on its own task.
pub async fn serve<S, F, Fut>(listener: TcpListener, settings: S, handle: F) -> std::io::Result<()>
where
    S: Send + Sync + 'static,
    F: Fn(TcpStream, Arc<S>) -> Fut + Copy + Send + 'static,
    Fut: Future<Output = std::io::Result<()>> + Send + 'static,
{
    let settings = Arc::new(settings);
    loop {
        let (sock, _) = listener.accept().await?;
        let _ = sock.set_nodelay(true);
        tokio::spawn(handle(sock, settings.clone()));
    }
}

/// Reads until `buf` holds a whole request head; returns its length, or `None` when the peer
/// closed or the head grew past [`MAX_HEAD`].
pub async fn read_head(sock: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<usize>> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(p + 4));
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
