//! Listening sockets. With per-core runtimes each runtime accepts on a socket of its own in one
//! `SO_REUSEPORT` group, so the kernel hands a new connection to exactly one runtime. A shared
//! socket (one descriptor per runtime) would wake every runtime for every connection, and all
//! but one would find nothing to accept: on a two-core machine that was one wake-up, one
//! `epoll_wait` and one failed `accept4` per login.
//!
//! `SO_REUSEPORT` also lets another process of the same user bind the same port and take a share
//! of the connections without any error. Before binding a group, [`bind`] therefore first binds
//! the address without the option: that fails while anything else (a group included) holds the
//! port, so a second instance or a stale one is refused at start as before.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;

/// Pending connections per socket (tokio's default for `TcpListener::bind`).
const BACKLOG: i32 = 1024;

/// Binds `addr`; with `reuse_port`, as the first socket of a group that [`sibling`] extends.
///
/// # Errors
/// If the address is taken (by anyone, group or not) or cannot be bound.
pub async fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    if !reuse_port {
        return TcpListener::bind(addr).await;
    }
    if addr.port() != 0 {
        // Fails with EADDRINUSE if the port is held, whatever options the holder used.
        drop(std::net::TcpListener::bind(addr)?);
    }
    TcpListener::from_std(group_member(addr)?)
}

/// Another socket in `listener`'s group, for another runtime to accept on (register it from
/// inside that runtime). Falls back to a second descriptor of the same socket when `listener`
/// was not bound as a group.
///
/// # Errors
/// If neither a group member nor a descriptor copy can be made.
pub fn sibling(listener: &TcpListener) -> io::Result<std::net::TcpListener> {
    let addr = listener.local_addr()?;
    let in_group = socket2::SockRef::from(listener).reuse_port()?;
    if in_group {
        if let Ok(member) = group_member(addr) {
            return Ok(member);
        }
    }
    use std::os::fd::AsFd as _;
    let copy = std::net::TcpListener::from(listener.as_fd().try_clone_to_owned()?);
    copy.set_nonblocking(true)?;
    Ok(copy)
}

/// A non-blocking listening socket on `addr` with `SO_REUSEPORT` (and `SO_REUSEADDR`, as tokio
/// sets for its listeners, so a restart does not wait out old connections in TIME_WAIT).
fn group_member(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_group_refuses_outsiders_and_takes_siblings() {
        let first = bind("127.0.0.1:0".parse().unwrap(), true).await.unwrap();
        let addr = first.local_addr().unwrap();
        let member = sibling(&first).unwrap();
        assert_eq!(member.local_addr().unwrap(), addr);
        assert!(socket2::SockRef::from(&member).reuse_port().unwrap());
        // A second instance (group or not) is refused while the group holds the port.
        assert!(bind(addr, true).await.is_err());
        assert!(bind(addr, false).await.is_err());
        // Both members accept connections to the address.
        let member = TcpListener::from_std(member).unwrap();
        let mut via = [0usize; 2];
        for _ in 0..32 {
            let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
            tokio::select! {
                r = first.accept() => { r.unwrap(); via[0] += 1; }
                r = member.accept() => { r.unwrap(); via[1] += 1; }
            }
        }
        assert_eq!(via[0] + via[1], 32);
        assert!(
            via[0] > 0 && via[1] > 0,
            "the kernel spreads over the group: {via:?}"
        );
    }

    #[tokio::test]
    async fn without_a_group_a_sibling_is_the_same_socket() {
        let first = bind("127.0.0.1:0".parse().unwrap(), false).await.unwrap();
        let copy = sibling(&first).unwrap();
        assert_eq!(copy.local_addr().unwrap(), first.local_addr().unwrap());
        assert!(!socket2::SockRef::from(&copy).reuse_port().unwrap());
        // A group cannot join a port held by a plain socket.
        assert!(bind(first.local_addr().unwrap(), true).await.is_err());
    }
}
