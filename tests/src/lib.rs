//! Helpers for the integration tests: the services `cargo xtask test` started, an in-process
//! daemon on `127.0.0.1:0`, a tiny HTTP client, private Redis servers and clusters, and
//! network-namespace guards. Everything is RAII: dropping a guard stops or deletes what it made.
#![deny(unsafe_code)]

use bytes::Bytes;
use enforcer::config::Config;
use enforcer::server::Server;
use http_body_util::{BodyExt, Full};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod cluster;
pub mod netns;
pub mod packet;
pub mod pg;
pub mod prom;

/// The Redis that `cargo xtask test` started.
pub fn redis_url() -> String {
    std::env::var("ENFORCER_TEST_REDIS_URL").expect(
        "ENFORCER_TEST_REDIS_URL is not set: run the integration tests with `cargo xtask test`, \
         which starts a private Redis and PostgreSQL",
    )
}

/// A child process, killed (SIGKILL: as abrupt as a crash) and reaped when dropped.
#[derive(Debug)]
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP port on loopback that nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A main-bucket debit of `cost` on `key` (a `GET /x`) with a new request id: what a check
/// sends the store.
pub fn main_debit(key: &enforcer::key::ApiKey, cost: f64) -> enforcer::store::Debit {
    use enforcer::store::{BucketKind, Debit, Fingerprint};
    Debit {
        key: key.hash(),
        bucket: BucketKind::Main,
        cost,
        request_id: enforcer::key::RequestId::generate(),
        fingerprint: Fingerprint::of(BucketKind::Main, Some("GET"), "/x", cost),
        force: false,
        terms: enforcer::store::SettleTerms::default(),
        candidate: None,
    }
}

/// A key name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// A Redis connection for inspecting what the daemon wrote.
pub async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("valid redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to test redis")
}

/// `enforcer ARGS` as an operator runs it, with `stdin` piped in (an API key: the CLI never
/// takes one from its arguments); (exit code, stdout, stderr).
pub fn enforcer_cli(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    use std::io::Write as _;
    let mut child = Command::new(enforcer_bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run enforcer");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write stdin");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("enforcer ran");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The workspace's `target/<profile>` directory, where the `enforcer` binary is.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// The `enforcer` binary (built by `cargo xtask test` before the tests run).
pub fn enforcer_bin() -> PathBuf {
    let bin = target_dir().join("enforcer");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p enforcer` (cargo xtask test does)",
        bin.display()
    );
    bin
}

/// An in-process daemon serving on a free loopback port; stops on drop.
#[derive(Debug)]
pub struct TestDaemon {
    pub addr: SocketAddr,
    /// The audit ledger file (JSONL) the daemon records into.
    pub ledger_file: PathBuf,
    /// Envoy's rate-limit API (gRPC), unless the config turned it off.
    pub grpc: Option<SocketAddr>,
    /// The admin API's Unix socket, unless the config turned it off.
    pub admin_socket: Option<PathBuf>,
    /// The daemon's config reloads and shadow switches (what the admin socket calls).
    pub reloader: std::sync::Arc<enforcer::reload::Reloader>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Holds the audit ledger file unless the config names one.
    _ledger_dir: Option<tempfile::TempDir>,
    /// Holds the admin socket unless the config names one.
    _admin_dir: Option<tempfile::TempDir>,
}

impl TestDaemon {
    /// Starts a daemon for `config` (its listen addresses are replaced by `127.0.0.1:0`;
    /// gRPC stays off if the config turned it off).
    pub async fn start(mut config: Config) -> Self {
        config.server.listen = "127.0.0.1:0".parse().expect("addr");
        if !config.server.grpc_listen.is_empty() {
            config.server.grpc_listen = "127.0.0.1:0".to_owned();
        }
        let ledger_dir = (config.ledger.file == enforcer::config::LedgerConfig::default().file)
            .then(|| tempfile::tempdir().expect("tempdir"));
        if let Some(dir) = &ledger_dir {
            config.ledger.file = dir.path().join("ledger.jsonl").display().to_string();
        }
        // Each daemon its own admin socket (the default path is one per machine).
        let admin_dir = (config.server.admin_socket == enforcer::config::DEFAULT_ADMIN_SOCKET)
            .then(|| tempfile::tempdir().expect("tempdir"));
        if let Some(dir) = &admin_dir {
            config.server.admin_socket = dir.path().join("admin/admin.sock").display().to_string();
        }
        let errors = config.validate();
        assert!(errors.is_empty(), "test config invalid: {errors:?}");
        let ledger_file = PathBuf::from(&config.ledger.file);
        let server = Server::bind(&config).await.expect("daemon binds");
        Self::serve(server, ledger_file, ledger_dir, admin_dir)
    }

    /// Starts a daemon from a config file and overrides, as `enforcer run --config F` does, so
    /// that it can reload the file. Like [`TestDaemon::start`], it listens on `127.0.0.1:0`
    /// (and gRPC too, unless the file turns it off) and records into a private ledger file
    /// unless the file names one: both are overrides, so a reload keeps them.
    pub async fn start_from(mut source: enforcer::reload::ConfigSource) -> Self {
        let peek = source.load().expect("test config valid");
        source.overrides.listen = Some("127.0.0.1:0".parse().expect("addr"));
        if !peek.server.grpc_listen.is_empty() {
            source.overrides.grpc_listen = Some("127.0.0.1:0".to_owned());
        }
        let ledger_dir = (peek.ledger.file == enforcer::config::LedgerConfig::default().file)
            .then(|| tempfile::tempdir().expect("tempdir"));
        if let Some(dir) = &ledger_dir {
            source.overrides.ledger_file =
                Some(dir.path().join("ledger.jsonl").display().to_string());
        }
        let admin_dir = (peek.server.admin_socket == enforcer::config::DEFAULT_ADMIN_SOCKET)
            .then(|| tempfile::tempdir().expect("tempdir"));
        if let Some(dir) = &admin_dir {
            source.overrides.admin_socket =
                Some(dir.path().join("admin/admin.sock").display().to_string());
        }
        let server = Server::bind_from(source).await.expect("daemon binds");
        let ledger_file = PathBuf::from(&server.config().ledger.file);
        Self::serve(server, ledger_file, ledger_dir, admin_dir)
    }

    fn serve(
        server: Server,
        ledger_file: PathBuf,
        ledger_dir: Option<tempfile::TempDir>,
        admin_dir: Option<tempfile::TempDir>,
    ) -> Self {
        let addr = server.local_addr().expect("local addr");
        let reloader = server.reloader();
        let grpc = server.grpc_addr();
        let admin_socket = server.admin_socket().map(Path::to_path_buf);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .expect("daemon serves");
        });
        Self {
            addr,
            ledger_file,
            grpc,
            admin_socket,
            reloader,
            stop: Some(stop),
            task: Some(task),
            _ledger_dir: ledger_dir,
            _admin_dir: admin_dir,
        }
    }

    /// The decision rows of the ledger file whose `request_id` is `id`, once at least `want`
    /// of them are there (the writer flushes in the background), or what is there after 10 s.
    pub async fn ledger_rows(&self, id: &str, want: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let rows: Vec<serde_json::Value> = std::fs::read_to_string(&self.ledger_file)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|r| r["t"] == "decision" && r["request_id"] == id)
                .collect();
            if rows.len() >= want || Instant::now() > deadline {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the daemon and waits for it.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One HTTP/1.1 request on a fresh connection.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Resp {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to daemon");
    http_on(stream, method, path, headers, body).await
}

/// One HTTP/1.1 request on a fresh connection from the local address `from` (any 127.0.0.0/8
/// address works on loopback: a client other than 127.0.0.1 for a proxy to see).
pub async fn http_from(
    from: std::net::IpAddr,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Resp {
    let socket = match from {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .expect("socket");
    socket
        .bind(SocketAddr::new(from, 0))
        .unwrap_or_else(|e| panic!("bind the client to {from}: {e}"));
    let stream = socket
        .connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect from {from} to {addr}: {e}"));
    http_on(stream, method, path, headers, body).await
}

/// One HTTP/1.1 request on `stream`.
async fn http_on(
    stream: tokio::net::TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Resp {
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("http handshake");
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "enforcer");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(body.into())).expect("request"))
        .await
        .expect("send request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("read body")
        .to_bytes();
    Resp {
        status,
        headers,
        body,
    }
}

/// The value of an unlabelled metric in the daemon's `/metrics` (0 when absent).
pub async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let text = http(addr, "GET", "/metrics", &[], String::new()).await;
    parse_metric(&String::from_utf8_lossy(&text.body), name)
}

/// The value of an unlabelled metric in a Prometheus text exposition (0 when absent).
pub fn parse_metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `POST /v1/check` with a JSON body.
pub async fn check(addr: SocketAddr, body: serde_json::Value) -> Resp {
    http(
        addr,
        "POST",
        "/v1/check",
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await
}

/// A private redis-server on a free port (for tests that stop and restart Redis).
#[derive(Debug)]
pub struct PrivateRedis {
    pub port: u16,
    // Before `dir`: the server stops before its directory goes.
    child: Option<Process>,
    dir: tempfile::TempDir,
    /// More `redis-server` arguments (`--loadmodule …`, `--replicaof …`).
    extra: Vec<String>,
}

impl PrivateRedis {
    /// Starts one and waits until it answers.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts one with more `redis-server` arguments and waits until it answers.
    pub fn start_with(extra: &[&str]) -> Self {
        let mut r = Self {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        r.restart();
        r
    }

    /// Starts the server again on the same port with other extra arguments.
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| (*s).to_owned()).collect();
        self.restart();
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Stops the server (SIGKILL: as abrupt as a crash).
    pub fn stop(&mut self) {
        self.child = None;
    }

    /// Freezes the server (SIGSTOP): connections stay open and calls get no answer, as with a
    /// hung or partitioned Redis; its data stays, for [`PrivateRedis::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server run again (SIGCONT), with its data: it then also executes what
    /// clients wrote while it was frozen.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .expect("private redis is running")
            .0
            .id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// Starts the server again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            // A replica syncs at once, not after the default 5 s delay.
            .args(["--repl-diskless-sync-delay", "0"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (cargo xtask setup)");
        self.child = Some(Process(child));
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "private redis did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A private bpffs directory for a daemon's pinned maps, removed on drop.
#[derive(Debug)]
pub struct PinDir(PathBuf);

impl PinDir {
    /// A fresh `/sys/fs/bpf/enforcer-test-<id>`.
    pub fn new() -> Self {
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/{}",
            unique("enforcer-test")
        )))
    }

    /// The directory, as a string for command lines.
    pub fn path(&self) -> String {
        self.0.display().to_string()
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // bpffs allows unlinking pins one by one (and removing empty directories, such as the
        // operator's detach markers), then the directory.
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir(e.path());
                } else {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A config for tests: the example's tiers and endpoints, this store URL.
pub fn example_config(redis_url: &str) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/enforcer.toml");
    let mut config = Config::load(&path).expect("examples/enforcer.toml is valid");
    config.store.redis_url = redis_url.to_owned();
    config
}

/// An Envoy rate-limit descriptor of `entries` (key, value), as a gateway sends it.
pub fn descriptor(
    entries: &[(&str, &str)],
) -> envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
    envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: (*k).to_owned(),
                value: (*v).to_owned(),
            })
            .collect(),
        ..Default::default()
    }
}
