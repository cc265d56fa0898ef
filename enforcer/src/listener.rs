//! The HTTP listener: accepts client connections and serves each with hyper's HTTP/1 server,
//! bounded so that clients cannot hold the daemon's connections without using them.
//!
//! - **Connection cap** (`server.max_connections`): a connection beyond it gets a `503` and is
//!   closed at once (`enforcer_http_connections_rejected_total{reason="limit"}`).
//! - **Header read timeout** (`server.header_read_timeout_ms`): once the first byte of a request
//!   arrived, its whole header must follow within this long, however the bytes trickle in
//!   (slowloris), or the connection is closed (`..._timeouts_total{kind="header"}`).
//! - **Idle timeout** (`server.idle_timeout_ms`): a connection with no request in flight is
//!   closed after this long without the first byte of one, counted from its accept or from the
//!   end of its previous response (`..._timeouts_total{kind="idle"}`).
//!
//! hyper 1 has one knob for the last two (its `header_read_timeout` runs from the moment a
//! connection waits for a request, idle time included), so each connection carries a small
//! watchdog instead: the socket reports the first byte of a request, the service its start, and
//! the response body, when dropped, its end. A request in flight (reading its body, deciding,
//! writing the answer) is never cut here: cutting it could drop a decision half made.
//!
//! The watchdog is never woken by a request: it sleeps to its deadline, but never longer than
//! the shorter timeout, and looks again. A phase change (which cannot start a deadline nearer
//! than that) is therefore seen before its deadline passes, and the deadlines are kept to the
//! timer's precision, at the cost of one wake-up per connection every few seconds rather than
//! two per request.
//!
//! Shutdown: stop accepting (the listening socket is closed), ask every connection to finish
//! (hyper closes idle ones at once and the others after their response), and wait for them.
//! The watchdogs keep running meanwhile, so a half-sent header cannot hold the shutdown.
use crate::metrics::HttpMetrics;
use axum::Router;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// The bounds of client connections (from `[server]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From the first byte of a request to the end of its header.
    pub header_read_timeout: Duration,
    /// Without a request, from the accept or the end of the previous response.
    pub idle_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
}

/// What a refused connection is told before it is closed.
const REFUSED: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// Serves `router` on `listener` until `shutdown` resolves, then drains the connections.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    metrics: HttpMetrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (stop, stopping) = watch::channel(false);
    let service = TowerToHyperService::new(router);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        // Reap finished connection tasks as we go; the set only holds live ones for long.
        while connections.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            // That one connection went away before it was accepted: nothing to wait for.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors or memory: the pending connections wait in the
                // kernel's backlog; pause instead of spinning on the same error.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            metrics.rejected.with_label_values(&["limit"]).inc();
            // Best effort: a fresh socket's send buffer is empty, so this does not block; a
            // client whose request is still unread may see a reset instead.
            let _ = stream.try_write(REFUSED);
            continue;
        };
        metrics.accepted.inc();
        let open = OpenConnection {
            gauge: metrics.open.clone(),
            _permit: permit,
        };
        open.gauge.inc();
        connections.spawn(connection(
            stream,
            peer,
            service.clone(),
            limits,
            metrics.clone(),
            stopping.clone(),
            open,
        ));
    }
    drop(listener);
    let _ = stop.send(true);
    tracing::info!(
        connections = metrics.open.get(),
        "stopped accepting; draining connections"
    );
    while connections.join_next().await.is_some() {}
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// A served connection's slot: its permit, and its count in the gauge, until it is dropped.
struct OpenConnection {
    gauge: prometheus::IntGauge,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Serves one connection until it ends, its watchdog cuts it, or the drain finishes it. Every
/// request carries the connection's peer address as axum's [`ConnectInfo`] (whether it is a
/// trusted proxy decides whose client address a decision may carry: [`crate::client_addr`]).
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    service: TowerToHyperService<Router>,
    limits: Limits,
    metrics: HttpMetrics,
    mut stopping: watch::Receiver<bool>,
    _open: OpenConnection,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        io: stream,
        activity: Arc::clone(&activity),
    });
    let tracked = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let busy = tracked.begin();
        let response = hyper::service::Service::call(&service, req);
        async move {
            let response = response.await?;
            Ok::<_, std::convert::Infallible>(response.map(|body| Tracked { body, _busy: busy }))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        // The watchdog below times headers and idle time; hyper's own header timer (inactive
        // without a timer anyway) would count idle time as header time.
        .header_read_timeout(None)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let watchdog = activity.watchdog(limits);
    tokio::pin!(watchdog);
    let mut draining = false;
    loop {
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            kind = &mut watchdog => {
                // Dropping the connection closes the socket; no request is in flight.
                metrics.timeouts.with_label_values(&[kind.label()]).inc();
                tracing::debug!(kind = kind.label(), "closed a connection that timed out");
                return;
            }
            _ = stopping.changed(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Why the watchdog closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timeout {
    Header,
    Idle,
}

impl Timeout {
    fn label(self) -> &'static str {
        match self {
            Self::Header => "header",
            Self::Idle => "idle",
        }
    }
}

/// Where a connection is between requests.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// No request in flight and no byte of the next one, since then.
    Idle(Instant),
    /// The first byte of a request arrived then; its header is not complete.
    Header(Instant),
    /// Requests being served (HTTP/1: one, but counting keeps it honest).
    Busy(u32),
}

/// A connection's phase, shared by its socket, its service and its watchdog.
#[derive(Debug)]
struct Activity {
    phase: Mutex<Phase>,
}

impl Activity {
    fn new() -> Self {
        Self {
            phase: Mutex::new(Phase::Idle(Instant::now())),
        }
    }

    /// Bytes arrived on the socket.
    fn on_read(&self) {
        let mut phase = self.phase.lock();
        if let Phase::Idle(_) = *phase {
            *phase = Phase::Header(Instant::now());
        }
    }

    /// A request's header is complete and its service called; in flight until the guard
    /// (moved into the response body) is dropped.
    fn begin(self: &Arc<Self>) -> BusyGuard {
        let mut phase = self.phase.lock();
        *phase = match *phase {
            Phase::Busy(n) => Phase::Busy(n + 1),
            Phase::Idle(_) | Phase::Header(_) => Phase::Busy(1),
        };
        BusyGuard(Arc::clone(self))
    }

    fn end(&self) {
        let mut phase = self.phase.lock();
        *phase = match *phase {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            // Bytes of a pipelined request already read count as idle time here: hyper parses
            // them from its buffer at once, or the idle timeout still bounds the wait.
            _ => Phase::Idle(Instant::now()),
        };
    }

    /// Resolves when the connection has been idle, or reading one header, for too long.
    async fn watchdog(&self, limits: Limits) -> Timeout {
        // A change of phase starts a deadline at least this far away (a header's first byte:
        // `header_read_timeout`; the end of a request: `idle_timeout`), so looking again this
        // often sees every deadline before it passes.
        let look_again = limits.header_read_timeout.min(limits.idle_timeout);
        loop {
            let now = Instant::now();
            let deadline = match *self.phase.lock() {
                Phase::Idle(since) => Some((since + limits.idle_timeout, Timeout::Idle)),
                Phase::Header(since) => Some((since + limits.header_read_timeout, Timeout::Header)),
                Phase::Busy(_) => None,
            };
            let wake = match deadline {
                Some((at, kind)) if at <= now => return kind,
                Some((at, _)) => at.min(now + look_again),
                None => now + look_again,
            };
            tokio::time::sleep_until(wake).await;
        }
    }
}

/// Marks its connection's request in flight until dropped.
#[derive(Debug)]
struct BusyGuard(Arc<Activity>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// A response body that holds its request's [`BusyGuard`]: hyper drops it once written.
#[derive(Debug)]
struct Tracked {
    body: axum::body::Body,
    _busy: BusyGuard,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    // Forwarded so hyper still sends `content-length` rather than a chunked body.
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A client socket that reports the bytes it reads to its connection's [`Activity`].
#[derive(Debug)]
struct Watched {
    io: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.on_read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_times_idle_and_header_phases_and_never_a_request() {
        // Idle from the start: cut at the idle timeout.
        let a = Arc::new(Activity::new());
        let started = Instant::now();
        assert_eq!(a.watchdog(limits()).await, Timeout::Idle);
        assert_eq!(started.elapsed(), Duration::from_secs(60));

        // A first byte after 12 s of idleness: the header deadline (5 s later) comes first,
        // though nothing tells the watchdog.
        let a = Arc::new(Activity::new());
        let started = Instant::now();
        let byte = {
            let a = Arc::clone(&a);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(12)).await;
                a.on_read();
                // More bytes do not move the deadline.
                tokio::time::sleep(Duration::from_secs(2)).await;
                a.on_read();
            })
        };
        assert_eq!(a.watchdog(limits()).await, Timeout::Header);
        assert_eq!(started.elapsed(), Duration::from_secs(17));
        byte.await.expect("task");

        // A request in flight for 10 min 2 s is not cut; idle time counts from its end.
        let a = Arc::new(Activity::new());
        let started = Instant::now();
        let request = {
            let a = Arc::clone(&a);
            tokio::spawn(async move {
                a.on_read();
                let busy = a.begin();
                tokio::time::sleep(Duration::from_secs(602)).await;
                drop(busy);
            })
        };
        assert_eq!(a.watchdog(limits()).await, Timeout::Idle);
        assert_eq!(started.elapsed(), Duration::from_secs(662));
        request.await.expect("task");
    }
}
