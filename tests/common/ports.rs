//! Loopback port helpers shared by the harness servers.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

/// Returns a port that was free a moment ago on 127.0.0.1.
///
/// The port is released before returning, so another process may grab it in
/// between; servers started on it (Dovecot) must retry with a fresh port when
/// the bind fails.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// `n` distinct free ports, so one server's listeners never collide with each other.
pub fn free_ports(n: usize) -> Vec<u16> {
    // Holding every listener until all are picked keeps the ports distinct.
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local_addr").port())
        .collect()
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
///
/// Returns false when `timeout` passes first, so callers can report which
/// server failed to come up instead of hanging.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until nothing accepts on 127.0.0.1:`port` any more (a server really stopped).
pub fn wait_for_port_closed(port: u16, timeout: Duration) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}
