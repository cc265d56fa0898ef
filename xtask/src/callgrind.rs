//! `cargo xtask bench daemon`: instructions the daemon executes per decision, counted by
//! valgrind's callgrind on the release binary, with the functions they go to.
//!
//! The daemon's CPU per decision (issue 16, goal 2) measured with `/proc/<pid>/stat` moves by
//! ±30 % with the load of this 2-core VM; an instruction count does not, so a change to the
//! hot path can be judged by one run before and one after. What it leaves out: the kernel's
//! share (loopback TCP, epoll, scheduling: about a third of the daemon's CPU by `perf`), and
//! the difference between instructions and time (cache misses, SIMD, SHA extensions the
//! emulated CPU does not offer: `sha2` falls back to its portable code under valgrind).
//!
//! The set-up is the HTTP bench's: a private Redis with the `enforcer-redis` module loaded
//! (debits by `ENFORCER.DEBIT`, calls of many; before 2026-12-04 this bench ran `debit.lua`),
//! the bench tier, the embedded ledger file with its journal on (the production defaults),
//! `POST /v1/check` for keys never seen before,
//! over `clients` keep-alive connections; then Envoy's `ShouldRateLimit` over gRPC, `clients`
//! streams on two HTTP/2 connections. The counters are zeroed after a warm-up and dumped
//! after the measured run, so the daemon's start-up is not counted. `ENFORCER_BENCH_KEEP=1` keeps
//! the dumps (`callgrind_annotate` reads them); `ENFORCER_BENCH_SCRIPT=1` debits with
//! `debit.lua` instead of the module (a Redis without it: what managed Redis runs).
use crate::loadgen::{self, Pace};
use crate::services::{Redis, free_port};
use anyhow::{Context as _, Result, bail};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Frames of the decision path whose inclusive cost is reported (by a substring of the name).
const HTTP_FRAMES: &[(&str, &str)] = &[
    (
        "the connection (HTTP in and out, the handler)",
        "enforcer::listener::connection",
    ),
    ("the handler", "as axum::handler::Handler<"),
    (
        "  the request body (JSON)",
        "axum_core::extract::FromRequest<S>>::from_request",
    ),
    (
        "  the answer (`api::decision_response`)",
        "enforcer::api::decision_response",
    ),
    (
        "    its RateLimit headers",
        "enforcer::headers::RateLimitFields::of",
    ),
];
const GRPC_FRAMES: &[(&str, &str)] = &[
    (
        "the HTTP/2 connection (h2, tonic)",
        "hyper::proto::h2::server::",
    ),
    (
        "the request (protobuf)",
        "as tonic::codec::Decoder>::decode",
    ),
    ("the service (`rls::Service::decide`)", "enforcer::rls::"),
    ("the answer (protobuf)", "prost::message::Message::encode"),
];
const COMMON_FRAMES: &[(&str, &str)] = &[
    (
        "the decision (`Decider::check`)",
        "enforcer::decision::Decider::check",
    ),
    (
        "  the store's debit (key names, arguments)",
        "RedisStore as enforcer::store::TokenStore>::debit::",
    ),
    (
        "  the audit row (`Ledger::publish`)",
        "Subscriber for enforcer::ledger::Ledger>::publish",
    ),
    (
        "  the request fingerprint",
        "enforcer::store::Fingerprint::of_all",
    ),
    (
        "  the key's hash (SHA-256, the portable code under valgrind)",
        "enforcer::key::ApiKey::hash",
    ),
    (
        "the Redis pipeline task (`store::redis::batches`)",
        "enforcer::store::redis::batches",
    ),
    (
        "the Redis pipeline (`store::redis::send`)",
        "enforcer::store::redis::send",
    ),
];

pub fn run(clients: usize, seconds: u64) -> Result<()> {
    if Command::new("valgrind").arg("--version").output().is_err() {
        bail!("valgrind is not installed (apt-get install valgrind)");
    }
    crate::status(Command::new("cargo").args(["build", "--release", "--package", "enforcer"]))?;
    let dir = tempfile::Builder::new()
        .prefix("enforcer-bench-daemon-")
        .tempdir()?;
    // The production default where Redis can load it: the module.
    let script = std::env::var_os("ENFORCER_BENCH_SCRIPT").is_some();
    let module = crate::redis_module()?;
    let redis = Redis::start_with(dir.path(), (!script).then_some(module.as_path()))?;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let config = dir.path().join("bench.toml");
    let mut text = crate::bench::bench_config(addr, &redis.url());
    if !script {
        text = text.replace("redis_module = false\n", "redis_module = true\n");
    }
    if !text.contains(&format!("redis_module = {}\n", !script)) {
        bail!("the bench's config no longer names redis_module: update bench daemon");
    }
    std::fs::write(&config, text)?;
    let out = dir.path().join("callgrind.out");
    let mut valgrind = Command::new("valgrind");
    valgrind
        .arg("--tool=callgrind")
        .arg("--compress-strings=no")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg("target/release/enforcer");
    let mut daemon = crate::bench::Daemon(
        crate::bench::daemon_command(valgrind, &config, &dir.path().join("ledger.jsonl"), grpc)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the daemon under valgrind")?,
    );
    let pid = daemon.0.id();
    let started = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the daemon under valgrind did not listen on {addr} within 120 s");
        }
        if let Some(status) = daemon.0.try_wait()? {
            bail!("the daemon under valgrind exited: {status}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Every call a key never seen before and a fresh generated request id, as in the HTTP bench.
    let seq = std::sync::atomic::AtomicUsize::new(0);
    let body = move |_: usize| {
        let n = seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!(r#"{{"key":"bench-daemon-{n}","endpoint":"/v1/items","method":"GET"}}"#)
    };
    let body = std::sync::Arc::new(body);
    let warm = body.clone();
    loadgen::run(
        addr,
        "/v1/check",
        clients,
        Duration::from_secs(3),
        Pace::Closed,
        move |i| warm(i),
    )?;
    control(pid, "-z")?;
    let http = loadgen::run(
        addr,
        "/v1/check",
        clients,
        Duration::from_secs(seconds),
        Pace::Closed,
        move |i| body(i),
    )?;
    control(pid, "-d")?;
    // The same daemon through Envoy's API: `clients` streams over two HTTP/2 connections.
    let descriptor = |i: usize| {
        vec![
            ("api_key".to_owned(), format!("bench-daemon-grpc-{i}")),
            ("path".to_owned(), "/v1/items".to_owned()),
            ("method".to_owned(), "GET".to_owned()),
        ]
    };
    loadgen::grpc(grpc, clients, 2, Duration::from_secs(3), descriptor)?;
    control(pid, "-z")?;
    let grpc = loadgen::grpc(grpc, clients, 2, Duration::from_secs(seconds), descriptor)?;
    control(pid, "-d")?;
    drop(daemon);
    // The debits went to the module, which refused none (a refusal sends the debit to the
    // script: this would measure something else).
    let stats = crate::services::cli(redis.port, &["INFO", "commandstats"])?;
    let module = stats
        .lines()
        .map(str::trim_end)
        .find(|l| l.starts_with("cmdstat_enforcer.debit:"))
        .unwrap_or_default();
    if !script && !module.ends_with("rejected_calls=0,failed_calls=0") {
        bail!("the daemon did not debit with the module alone: {module:?}");
    }
    println!("machine: {}", crate::bench::machine());
    for (api, report, part, frames) in [
        ("POST /v1/check", http, 1, HTTP_FRAMES),
        ("Envoy's ShouldRateLimit (gRPC)", grpc, 2, GRPC_FRAMES),
    ] {
        if report.errors > 0 || report.requests == 0 {
            bail!(
                "{api}: {} decisions, {} errors: nothing to divide by",
                report.requests,
                report.errors
            );
        }
        let profile = Profile::read(&dir.path().join(format!("callgrind.out.{part}")))?;
        let n = report.requests as f64;
        println!(
            "\n{api}: {} decisions over {clients} connections in {:.1} s under valgrind; instructions per decision:",
            report.requests, report.seconds
        );
        println!(
            "{:<60} {:>8.0}",
            "all of the daemon's user space",
            profile.total as f64 / n
        );
        println!("inclusive (a frame and what it calls):");
        for (label, pattern) in frames.iter().chain(COMMON_FRAMES) {
            println!("{label:<60} {:>8.0}", profile.inclusive(pattern) as f64 / n);
        }
        println!("exclusive, the 20 most expensive functions:");
        for (name, cost) in profile.top_exclusive(20) {
            let short: String = name.chars().take(100).collect();
            println!(
                "{:>8.0} {:>5.1} %  {short}",
                cost as f64 / n,
                100.0 * cost as f64 / profile.total as f64
            );
        }
    }
    if std::env::var_os("ENFORCER_BENCH_KEEP").is_some() {
        println!("\ncallgrind's dumps are kept in {}", dir.keep().display());
    }
    Ok(())
}

fn control(pid: u32, what: &str) -> Result<()> {
    let status = Command::new("callgrind_control")
        .arg(what)
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .status()
        .context("running callgrind_control")?;
    if !status.success() {
        bail!("callgrind_control {what} {pid}: {status}");
    }
    Ok(())
}

/// A callgrind dump written with `--compress-strings=no`: each function's own cost, and its
/// calls' inclusive costs.
struct Profile {
    total: u64,
    own: HashMap<String, u64>,
    called: HashMap<String, u64>,
}

impl Profile {
    fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).context("reading callgrind's dump")?;
        let mut own: HashMap<String, u64> = HashMap::new();
        let mut called: HashMap<String, u64> = HashMap::new();
        let mut current = String::new();
        // The cost line right after `calls=` is the call's inclusive cost, not the caller's own.
        let mut after_calls = false;
        for line in text.lines() {
            if let Some(name) = line.strip_prefix("fn=") {
                current = name.to_owned();
                after_calls = false;
            } else if line.starts_with("calls=") {
                after_calls = true;
            } else if line.starts_with(|c: char| c.is_ascii_digit() || "+-*".contains(c)) {
                let Some(cost) = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse::<u64>().ok())
                else {
                    continue;
                };
                let into = if after_calls { &mut called } else { &mut own };
                *into.entry(current.clone()).or_default() += cost;
                after_calls = false;
            }
        }
        let total = own.values().sum();
        if total == 0 {
            bail!("callgrind's dump has no costs (was it written with --compress-strings=no?)");
        }
        Ok(Self { total, own, called })
    }

    /// Own plus called cost of the outermost function whose name contains `pattern` (a
    /// recursive frame, `f'2`, is left out: it is inside the first).
    fn inclusive(&self, pattern: &str) -> u64 {
        // The outermost of them costs the most: an async fn's body is its `{{closure}}`, and
        // the closures a frame calls are part of it. (A name in both maps is counted once:
        // the maximum does not mind it twice.)
        self.own
            .keys()
            .chain(self.called.keys())
            .filter(|n| n.contains(pattern) && !n.contains('\''))
            .map(|n| {
                self.own.get(n).copied().unwrap_or(0) + self.called.get(n).copied().unwrap_or(0)
            })
            .max()
            .unwrap_or(0)
    }

    fn top_exclusive(&self, n: usize) -> Vec<(&str, u64)> {
        let mut all: Vec<(&str, u64)> = self.own.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        all.sort_by_key(|b| std::cmp::Reverse(b.1));
        all.truncate(n);
        all
    }
}
