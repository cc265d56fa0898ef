//! One lifecycle for the daemon's background workers (the kernel gate's sync, the pricing
//! engine): `server.rs` starts them, and one shutdown signal stops them all; each is joined,
//! none is detached.
//!
//! The order at shutdown (`Server::run`): the listener stops accepting and drains the requests
//! in flight (their decisions are published), then [`Workers::stop`] signals every worker and
//! waits for each (the kernel sync applies what is still queued and leaves the pinned maps
//! enforcing), then the audit ledger is flushed.
use std::future::Future;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A worker's view of the shutdown signal (cheap to clone).
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Resolves once shutdown is requested (or the [`Workers`] are gone).
    pub async fn requested(&mut self) {
        // An error means the sender is gone: nobody can ask any more, so stop as well.
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// The running workers.
#[derive(Debug)]
pub struct Workers {
    stop: watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl Default for Workers {
    fn default() -> Self {
        Self::new()
    }
}

impl Workers {
    /// No workers yet.
    pub fn new() -> Self {
        Self {
            stop: watch::channel(false).0,
            tasks: Vec::new(),
        }
    }

    /// The signal to hand to a worker.
    pub fn shutdown(&self) -> Shutdown {
        Shutdown(self.stop.subscribe())
    }

    /// Starts a worker (a task that returns once its [`Shutdown`] fires).
    pub fn spawn(&mut self, name: &'static str, worker: impl Future<Output = ()> + Send + 'static) {
        self.tasks.push((name, tokio::spawn(worker)));
    }

    /// Names of the running workers.
    pub fn names(&self) -> Vec<&'static str> {
        self.tasks.iter().map(|(n, _)| *n).collect()
    }

    /// Signals every worker and waits for each, in the order they were started.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for (name, task) in self.tasks {
            match task.await {
                Ok(()) => tracing::debug!(worker = name, "stopped"),
                Err(e) => tracing::error!(worker = name, error = %e, "worker failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn stop_signals_and_joins_every_worker() {
        let mut workers = Workers::new();
        let done = Arc::new(AtomicUsize::new(0));
        for name in ["a", "b"] {
            let mut shutdown = workers.shutdown();
            let done = done.clone();
            workers.spawn(name, async move {
                shutdown.requested().await;
                // Work after the signal (a drain) is waited for too.
                tokio::task::yield_now().await;
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        assert_eq!(workers.names(), ["a", "b"]);
        tokio::task::yield_now().await;
        assert_eq!(done.load(Ordering::SeqCst), 0, "running until told");
        workers.stop().await;
        assert_eq!(done.load(Ordering::SeqCst), 2, "both stopped and joined");
    }
}
