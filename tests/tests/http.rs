//! HTTP hardening of the listener, black-box against the real `enforcer` binary: slowloris
//! clients are cut off at the header read timeout, idle keep-alive connections at the idle
//! timeout, connections beyond `max_connections` are refused (and counted) while normal
//! requests keep working, and SIGTERM lets an in-flight request finish while new connections
//! are refused.
//!
//! Every wait polls with a generous deadline: a busy machine makes things slower, never wrong.
use bytes::Bytes;
use enforcer_tests::{Process, enforcer_bin, free_port, http, parse_metric};
use http_body_util::{BodyExt, Full};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The daemon as operators run it: `enforcer run --config FILE`, embedded store, the audit
/// ledger in a temp dir.
struct Daemon {
    addr: SocketAddr,
    child: Process,
    dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts a daemon whose `[server]` section gets `server_toml` (besides `listen`) and waits
    /// until it answers `/healthz`.
    async fn start(server_toml: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let config = dir.path().join("enforcer.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"{addr}\"\n{server_toml}\n\n[ledger]\nfile = \"{}\"\nfsync = false\n",
                dir.path().join("ledger.jsonl").display()
            ),
        )
        .expect("write config");
        let log = std::fs::File::create(dir.path().join("daemon.log")).expect("log file");
        let child = Command::new(enforcer_bin())
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env_remove("ENFORCER_REDIS_URL")
            .env_remove("ENFORCER_DATABASE_URL")
            .env_remove("ENFORCER_LEDGER_FILE")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn enforcer");
        let mut d = Self {
            addr,
            child: Process(child),
            dir,
        };
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = d.child.0.try_wait() {
                panic!("the daemon exited with {status}: {}", d.log());
            }
            if TcpStream::connect(addr).await.is_ok() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the daemon did not listen on {addr}: {}",
                d.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(http(addr, "GET", "/healthz", &[], "").await.status, 200);
        d
    }

    /// What the daemon logged so far (for failure messages).
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.0.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
    }

    /// Waits for the process to exit; its exit status.
    async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.0.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                start.elapsed() < within,
                "the daemon did not exit within {within:?}: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `/metrics` of the daemon, on a fresh connection.
async fn metrics(addr: SocketAddr) -> String {
    let r = http(addr, "GET", "/metrics", &[], "").await;
    assert_eq!(r.status, 200);
    String::from_utf8(r.body.to_vec()).expect("utf-8 metrics")
}

/// Reads from `stream` until the server closes it (EOF or reset), at most `within`; how long
/// that took, or `None` if it was still open at the deadline. Whatever the server sends first
/// (an error response, say) is read and ignored.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        let left = within.checked_sub(start.elapsed())?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// One HTTP/1.1 keep-alive connection, held open between requests.
struct KeepAlive {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    conn: tokio::task::JoinHandle<()>,
}

impl KeepAlive {
    async fn open(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect to daemon");
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("http handshake");
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        Self { sender, conn }
    }

    /// A connection that the daemon accepted and served one request on: retried until one is
    /// (a connection the test closed just before may not have been released yet).
    async fn hold(addr: SocketAddr) -> Self {
        let start = Instant::now();
        loop {
            let mut c = Self::open(addr).await;
            let served = tokio::time::timeout(Duration::from_secs(5), c.try_get("/healthz")).await;
            if let Ok(Some((200, _))) = served {
                return c;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no connection to hold: {served:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `GET path` on this connection: status and body, `None` if the connection failed.
    async fn try_get(&mut self, path: &str) -> Option<(u16, String)> {
        self.sender.ready().await.ok()?;
        let req = hyper::Request::get(path)
            .header("host", "enforcer")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = self.sender.send_request(req).await.ok()?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// `GET path` on this connection, which must work.
    async fn get(&mut self, path: &str) -> (u16, String) {
        self.try_get(path)
            .await
            .unwrap_or_else(|| panic!("GET {path} failed on a held connection"))
    }

    /// Whether the server closed this connection within `within`.
    async fn closed_within(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, &mut self.conn).await.is_ok()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_config_cuts_off_a_half_sent_header() {
    // No [server] timeouts configured: the defaults must protect (5 s header read timeout).
    let d = Daemon::start("").await;
    let mut slow = TcpStream::connect(d.addr).await.expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: enforcer\r\nX-Slow: ")
        .await
        .expect("half a header");
    let closed = closed_within(&mut slow, Duration::from_secs(30)).await;
    assert!(
        closed.is_some(),
        "a half-sent header still holds its connection after 30 s"
    );
    assert_eq!(
        parse_metric(
            &metrics(d.addr).await,
            "enforcer_http_connection_timeouts_total{kind=\"header\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_headers_are_cut_off_at_the_header_read_timeout() {
    let d = Daemon::start("header_read_timeout_ms = 1000\nidle_timeout_ms = 60000\n").await;

    // Half a header, then silence.
    let mut silent = TcpStream::connect(d.addr).await.expect("connect");
    silent
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: enforcer\r\n")
        .await
        .expect("half a header");
    // A header dripped one byte every 200 ms: each byte is activity, but the header is never
    // complete. The deadline runs from its first byte, so the drip does not extend it.
    let mut drip = TcpStream::connect(d.addr).await.expect("connect");
    let dripper = tokio::spawn(async move {
        let header = b"GET /healthz HTTP/1.1\r\nHost: enforcer\r\nX-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let start = Instant::now();
        for b in header.iter().cycle() {
            if drip.write_all(&[*b]).await.is_err() {
                // Cut off: how long the server let it drip.
                return Some(start.elapsed());
            }
            if start.elapsed() > Duration::from_secs(30) {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    });
    assert!(
        closed_within(&mut silent, Duration::from_secs(10))
            .await
            .is_some(),
        "a half-sent header still holds its connection after 10 s (timeout 1 s)"
    );
    let dripped = dripper.await.expect("dripper");
    assert!(
        dripped.is_some(),
        "a header dripped byte by byte was never cut off"
    );

    // A header sent in pieces that completes within the timeout is served normally.
    let mut pieces = TcpStream::connect(d.addr).await.expect("connect");
    pieces
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .expect("first piece");
    tokio::time::sleep(Duration::from_millis(200)).await;
    pieces
        .write_all(b"Host: enforcer\r\nConnection: close\r\n\r\n")
        .await
        .expect("second piece");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), pieces.read_to_end(&mut answer))
        .await
        .expect("answered")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let m = metrics(d.addr).await;
    assert_eq!(
        parse_metric(
            &m,
            "enforcer_http_connection_timeouts_total{kind=\"header\"}"
        ),
        2.0,
        "{m}"
    );
    assert_eq!(
        parse_metric(&m, "enforcer_http_connection_timeouts_total{kind=\"idle\"}"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_and_busy_ones_are_not() {
    // The header timeout is long here: what closes an idle connection is the idle timeout.
    let d = Daemon::start("header_read_timeout_ms = 30000\nidle_timeout_ms = 2000\n").await;

    // A keep-alive connection after one request, then nothing: closed by the server.
    let mut idle = KeepAlive::open(d.addr).await;
    assert_eq!(idle.get("/healthz").await.0, 200);
    // A connection that never sends a byte: closed too.
    let mut mute = TcpStream::connect(d.addr).await.expect("connect");
    // A connection in use every 200 ms for longer than the idle timeout stays open: the idle
    // timer runs from the end of each response.
    let mut busy = KeepAlive::open(d.addr).await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        assert_eq!(
            busy.get("/healthz").await.0,
            200,
            "the busy connection works"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        idle.closed_within(Duration::from_secs(10)).await,
        "an idle keep-alive connection is still open 10 s after its last request (idle timeout 2 s)"
    );
    assert!(
        closed_within(&mut mute, Duration::from_secs(10))
            .await
            .is_some(),
        "a connection that never sent anything is still open (idle timeout 2 s)"
    );

    // A request whose body arrives slowly, after more than the idle timeout, is in flight: it
    // is not cut, and is answered.
    let body = r#"{"key":"slow-body","endpoint":"/items","method":"GET"}"#;
    let mut slow = TcpStream::connect(d.addr).await.expect("connect");
    slow.write_all(
        format!(
            "POST /v1/check HTTP/1.1\r\nHost: enforcer\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{}",
            body.len(),
            &body[..10]
        )
        .as_bytes(),
    )
    .await
    .expect("header and some body");
    tokio::time::sleep(Duration::from_secs(3)).await;
    slow.write_all(&body.as_bytes()[10..])
        .await
        .expect("the rest of the body: the connection is still open");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut answer))
        .await
        .expect("answered")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let m = metrics(d.addr).await;
    let idle_cuts = parse_metric(&m, "enforcer_http_connection_timeouts_total{kind=\"idle\"}");
    // The idle and the mute connection; the busy one may have been cut after its last request.
    assert!((2.0..=3.0).contains(&idle_cuts), "{idle_cuts}\n{m}");
    assert_eq!(
        parse_metric(
            &m,
            "enforcer_http_connection_timeouts_total{kind=\"header\"}"
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_refused_and_counted() {
    let d = Daemon::start("max_connections = 4\nidle_timeout_ms = 60000\n").await;
    // Hold the four allowed connections, each proven served.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(KeepAlive::hold(d.addr).await);
    }
    let rejected = |m: &str| {
        parse_metric(
            m,
            "enforcer_http_connections_rejected_total{reason=\"limit\"}",
        )
    };
    let before = rejected(&held[0].get("/metrics").await.1);
    // More are accepted by the kernel but refused by the daemon: 503 or closed, never served.
    for _ in 0..2 {
        let mut extra = TcpStream::connect(d.addr).await.expect("connect");
        let _ = extra
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: enforcer\r\n\r\n")
            .await;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), extra.read_to_end(&mut answer))
            .await
            .expect("the extra connection is answered or closed within 10 s");
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            read.is_err() || answer.is_empty() || answer.starts_with("HTTP/1.1 503"),
            "the extra connection was served: {answer}"
        );
    }
    // The held ones still work; one of them reads the metrics.
    let (status, m) = held[0].get("/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(rejected(&m) - before, 2.0, "{m}");
    assert_eq!(
        parse_metric(&m, "enforcer_http_connections_open"),
        4.0,
        "{m}"
    );
    for c in &mut held[1..] {
        assert_eq!(c.get("/healthz").await.0, 200);
    }

    // Released, new connections work again, and the gauge falls back.
    drop(held);
    let _fresh = KeepAlive::hold(d.addr).await;
    let start = Instant::now();
    loop {
        let m = metrics(d.addr).await;
        // The held fresh connection and the one reading the metrics.
        if parse_metric(&m, "enforcer_http_connections_open") == 2.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "open connections do not fall back: {m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_and_lets_the_request_in_flight_finish() {
    let mut d = Daemon::start("").await;
    // A check whose body is still on its way; `Expect: 100-continue` tells when the daemon is
    // reading it (the request is in flight).
    let body = r#"{"key":"in-flight","endpoint":"/items","method":"GET"}"#;
    let mut inflight = TcpStream::connect(d.addr).await.expect("connect");
    inflight
        .write_all(
            format!(
                "POST /v1/check HTTP/1.1\r\nHost: enforcer\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .expect("header");
    let mut cont = [0u8; 25];
    tokio::time::timeout(Duration::from_secs(10), inflight.read_exact(&mut cont))
        .await
        .expect("100 Continue within 10 s")
        .expect("read");
    assert!(
        cont.starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"),
        "{}",
        String::from_utf8_lossy(&cont)
    );

    d.sigterm();
    // New connections are refused once the listener is closed.
    let start = Instant::now();
    while TcpStream::connect(d.addr).await.is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "still accepting connections after SIGTERM: {}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The request in flight is answered.
    inflight.write_all(body.as_bytes()).await.expect("body");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), inflight.read_to_end(&mut answer))
        .await
        .expect("answered and closed within 20 s")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"allowed\":true"), "{answer}");
    let status = d.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}: {}", d.log());
    let log = d.log();
    assert!(!log.contains("panicked"), "{log}");
}
