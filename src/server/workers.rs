//! Per-core runtimes: one single-threaded tokio runtime per core, each accepting on its own copy
//! of every listening socket and running its connections to the end.
//!
//! A connection then never changes thread: its reads, the authenticator call, the backend login
//! and the splice all wake the same thread, so a login costs no cross-thread wake-ups (on a small
//! machine those were a third of the proxy's CPU per login; see bench/RESULTS.md). This is the
//! model of nginx's worker processes, inside one process so that the guard, the caches and the
//! metrics stay shared.

use std::cell::Cell;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The index of the runtime this thread belongs to (0 for the main thread and for every thread
/// of a work-stealing runtime). Connection pools use it to hand a pooled connection only to the
/// runtime whose reactor it is registered with.
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// How often [`timer_heartbeat`] wakes its runtime.
const HEARTBEAT: Duration = Duration::from_millis(500);

/// Keeps a timer due within [`HEARTBEAT`] on the calling runtime, forever.
///
/// tokio's timer wakes its own driver (an eventfd write, and an extra `epoll_wait` return)
/// whenever a new deadline is earlier than the one the runtime last went to sleep for. With
/// only long timers pending (idle timeouts of many minutes), each login's authenticator and
/// backend timeouts would do that two or three times. With a deadline never more than half a
/// second away, the second-long timeouts of a login never come first, for the price of two
/// wake-ups a second per runtime.
pub async fn timer_heartbeat() {
    loop {
        tokio::time::sleep(HEARTBEAT).await;
    }
}

/// The runtimes beyond the caller's, each on its own thread.
pub struct Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `extra` single-threaded runtimes, numbered 1..=extra.
    ///
    /// # Errors
    /// If a runtime or its thread cannot be created.
    pub fn start(extra: usize) -> std::io::Result<Self> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(extra);
        let mut threads = Vec::with_capacity(extra);
        for index in 1..=extra {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("portcullis-w{index}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(index));
                    // Drives this runtime's reactor, timers and tasks until the server stops.
                    runtime.block_on(async {
                        tokio::select! {
                            () = stop.cancelled() => {}
                            () = timer_heartbeat() => {}
                        }
                    });
                    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
                })?;
            threads.push(thread);
        }
        Ok(Self {
            handles,
            stop,
            threads,
        })
    }

    /// One handle per extra runtime, to spawn accept loops on.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// Stops the runtimes (their remaining tasks are dropped) and waits for their threads.
    pub fn stop(self) {
        self.stop.cancel();
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_runtime_knows_its_index() {
        let workers = Workers::start(2).unwrap();
        let mut seen = Vec::new();
        for handle in workers.handles() {
            let (tx, rx) = std::sync::mpsc::channel();
            handle.spawn(async move {
                let _ = tx.send(current());
            });
            seen.push(rx.recv().unwrap());
        }
        assert_eq!(seen, vec![1, 2]);
        assert_eq!(current(), 0);
        workers.stop();
    }
}
