//! The daemon behind real gateways, end to end: Debian's nginx (`auth_request`) and Caddy
//! (`forward_auth`) in front of an upstream that counts what reaches it.
//!
//! The gateway configurations are the blocks of `docs/gateways.md` marked as tested, read out of
//! the document (`include_str!`), with only the placeholders replaced: the daemon's
//! `127.0.0.1:8080`, the upstream's `127.0.0.1:9000` and the gateway's own address. A recipe that
//! changes in the docs changes here; a placeholder that disappears fails the test.
//!
//! Each gateway runs as a private process (configuration, logs, state in a temporary directory,
//! free ports) killed on drop. When nginx or Caddy is not installed the tests fail and say to run
//! `cargo xtask setup`: CI runs it first, so a skip would only hide a broken set-up.
use bytes::Bytes;
use enforcer::config::Config;
use enforcer::key::ApiKey;
use enforcer::ledger::{AuditRow, Entry};
use enforcer_tests::{Process, Resp, TestDaemon, free_port, http, http_from, unique};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DOC: &str = include_str!("../../docs/gateways.md");
/// What marks a block of the docs as run by this file.
const TESTED: &str = "<!-- tested: tests/tests/gateways.rs -->\n";

/// The tested block of `lang` (```` ```nginx ````, ```` ```caddyfile ````): exactly one.
fn recipe(lang: &str) -> &'static str {
    let fence = format!("```{lang}\n");
    let blocks: Vec<&str> = DOC
        .split(TESTED)
        .skip(1)
        .filter_map(|after| after.strip_prefix(fence.as_str()))
        .map(|block| &block[..=block.find("\n```").expect("closing fence")])
        .collect();
    assert_eq!(
        blocks.len(),
        1,
        "docs/gateways.md must have exactly one ```{lang} block right after {TESTED:?}"
    );
    blocks[0]
}

/// `text` with every `placeholder` replaced; the placeholder must be there.
fn fill(text: &str, placeholder: &str, value: &str) -> String {
    assert!(
        text.contains(placeholder),
        "the recipe in docs/gateways.md has no {placeholder:?} any more: keep the placeholders \
         documented at the top of the page, or change tests/tests/gateways.rs with them\n{text}"
    );
    text.replace(placeholder, value)
}

/// The path of an installed program, or a failure saying how to install it.
fn installed(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{program} is not installed: run `cargo xtask setup` (it installs nginx-light and caddy)")
        })
}

// ---------------------------------------------------------------------------------------------
// The upstream: answers 200 to everything and remembers what it saw.

/// One request the upstream served.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: hyper::HeaderMap,
}

/// A tiny HTTP server behind the gateway; stops on drop.
#[derive(Debug)]
struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the upstream");
        let addr = listener.local_addr().expect("upstream address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = Arc::clone(&log);
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let path = req.uri().path().to_owned();
                        let body = Bytes::from(format!("upstream {path}"));
                        log.lock().expect("upstream log").push(Seen {
                            path,
                            headers: req.headers().clone(),
                        });
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(body)))
                        }
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Self { addr, seen, task }
    }

    /// Requests for `path` that reached the upstream so far.
    fn count(&self, path: &str) -> usize {
        let seen = self.seen.lock().expect("upstream log");
        seen.iter().filter(|s| s.path == path).count()
    }

    /// The last request for `path`.
    fn last(&self, path: &str) -> Seen {
        let seen = self.seen.lock().expect("upstream log");
        seen.iter()
            .rev()
            .find(|s| s.path == path)
            .cloned()
            .unwrap_or_else(|| panic!("the upstream never saw {path}"))
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// The gateways.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Nginx,
    Caddy,
}

impl Kind {
    /// `auth_deny_status` as the recipe needs it: `auth_request` turns a 429 into a 500.
    fn deny_status(self) -> u16 {
        match self {
            Kind::Nginx => 403,
            Kind::Caddy => 429,
        }
    }
}

/// A private nginx or Caddy on a free loopback port; killed on drop.
#[derive(Debug)]
struct Gateway {
    addr: SocketAddr,
    // Before `dir`: the process stops before its directory goes.
    process: Process,
    /// Where its stdout and stderr go (with nginx's error log beside it).
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Gateway {
    async fn start(kind: Kind, daemon: SocketAddr, upstream: SocketAddr) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let log = dir.path().join("output.log");
        let d = dir.path().display();
        let mut cmd = match kind {
            Kind::Nginx => {
                let server = fill(recipe("nginx"), "127.0.0.1:8080", &daemon.to_string());
                let server = fill(&server, "127.0.0.1:9000", &upstream.to_string());
                let server = fill(&server, "listen 80;", &format!("listen 127.0.0.1:{port};"));
                // Everything nginx writes goes to the directory (Debian's build defaults to
                // /var/log/nginx and /var/lib/nginx otherwise). Run as root, nginx's workers
                // become `nobody`: they must be able to enter the directory.
                let conf = format!(
                    "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
                     error_log {d}/error.log info;\nevents {{ worker_connections 64; }}\n\
                     http {{\n    access_log {d}/access.log;\n\
                     client_body_temp_path {d}/client_body;\n    proxy_temp_path {d}/proxy;\n\
                     fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n\
                     scgi_temp_path {d}/scgi;\n\n{server}}}\n"
                );
                std::fs::write(dir.path().join("nginx.conf"), conf).expect("nginx.conf");
                std::fs::set_permissions(
                    dir.path(),
                    std::os::unix::fs::PermissionsExt::from_mode(0o755),
                )
                .expect("chmod");
                let mut cmd = Command::new(installed("nginx"));
                cmd.arg("-e")
                    .arg(dir.path().join("error.log"))
                    .arg("-p")
                    .arg(dir.path())
                    .arg("-c")
                    .arg(dir.path().join("nginx.conf"));
                cmd
            }
            Kind::Caddy => {
                let site = fill(recipe("caddyfile"), "127.0.0.1:8080", &daemon.to_string());
                let site = fill(&site, "127.0.0.1:9000", &upstream.to_string());
                // Plain HTTP on the free port instead of the host name's automatic HTTPS.
                let site = fill(&site, "api.example.com", &format!("http://:{port}"));
                // No admin endpoint (its default port 2019 is shared by every Caddy here), no
                // certificates, state in the directory.
                let conf = format!(
                    "{{\n    admin off\n    auto_https off\n    storage file_system {{\n        \
                     root {d}/data\n    }}\n}}\n\n{site}"
                );
                std::fs::write(dir.path().join("Caddyfile"), conf).expect("Caddyfile");
                let mut cmd = Command::new(installed("caddy"));
                cmd.args(["run", "--adapter", "caddyfile", "--config"])
                    .arg(dir.path().join("Caddyfile"))
                    // Caddy keeps its autosaved config and data under these.
                    .env("HOME", dir.path())
                    .env("XDG_CONFIG_HOME", dir.path().join("config"))
                    .env("XDG_DATA_HOME", dir.path().join("data"));
                cmd
            }
        };
        // Its own process group, so that drop can stop the workers with the master.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let output = std::fs::File::create(&log).expect("gateway log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("gateway log"))
            .stderr(output)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {kind:?}: {e}"));
        let mut gateway = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            process: Process(child),
            log,
            dir,
        };
        gateway.wait_ready(kind).await;
        gateway
    }

    /// Waits until the gateway accepts connections (generously: the machine may be busy).
    async fn wait_ready(&mut self, kind: Kind) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.process.0.try_wait() {
                panic!("{kind:?} exited ({status}):\n{}", self.logs());
            }
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{kind:?} did not listen on {} within 60 s:\n{}",
                self.addr,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What the gateway wrote, for failure messages.
    fn logs(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        format!(
            "{}{}",
            read(&self.log),
            read(&self.dir.path().join("error.log"))
        )
    }

    /// A request through the gateway, from 127.0.0.1.
    async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
        http(self.addr, method, path, headers, Bytes::new()).await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // nginx's workers outlive a killed master (and keep its listening socket): SIGKILL the
        // whole process group the gateway leads, then `Process` reaps the master.
        let group = format!("-{}", self.process.0.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon and its ledger.

/// The embedded store; a tier of 3 tokens that never refills, so every balance is exact
/// whatever the time the test takes (and no idle cap, which would start a new key below 3); `/health` operational, with a bucket far larger than the
/// requests the test makes; the gateway (127.0.0.1) trusted for client addresses.
fn daemon_config(kind: Kind) -> Config {
    Config::parse(&format!(
        r#"
        [server]
        auth_deny_status = {}
        trusted_proxies = ["127.0.0.1"]

        [budget]
        default_tier = "gw"

        [budget.operational]
        capacity = 100
        refill_per_sec = 100

        [tiers.gw]
        max_tokens = 3
        refill_per_sec = 0
        idle_cap = 1

        [[pricing.endpoints]]
        method = "GET"
        path = "/health"
        operational = true
        "#,
        kind.deny_status()
    ))
    .expect("valid test config")
}

/// The ledger rows of `key`, in the order they were recorded, once there are `want` of them
/// (or what there is after 30 s).
async fn rows_of(daemon: &TestDaemon, key: &str, want: usize) -> Vec<AuditRow> {
    let hash = ApiKey::parse(key).expect("key").hash().to_hex();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows: Vec<AuditRow> = ledger(daemon)
            .into_iter()
            .filter(|r| r.key_hash == hash)
            .collect();
        if rows.len() >= want || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every decision row in the daemon's ledger file.
fn ledger(daemon: &TestDaemon) -> Vec<AuditRow> {
    std::fs::read_to_string(&daemon.ledger_file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| match serde_json::from_str::<Entry>(l) {
            Ok(Entry::Decision(row)) => Some(row),
            _ => None,
        })
        .collect()
}

/// The one value of header `name`, failing if it is missing or repeated.
fn only(r: &Resp, name: &str) -> String {
    let values: Vec<&str> = r
        .headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert_eq!(
        values.len(),
        1,
        "exactly one {name} header, got {values:?} in {:?}",
        r.headers
    );
    values[0].to_owned()
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_enforces_budgets_end_to_end() {
    enforces_budgets_end_to_end(Kind::Nginx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caddy_forward_auth_enforces_budgets_end_to_end() {
    enforces_budgets_end_to_end(Kind::Caddy).await;
}

/// The daemon's `RateLimit` of an allowed request with `remaining` tokens left (no refill: no
/// `t`, as no time brings more tokens).
fn ratelimit(remaining: u32) -> String {
    format!("\"gw\";r={remaining}")
}

async fn enforces_budgets_end_to_end(kind: Kind) {
    let upstream = Upstream::start().await;
    let daemon = TestDaemon::start(daemon_config(kind)).await;
    let gateway = Gateway::start(kind, daemon.addr, upstream.addr).await;
    let logs = || gateway.logs();

    // No key: the daemon's 401 reaches the client, the request does not reach the upstream.
    let r = gateway.send("GET", "/work", &[]).await;
    assert_eq!(r.status, 401, "{r:?}\n{}", logs());
    assert_eq!(upstream.count("/work"), 0);

    // A fresh key: through to the upstream (its answer, not the gateway's).
    let key = unique("gw");
    let with_key = [("x-api-key", key.as_str())];
    let r = gateway.send("POST", "/work", &with_key).await;
    assert_eq!(r.status, 200, "{r:?}\n{}", logs());
    assert_eq!(&r.body[..], b"upstream /work");
    assert_eq!(upstream.count("/work"), 1);

    // More /health requests than the whole budget: all reach the upstream.
    for _ in 0..10 {
        let r = gateway.send("GET", "/health", &with_key).await;
        assert_eq!(r.status, 200, "{r:?}\n{}", logs());
        assert_eq!(&r.body[..], b"upstream /health");
    }
    assert_eq!(upstream.count("/health"), 10);

    // The rest of the budget: 2 tokens, 2 requests, each 1 token less whatever /health did.
    // nginx hands the daemon's balance to the client, Caddy to the upstream.
    for left in [1, 0] {
        let r = gateway.send("POST", "/work", &with_key).await;
        assert_eq!(r.status, 200, "{r:?}\n{}", logs());
        let seen = match kind {
            Kind::Nginx => only(&r, "ratelimit"),
            Kind::Caddy => {
                let last = upstream.last("/work");
                let v = last.headers.get("ratelimit").expect("RateLimit upstream");
                v.to_str().expect("ascii").to_owned()
            }
        };
        assert_eq!(
            seen,
            ratelimit(left),
            "ledger: {:#?}",
            rows_of(&daemon, &key, 0).await
        );
    }
    assert_eq!(upstream.count("/work"), 3);

    // Drained: a 429 from the gateway with the daemon's headers, exactly; the upstream does
    // not see the request. 3600 is the daemon's Retry-After when refill never pays the cost,
    // and `RateLimit` names no reset time that would contradict it.
    let r = gateway.send("POST", "/work", &with_key).await;
    assert_eq!(r.status, 429, "{r:?}\n{}", logs());
    assert_eq!(only(&r, "retry-after"), "3600");
    assert_eq!(only(&r, "ratelimit"), "\"gw\";r=0");
    assert_eq!(only(&r, "ratelimit-policy"), "\"gw\";q=3");
    assert_eq!(
        upstream.count("/work"),
        3,
        "the denied request reached the upstream"
    );

    // /health still works on a drained key.
    let r = gateway.send("GET", "/health", &with_key).await;
    assert_eq!(r.status, 200, "{r:?}\n{}", logs());
    assert_eq!(upstream.count("/health"), 11);

    // The ledger: every /work decision took exactly its 1 token, so the 11 /health decisions
    // between them took none of the budget. (Balances are exact: the tier never refills.)
    let rows = rows_of(&daemon, &key, 15).await;
    let work: Vec<(bool, Option<f64>, &str)> = rows
        .iter()
        .filter(|r| r.endpoint == "/work")
        .map(|r| (r.allowed, r.remaining, r.method.as_str()))
        .collect();
    assert_eq!(
        work,
        [
            (true, Some(2.0), "POST"),
            (true, Some(1.0), "POST"),
            (true, Some(0.0), "POST"),
            (false, Some(0.0), "POST"),
        ]
    );
    let health = rows.iter().filter(|r| r.endpoint == "/health");
    assert_eq!(health.clone().count(), 11, "{rows:?}");
    assert!(health.clone().all(|r| r.allowed), "{rows:?}");

    // A client that writes its own address headers: the daemon records the address it
    // connected from (127.0.0.2, which the gateway saw), never the one it wrote.
    let forger = unique("gw-forger");
    let forged = "203.0.113.9";
    let r = http_from(
        IpAddr::from([127, 0, 0, 2]),
        gateway.addr,
        "GET",
        "/work",
        &[
            ("x-api-key", forger.as_str()),
            ("x-forwarded-for", forged),
            ("x-real-ip", forged),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}\n{}", logs());
    let rows = rows_of(&daemon, &forger, 1).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].client_ip, Some(IpAddr::from([127, 0, 0, 2])));
    let forged_ip: IpAddr = forged.parse().expect("ip");
    assert!(
        ledger(&daemon)
            .iter()
            .all(|r| r.client_ip != Some(forged_ip)),
        "the forged address reached the ledger"
    );
}
