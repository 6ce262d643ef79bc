//! CPU time and RSS of a set of processes, from /proc.

use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// utime + stime of all threads, in µs.
    pub cpu_us: u64,
    /// VmRSS summed over the processes, in KiB.
    pub rss_kib: u64,
}

/// Clock ticks per second (USER_HZ), from `getconf CLK_TCK`; 100 on every Linux we know.
fn ticks_per_s() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

pub fn sample(pids: &[u32]) -> Sample {
    let mut s = Sample::default();
    for pid in pids {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
            if let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
                    + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
                s.cpu_us += ticks * 1_000_000 / ticks_per_s();
            }
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(line) = status.lines().find(|l| l.starts_with("VmRSS:")) {
                s.rss_kib += line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    s
}
