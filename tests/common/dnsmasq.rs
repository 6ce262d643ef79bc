//! A private DNS server (Debian's dnsmasq) on a free loopback port, serving a DNSBL test zone
//! from a file the test writes; never the system configuration. Stopped on drop.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running dnsmasq.
pub struct Dnsmasq {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Dnsmasq {
    /// Serves `records` (`name`, `ipv4 answer`) authoritatively for each zone in `zones`
    /// (anything else in those zones is NXDOMAIN).
    pub fn start(zones: &[&str], records: &[(&str, &str)]) -> Dnsmasq {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conf = String::from(
            "no-resolv\nno-hosts\nno-poll\nbind-interfaces\nlisten-address=127.0.0.1\nlog-queries\n",
        );
        for zone in zones {
            conf.push_str(&format!("local=/{zone}/\n"));
        }
        for (name, ip) in records {
            conf.push_str(&format!("host-record={name},{ip}\n"));
        }
        let path: PathBuf = dir.path().join("dnsmasq.conf");
        std::fs::write(&path, conf).unwrap();
        for _ in 0..5 {
            let port = super::ports::free_port();
            let mut child = Command::new(binary())
                .arg("--keep-in-foreground")
                .arg(format!("--conf-file={}", path.display()))
                .arg(format!("--port={port}"))
                .arg("--user=root")
                .arg(format!("--pid-file={}", dir.path().join("pid").display()))
                .arg(format!(
                    "--log-facility={}",
                    dir.path().join("log").display()
                ))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start dnsmasq (Debian package dnsmasq-base)");
            if wait_dns(port, Duration::from_secs(5)) {
                return Dnsmasq {
                    child,
                    port,
                    _dir: dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("dnsmasq did not start");
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn binary() -> &'static str {
    if std::path::Path::new("/usr/sbin/dnsmasq").exists() {
        "/usr/sbin/dnsmasq"
    } else {
        "dnsmasq"
    }
}

/// Sends a minimal query until something answers on UDP `port`.
fn wait_dns(port: u16, timeout: Duration) -> bool {
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    // ID 0x1234, RD, one question: "probe." A IN.
    let query = [
        0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 5, b'p', b'r', b'o', b'b', b'e', 0, 0, 1,
        0, 1,
    ];
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        let _ = sock.send_to(&query, (Ipv4Addr::LOCALHOST, port));
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if n >= 2 && buf[..2] == [0x12, 0x34] {
                return true;
            }
        }
    }
    false
}
