//! The kernel gate end to end, in network namespaces this test creates: an HTTP upstream and the
//! daemon (attached to the upstream's veth, protecting its port) in one namespace, a client in
//! the other. A key drained through `POST /v1/check` is rejected in the kernel: its requests
//! never reach the upstream, while another key's do, until refill makes it able to pay again.
use enforcer_tests::netns::{A_ADDR, Link, NetNs};
use enforcer_tests::{PinDir, enforcer_bin};
use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const UPSTREAM_PORT: u16 = 8080;
const API: &str = "127.0.0.1:18083";

// The daemon's process, killed on drop.
use enforcer_tests::Process as Daemon;

/// A minimal HTTP upstream in `ns`: counts the requests it receives per `x-api-key`.
fn upstream(ns: &NetNs) -> Arc<Mutex<HashMap<String, usize>>> {
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let counts = seen.clone();
    let path = ns.path();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        enforcer_tests::netns::enter_path(&path);
        let listener =
            std::net::TcpListener::bind(("0.0.0.0", UPSTREAM_PORT)).expect("bind upstream");
        ready_tx.send(()).expect("ready");
        for stream in listener.incoming().flatten() {
            let counts = counts.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut key = String::new();
                let mut line = String::new();
                while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                    if line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("x-api-key:") {
                        key = v.trim().to_owned();
                    }
                    line.clear();
                }
                *counts.lock().expect("lock").entry(key).or_insert(0) += 1;
                let mut s = stream;
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                );
            });
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("upstream listening");
    seen
}

/// A request from the client namespace; true when an answer came back in time.
fn call(client: &NetNs, key: &str) -> bool {
    let key = key.to_owned();
    client.run(move || {
        let Ok(mut s) = TcpStream::connect_timeout(
            &format!("{A_ADDR}:{UPSTREAM_PORT}").parse().expect("addr"),
            Duration::from_secs(1),
        ) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_millis(600))).expect("timeout");
        let req = format!(
            "POST /generate-report HTTP/1.1\r\nhost: api\r\nx-api-key: {key}\r\ncontent-length: 0\r\n\r\n"
        );
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        matches!(s.read(&mut buf), Ok(n) if n > 0)
    })
}

/// `POST /v1/check` of one report to the daemon (inside the server namespace); the status.
fn check(server: &NetNs, key: &str) -> u16 {
    check_body(
        server,
        format!(r#"{{"key":"{key}","endpoint":"/generate-report","method":"POST"}}"#),
    )
}

/// `POST /v1/check` with this body; the status.
fn check_body(server: &NetNs, body: String) -> u16 {
    server.run(move || {
        let mut s = TcpStream::connect(API).expect("daemon API");
        write!(
            s,
            "POST /v1/check HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status")
    })
}

/// Starts the daemon in the server namespace, attached to its veth, and waits for its API.
fn daemon(link: &Link, pin: &PinDir) -> Daemon {
    daemon_with(
        link,
        pin,
        concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/enforcer.toml"),
    )
}

/// The same with another config file.
fn daemon_with(link: &Link, pin: &PinDir, config: &str) -> Daemon {
    daemon_logging_to(link, pin, config, None)
}

/// The same, with the audit ledger in `ledger` (no database: the embedded file).
fn daemon_logging_to(
    link: &Link,
    pin: &PinDir,
    config: &str,
    ledger: Option<&std::path::Path>,
) -> Daemon {
    let port = UPSTREAM_PORT.to_string();
    let mut command = link.a.command(enforcer_bin().to_str().expect("path"));
    command
        .args(["run", "--config", config, "--listen", API])
        .args(["--iface", &link.a_if, "--protect-port", &port])
        .args(["--pin-dir", &pin.path()])
        .args(["--admin-socket", &admin_socket(pin)])
        .env("ENFORCER_REDIS_URL", "")
        .stderr(Stdio::null());
    if let Some(file) = ledger {
        command.arg("--ledger-file").arg(file);
    }
    let daemon = Daemon(command.spawn().expect("start the daemon"));
    let start = Instant::now();
    while link.a.run(|| TcpStream::connect(API).is_err()) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "daemon did not come up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    daemon
}

/// The admin socket of the daemon of `pin` (one per test: the default is one per machine).
fn admin_socket(pin: &PinDir) -> String {
    let pin = pin.path();
    let name = std::path::Path::new(&pin)
        .file_name()
        .expect("pin dir name")
        .to_string_lossy()
        .into_owned();
    format!("/tmp/enforcer-admin-{name}/admin.sock")
}

/// `enforcer ARGS --socket <the daemon's>` with `key` on stdin; (exit code, stdout + stderr).
fn admin(pin: &PinDir, args: &[&str], key: &str) -> (i32, String) {
    let socket = admin_socket(pin);
    let mut all = args.to_vec();
    all.extend(["--socket", &socket]);
    let (code, out, err) = enforcer_tests::enforcer_cli(&all, Some(&format!("{key}\n")));
    (code, out + &err)
}

fn metrics(server: &NetNs) -> String {
    server.run(|| {
        let mut s = TcpStream::connect(API).expect("daemon API");
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        )
        .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out
    })
}

/// `enforcer_kernel_rejected_total{reason="l7"}` of the daemon.
fn l7_rejections(server: &NetNs) -> f64 {
    enforcer_tests::parse_metric(
        &metrics(server),
        "enforcer_kernel_rejected_total{reason=\"l7\"}",
    )
}

#[test]
fn a_drained_key_is_rejected_in_the_kernel_until_refill() {
    let link = Link::new("e2e");
    let pin = PinDir::new();
    let seen = upstream(&link.a);
    let dir = tempfile::tempdir().expect("tmp");
    let ledger = dir.path().join("ledger.jsonl");
    let started = Instant::now();
    let _daemon = daemon_logging_to(
        &link,
        &pin,
        concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/enforcer.toml"),
        Some(&ledger),
    );

    assert!(
        call(&link.b, "e2e-drained"),
        "before draining, the key reaches the upstream"
    );
    // free tier: 800 tokens, 120 per report: six pass, the seventh is denied with 80 left.
    let statuses: Vec<u16> = (0..7).map(|_| check(&link.a, "e2e-drained")).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 200, 429]);
    let drained = Instant::now();
    wait_until_drained(&pin, "e2e-drained");

    assert!(
        !call(&link.b, "e2e-drained"),
        "the drained key is rejected in the kernel"
    );
    assert!(call(&link.b, "e2e-other"), "another key passes");
    // The last write of the drained key's decisions (settled once nothing changed for 200 ms).
    let mut stamped = snapshot_of(&pin, "e2e-drained").synced_ns;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let again = snapshot_of(&pin, "e2e-drained").synced_ns;
        if again == stamped {
            break;
        }
        stamped = again;
    }
    // Past max_staleness (2 s) the snapshot still holds: the daemon's heartbeat keeps it
    // valid, without writing it again (it is lifted at 30 s).
    std::thread::sleep(Duration::from_millis(2300).saturating_sub(drained.elapsed()));
    assert!(
        !call(&link.b, "e2e-drained"),
        "still rejected after max_staleness"
    );
    assert_eq!(
        snapshot_of(&pin, "e2e-drained").synced_ns,
        stamped,
        "three heartbeats later, the snapshot was not rewritten"
    );
    let counts = seen.lock().expect("lock").clone();
    assert_eq!(
        counts.get("e2e-drained"),
        Some(&1),
        "only the call before draining arrived"
    );
    assert_eq!(counts.get("e2e-other"), Some(&1));

    // 80 tokens + 10/s reach 120 after 4 s: the key gets through again.
    std::thread::sleep(Duration::from_millis(4600).saturating_sub(drained.elapsed()));
    assert!(
        call(&link.b, "e2e-drained"),
        "after refill the key passes again"
    );

    let rejected = l7_rejections(&link.a);
    assert!(
        rejected >= 2.0,
        "kernel rejections reach /metrics: {rejected}"
    );

    // The per-key counts reach the audit ledger as rollup rows at the next read (every 10 s;
    // the first read, at start, is the baseline).
    let id = enforcer_common::key_id(b"e2e-drained") as i64;
    let deadline = enforcer::kernel::ROLLUP_EVERY + Duration::from_secs(5);
    let rolled_up = loop {
        let rows: i64 = std::fs::read_to_string(&ledger)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["t"] == "kernel" && v["key_id"] == id && v["reason"] == "l7")
            .filter_map(|v| v["count"].as_i64())
            .sum();
        if rows >= 2 || started.elapsed() > deadline {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // The kernel may have rejected retransmissions since the metric was read: compare with a
    // reading taken after the rollup (the metric is refreshed every max_staleness / 3).
    std::thread::sleep(Duration::from_millis(1500));
    let rejected_now = l7_rejections(&link.a);
    assert!(
        rolled_up >= 2 && rolled_up as f64 <= rejected_now,
        "kernel rejections of the drained key in the ledger: {rolled_up} (metric: {rejected_now})"
    );
}

#[test]
fn the_gate_outlives_a_daemon_restart_and_passes_everything_once_stale() {
    let link = Link::new("rst");
    let pin = PinDir::new();
    let seen = upstream(&link.a);
    let mut first = daemon(&link, &pin);
    // Empty the key: 6 reports (720 tokens) and 80 units of a 1-token endpoint leave 0, and
    // refill (10/s) needs 12 s to pay for a report again.
    let key = "rst-drained";
    let units = |endpoint: &str, method: &str, units: u32| {
        format!(r#"{{"key":"{key}","endpoint":"{endpoint}","method":"{method}","units":{units}}}"#)
    };
    assert_eq!(
        check_body(&link.a, units("/generate-report", "POST", 6)),
        200
    );
    assert_eq!(check_body(&link.a, units("/items", "GET", 80)), 200);
    assert_eq!(check(&link.a, key), 429);
    wait_until_drained(&pin, key);
    assert!(!call(&link.b, key), "rejected in the kernel");

    // The daemon dies: the program stays attached (pinned link) with the pinned snapshot.
    let _ = first.0.kill();
    let _ = first.0.wait();
    assert!(!call(&link.b, key), "still rejected with the daemon gone");

    // A new daemon adopts the pinned maps and link, and keeps the snapshot fresh.
    let second = daemon(&link, &pin);
    std::thread::sleep(Duration::from_millis(2300));
    assert!(
        !call(&link.b, key),
        "still rejected past max_staleness after the restart"
    );
    assert!(call(&link.b, "rst-other"), "other keys pass");

    assert_eq!(
        seen.lock().expect("lock").get(key),
        None,
        "nothing of the drained key reached the upstream while it was rejected"
    );

    // The daemon stops for good: after max_staleness everything passes (fail open). (Earlier
    // rejected segments may then arrive too, as TCP retransmits them: no count is asserted.)
    drop(second);
    std::thread::sleep(Duration::from_millis(2300));
    assert!(call(&link.b, key), "stale data: the gate passes everything");
}

/// `enforcer …` run as an operator would on the node; (exit code, stdout).
fn enforcer(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(enforcer_bin())
        .args(args)
        .output()
        .expect("run enforcer");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn operators_block_inspect_and_detach_from_the_cli() {
    let link = Link::new("cli");
    let pin = PinDir::new();
    let _upstream = upstream(&link.a);
    let _daemon = daemon(&link, &pin);
    let dir = pin.path();
    assert!(call(&link.b, "cli-key"), "not blocked yet");

    // Through the daemon's admin socket, the key on stdin.
    let block = ["keys", "block", "--for", "10m", "--pin-dir", &dir];
    let (code, out) = admin(&pin, &block, "cli-key");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("blocked in this node's kernel gate for 600s"),
        "{out}"
    );
    let (code, shown) = admin(&pin, &["keys", "show"], "cli-key");
    assert_eq!(code, 0, "{shown}");
    assert!(shown.contains("block:       "), "{shown}");
    assert!(
        !shown.contains("block:       none"),
        "the block shows: {shown}"
    );
    assert!(!call(&link.b, "cli-key"), "blocked in the kernel");
    assert!(call(&link.b, "cli-other"), "other keys pass");

    let (code, status) = enforcer(&["kernel", "status", "--pin-dir", &dir]);
    assert_eq!(code, 0);
    assert!(
        status.contains(&link.a_if),
        "attached interface listed: {status}"
    );
    assert!(status.contains("daemon alive"), "{status}");
    assert!(status.contains("map BLOCKS    1/"), "{status}");
    assert!(
        !status.contains("blocked 0;"),
        "the blocked packets are counted: {status}"
    );

    let (code, out) = admin(&pin, &["keys", "unblock", "--pin-dir", &dir], "cli-key");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("unblocked"), "{out}");
    assert!(call(&link.b, "cli-key"), "unblocked");

    assert_eq!(admin(&pin, &block, "cli-key").0, 0);
    assert!(!call(&link.b, "cli-key"));
    let (code, out) = enforcer(&["kernel", "detach", "--pin-dir", &dir]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!("detached from {}", link.a_if)),
        "{out}"
    );
    assert!(
        call(&link.b, "cli-key"),
        "nothing is rejected once detached"
    );

    let (code, _) = enforcer(&["kernel", "status", "--pin-dir", "/sys/fs/bpf/enforcer-none"]);
    assert_ne!(code, 0, "a clear error without a pinned gate");
}

#[test]
fn reset_answers_a_rejected_request_with_a_tcp_rst() {
    let link = Link::new("rset");
    let pin = PinDir::new();
    let _upstream = upstream(&link.a);
    // The example config, with `action = "reset"` in its [kernel] table.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("reset.toml");
    let example = include_str!("../../examples/enforcer.toml");
    assert!(example.contains("\n[kernel]\n"));
    let with_reset = example.replacen("\n[kernel]\n", "\n[kernel]\naction = \"reset\"\n", 1);
    std::fs::write(&config, with_reset).expect("write");
    let _daemon = daemon_with(&link, &pin, config.to_str().expect("path"));
    for _ in 0..7 {
        check(&link.a, "rset-drained");
    }
    let started = Instant::now();
    let error = link.b.run(|| {
        let mut s = TcpStream::connect((A_ADDR, UPSTREAM_PORT)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
        s.write_all(b"POST /generate-report HTTP/1.1\r\nhost: api\r\nx-api-key: rset-drained\r\ncontent-length: 0\r\n\r\n")
            .expect("write");
        let mut buf = [0u8; 16];
        s.read(&mut buf).map(|_| ()).map_err(|e| e.kind())
    });
    assert_eq!(
        error,
        Err(std::io::ErrorKind::ConnectionReset),
        "the client is reset"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "at once, not after a timeout"
    );
    assert!(call(&link.b, "rset-other"), "other keys pass");
}

/// A config file in `dir`: every key starts in a prepaid tier (no refill, so only debits and
/// refunds move a balance, whatever the machine's speed) with `initial` tokens; `/generate-report`
/// costs 120 unless `endpoints` says otherwise.
fn prepaid_config(dir: &std::path::Path, name: &str, initial: f64, endpoints: &str) -> String {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            r#"
[budget]
default_tier = "prepaid"
[tiers.prepaid]
max_tokens = 5000
refill_per_sec = 0
initial_tokens = {initial}
[pricing]
default_cost = 1
{endpoints}
[kernel]
max_staleness_ms = 2000
"#
        ),
    )
    .expect("write config");
    path.display().to_string()
}

const REPORT_120: &str = r#"
[[pricing.endpoints]]
method = "POST"
path = "/generate-report"
base_cost = 120
"#;

/// `POST /v1/check` of one report under a request id; the status.
fn check_id(server: &NetNs, key: &str, request_id: &str) -> u16 {
    check_body(
        server,
        format!(
            r#"{{"key":"{key}","endpoint":"/generate-report","method":"POST","request_id":"{request_id}"}}"#
        ),
    )
}

/// `POST /v1/refund`; the status and the body.
fn refund(server: &NetNs, key: &str, request_id: &str) -> (u16, String) {
    let body = format!(r#"{{"key":"{key}","request_id":"{request_id}"}}"#);
    server.run(move || {
        let mut s = TcpStream::connect(API).expect("daemon API");
        write!(
            s,
            "POST /v1/refund HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status");
        (status, out)
    })
}

/// Waits until the daemon's sync task has written a snapshot of `key` into the pinned map (the
/// decision's answer does not wait for it).
fn wait_for_snapshot(pin: &PinDir, key: &str) {
    let gate = enforcer::kernel::Gate::load(Some(std::path::Path::new(&pin.path())))
        .expect("open the pinned gate");
    let id = enforcer_common::key_id(key.as_bytes());
    let started = Instant::now();
    while gate.budget(id).expect("read the map").is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no snapshot of {key}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The pinned map's snapshot of `key` (there must be one).
fn snapshot_of(pin: &PinDir, key: &str) -> enforcer_common::Budget {
    enforcer::kernel::Gate::load(Some(std::path::Path::new(&pin.path())))
        .expect("open the pinned gate")
        .budget(enforcer_common::key_id(key.as_bytes()))
        .expect("read the map")
        .expect("a snapshot")
}

/// Waits until the pinned map holds a snapshot of `key` that cannot pay for one report (120
/// tokens): the decision's answer does not wait for the sync task, and an earlier snapshot of the
/// same key (taken while it could still pay) may be in the map until then.
fn wait_until_drained(pin: &PinDir, key: &str) {
    let gate = enforcer::kernel::Gate::load(Some(std::path::Path::new(&pin.path())))
        .expect("open the pinned gate");
    let id = enforcer_common::key_id(key.as_bytes());
    let started = Instant::now();
    loop {
        let balance = gate
            .budget(id)
            .expect("read the map")
            .map(|b| b.balance_milli);
        if balance.is_some_and(|milli| milli < 120_000) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no drained snapshot of {key} (balance {balance:?} milli-tokens)"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Calls until one reaches the upstream or `within` passes; how long it took.
fn passes_within(client: &NetNs, key: &str, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        if call(client, key) {
            return Some(started.elapsed());
        }
    }
    None
}

#[test]
fn a_refund_reaches_the_kernel_at_once() {
    let link = Link::new("rfd");
    let pin = PinDir::new();
    let seen = upstream(&link.a);
    let dir = tempfile::tempdir().expect("tmp");
    let config = prepaid_config(dir.path(), "refund.toml", 240.5, REPORT_120);
    let _daemon = daemon_with(&link, &pin, &config);
    let key = "rfd-drained";

    // 240.5 tokens: two reports pass, 0.5 is left, the third is denied.
    assert_eq!(check_id(&link.a, key, "rfd-1"), 200);
    assert_eq!(check_id(&link.a, key, "rfd-2"), 200);
    assert_eq!(check_id(&link.a, key, "rfd-3"), 429);
    wait_until_drained(&pin, key);
    assert!(
        !call(&link.b, key),
        "the drained key is rejected in the kernel"
    );

    // The snapshot as the kernel holds it, read from the pinned map.
    let gate = enforcer::kernel::Gate::load(Some(std::path::Path::new(&pin.path())))
        .expect("open the pinned gate");
    let id = enforcer_common::key_id(key.as_bytes());
    let balance = || {
        gate.budget(id)
            .expect("read the snapshot")
            .map(|b| b.balance_milli)
    };
    assert_eq!(balance(), Some(500), "drained to 0.5");

    let (status, body) = refund(&link.a, key, "rfd-2");
    let refunded = Instant::now();
    assert_eq!(status, 200, "{body}");
    // The kernel's map has the new balance within one sync step (the target: 100 ms; asserted
    // generously, a busy machine may be slower): 120.5 pays for everything, so the snapshot
    // is removed.
    let in_map = loop {
        if balance().is_none_or(|b| b >= 120_000) {
            break refunded.elapsed();
        }
        assert!(
            refunded.elapsed() < Duration::from_secs(2),
            "the refund never reached the kernel: {:?}",
            balance()
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let through = passes_within(&link.b, key, Duration::from_secs(2))
        .expect("after the refund the key's request reaches the upstream");
    println!(
        "refund -> kernel map: {:.1} ms; refund -> a request through: {:.1} ms",
        in_map.as_secs_f64() * 1e3,
        (in_map + through).as_secs_f64() * 1e3
    );
    assert!(seen.lock().expect("lock").get(key).is_some());
}

#[test]
fn a_cheaper_price_table_after_a_restart_never_rejects_at_the_old_price() {
    let link = Link::new("prc");
    let pin = PinDir::new();
    let seen = upstream(&link.a);
    let dir = tempfile::tempdir().expect("tmp");
    let expensive = r#"
[[pricing.endpoints]]
method = "POST"
path = "/expensive"
base_cost = 250
"#;
    let old = prepaid_config(
        dir.path(),
        "old.toml",
        300.0,
        &format!("{REPORT_120}{expensive}"),
    );
    // The new table drops the report's exact price: it costs the default, 1 token.
    let new = prepaid_config(dir.path(), "new.toml", 300.0, expensive);
    let spend = |key: &str| {
        check_body(
            &link.a,
            format!(r#"{{"key":"{key}","endpoint":"/expensive","method":"POST"}}"#),
        )
    };
    let key = "prc-low";

    let mut first = daemon_with(&link, &pin, &old);
    assert_eq!(spend(key), 200, "300 - 250: 50 left");
    wait_for_snapshot(&pin, key);
    assert!(
        !call(&link.b, key),
        "under the old table a report (120) is more than the key has"
    );
    let _ = first.0.kill();
    let _ = first.0.wait();

    let _second = daemon_with(&link, &pin, &new);
    // The in-process store starts again: 300 - 250 leaves 50, and a second one is denied.
    assert_eq!(spend(key), 200);
    assert_eq!(spend(key), 429, "the key has a snapshot of 50 now");
    wait_for_snapshot(&pin, key);
    assert_eq!(
        check(&link.a, "prc-other"),
        200,
        "userspace: a report costs 1 now"
    );
    assert!(
        call(&link.b, key),
        "the old report price (120) must not reject what costs 1 now"
    );
    // (The request rejected under the old table may arrive too: TCP retransmits it.)
    assert!(seen.lock().expect("lock").get(key).is_some());
}

/// A config reload (SIGHUP) that makes a price cheaper: the kernel's generation changes, so the
/// snapshots taken under the old table stop counting at once, and its price map follows. The
/// request the old table rejected in the kernel passes without a restart.
#[test]
fn a_reload_moves_the_kernel_to_a_new_generation_and_price_table() {
    let link = Link::new("rld");
    let pin = PinDir::new();
    let seen = upstream(&link.a);
    let dir = tempfile::tempdir().expect("tmp");
    let expensive = r#"
[[pricing.endpoints]]
method = "POST"
path = "/expensive"
base_cost = 250
"#;
    let config = prepaid_config(
        dir.path(),
        "enforcer.toml",
        300.0,
        &format!("{REPORT_120}{expensive}"),
    );
    let daemon = daemon_with(&link, &pin, &config);
    let spend = |key: &str| {
        check_body(
            &link.a,
            format!(r#"{{"key":"{key}","endpoint":"/expensive","method":"POST"}}"#),
        )
    };
    let key = "rld-low";
    assert_eq!(spend(key), 200, "300 - 250: 50 left");
    wait_for_snapshot(&pin, key);
    assert!(
        !call(&link.b, key),
        "under the old table a report (120) is more than the key has"
    );
    let gate = enforcer::kernel::Gate::load(Some(std::path::Path::new(&pin.path())))
        .expect("open the pinned gate");
    let generation = |gate: &enforcer::kernel::Gate| {
        gate.config()
            .expect("read CONFIG")
            .map(|c| c.generation)
            .expect("configured")
    };
    let before = generation(&gate);
    let report_key = enforcer::kernel::price_key(Some("POST"), "/generate-report");
    let has_report = |gate: &enforcer::kernel::Gate| {
        gate.prices()
            .expect("read PRICES")
            .iter()
            .any(|(k, _)| *k == report_key)
    };
    assert!(has_report(&gate));

    // The new table drops the report's exact price: it costs the default, 1 token.
    prepaid_config(dir.path(), "enforcer.toml", 300.0, expensive);
    let hup = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(daemon.0.id().to_string())
        .status()
        .expect("kill");
    assert!(hup.success());
    let started = Instant::now();
    while generation(&gate) == before {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the reload did not reach the kernel"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!has_report(&gate), "the price map is the new table's");
    assert_eq!(check(&link.a, "rld-other"), 200, "userspace: 1 token now");
    assert!(
        call(&link.b, key),
        "the old snapshot stopped counting and the old price is gone"
    );
    assert!(seen.lock().expect("lock").get(key).is_some());
    // The key's next decision writes a snapshot of the new generation (50 - 1 left), which
    // still pays for a report at 1.
    assert_eq!(check(&link.a, key), 200);
    wait_for_snapshot(&pin, key);
    let snapshot = gate
        .budget(enforcer_common::key_id(key.as_bytes()))
        .expect("read BUDGETS")
        .expect("a snapshot");
    assert_eq!(snapshot.generation, generation(&gate));
    assert!(call(&link.b, key));
    drop(daemon);
}

#[test]
fn set_tier_lifts_the_keys_snapshot_on_this_node() {
    let link = Link::new("tier");
    let pin = PinDir::new();
    let _upstream = upstream(&link.a);
    let dir = tempfile::tempdir().expect("tmp");
    let config = prepaid_config(dir.path(), "tier.toml", 240.5, REPORT_120);
    let _daemon = daemon_with(&link, &pin, &config);
    let key = enforcer_tests::unique("tier-drained");
    for _ in 0..3 {
        check(&link.a, &key);
    }
    wait_until_drained(&pin, &key);
    assert!(!call(&link.b, &key), "drained: rejected in the kernel");

    // The operator moves the key to another tier (through the daemon, on its embedded
    // store); this node's gate forgets the snapshot of the old tier, and the daemon's refresh
    // does not bring it back.
    let (code, out) = admin(&pin, &["keys", "set-tier", "prepaid"], &key);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("follows at once"), "{out}");
    let start = Instant::now();
    while !call(&link.b, &key) {
        assert!(start.elapsed() < Duration::from_secs(5), "never lifted");
    }
    assert!(call(&link.b, &key), "passes once lifted");
    // Past several refresh steps (max_staleness / 3) and max_staleness itself.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        call(&link.b, &key),
        "a refresh never re-creates a lifted snapshot"
    );
    // Its next decision writes a snapshot again.
    assert_eq!(check(&link.a, &key), 429);
    wait_for_snapshot(&pin, &key);
    assert!(!call(&link.b, &key));
}

#[test]
fn a_grant_reaches_the_kernel_at_once_and_shows_in_the_ledger() {
    let link = Link::new("grant");
    let pin = PinDir::new();
    let _upstream = upstream(&link.a);
    let dir = tempfile::tempdir().expect("tmp");
    // Prepaid: 240.5 tokens, reports cost 120, grants up to 6000.
    let config = prepaid_config(dir.path(), "grant.toml", 240.5, REPORT_120);
    let text = std::fs::read_to_string(&config).expect("read").replace(
        "initial_tokens = 240.5",
        "initial_tokens = 240.5\ngrant_ceiling = 6000",
    );
    std::fs::write(&config, text).expect("write");
    let ledger = dir.path().join("ledger.jsonl");
    let _daemon = daemon_logging_to(&link, &pin, &config, Some(&ledger));
    let key = enforcer_tests::unique("grant-drained");
    let statuses: Vec<u16> = (0..3).map(|_| check(&link.a, &key)).collect();
    assert_eq!(statuses, [200, 200, 429], "0.5 left");
    wait_until_drained(&pin, &key);
    assert!(!call(&link.b, &key), "drained: rejected in the kernel");

    let (code, out) = admin(
        &pin,
        &["keys", "grant", "500", "--note", "invoice 42 paid"],
        &key,
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("balance now 500.500"), "{out}");
    // No decision in between: the grant itself reaches the gate.
    let start = Instant::now();
    while !call(&link.b, &key) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the granted key is still rejected in the kernel"
        );
    }
    // And it is spendable: four reports of 120 from 500.5.
    let statuses: Vec<u16> = (0..5).map(|_| check(&link.a, &key)).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 429]);
    let (code, shown) = admin(&pin, &["keys", "show"], &key);
    assert_eq!(code, 0, "{shown}");
    assert!(shown.contains("balance:     20.500"), "{shown}");
    assert!(shown.contains("tier:        prepaid"), "{shown}");
    // Past the ceiling: refused whole.
    let (code, out) = admin(&pin, &["keys", "grant", "5990", "--note", "too much"], &key);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("grant_ceiling"), "{out}");
    // The grant's audit row: kind, tokens, balance after, note and operator.
    let start = Instant::now();
    let row = loop {
        let found = std::fs::read_to_string(&ledger)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["kind"] == "grant");
        if let Some(row) = found {
            break row;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no grant row");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(row["cost"], 500.0);
    assert_eq!(row["remaining"], 500.5);
    assert_eq!(row["note"], "invoice 42 paid");
    assert_eq!(row["operator"], "uid:0");
    assert_eq!(
        row["key_hash"],
        enforcer::key::ApiKey::parse(&key)
            .expect("key")
            .hash()
            .to_hex()
    );
}

#[test]
fn sigterm_flushes_the_ledger_and_leaves_the_gate_enforcing() {
    let link = Link::new("term");
    let pin = PinDir::new();
    let seen = upstream(&link.a);
    let dir = tempfile::tempdir().expect("tmp");
    let config = prepaid_config(dir.path(), "term.toml", 240.5, REPORT_120);
    // Long enough that the gate still enforces when the test looks, on a slow machine too.
    let text = std::fs::read_to_string(&config)
        .expect("read")
        .replace("max_staleness_ms = 2000", "max_staleness_ms = 20000");
    std::fs::write(&config, text).expect("write");
    let ledger = dir.path().join("ledger.jsonl");
    let mut daemon = daemon_logging_to(&link, &pin, &config, Some(&ledger));
    let key = "term-drained";
    let statuses: Vec<u16> = (0..3).map(|_| check(&link.a, key)).collect();
    assert_eq!(statuses, [200, 200, 429]);

    let pid = daemon.0.id().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let stopped = Instant::now();
    let status = loop {
        if let Some(status) = daemon.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(20),
            "the daemon did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "a clean exit: {status}");
    let rows = std::fs::read_to_string(&ledger)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["t"] == "decision")
        .count();
    assert_eq!(rows, 3, "every decision is in the ledger after the exit");
    assert!(
        !call(&link.b, key),
        "the pinned maps keep enforcing after the daemon stopped"
    );
    assert!(call(&link.b, "term-other"), "other keys pass");
    assert_eq!(seen.lock().expect("lock").get(key), None);
}

/// A request from the client namespace without the key header (TLS-terminated elsewhere, another
/// auth scheme): only an L4 binding of its address could judge it. True when answered in time.
fn call_keyless(client: &NetNs) -> bool {
    client.run(move || {
        let Ok(mut s) = TcpStream::connect_timeout(
            &format!("{A_ADDR}:{UPSTREAM_PORT}").parse().expect("addr"),
            Duration::from_secs(1),
        ) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_millis(600)))
            .expect("timeout");
        let req = "POST /generate-report HTTP/1.1\r\nhost: api\r\n\
                   authorization: Bearer victim-token\r\ncontent-length: 0\r\n\r\n";
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        matches!(s.read(&mut buf), Ok(n) if n > 0)
    })
}

/// Sends `head` (request line and headers, without the final blank line) and `body` to the
/// daemon's API at `addr` from inside `server`; the whole answer. Dialing a local address
/// makes it the connection's source too, so `addr` also picks the peer the daemon sees
/// (`127.0.0.1`, or the server's veth address).
fn api_call(server: &NetNs, addr: &str, head: &str, body: &str) -> String {
    let request = format!(
        "{head}\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let addr = addr.to_owned();
    server.run(move || {
        let mut s = TcpStream::connect(&addr).expect("daemon API");
        s.write_all(request.as_bytes()).expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out
    })
}

fn status(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"))
}

#[test]
fn forged_client_addresses_never_bind_a_victim_to_a_drained_key() {
    let link = Link::new("fwd");
    let pin = PinDir::new();
    let seen = upstream(&link.a);
    // The example config with a free tier that never refills: the drained key stays drained
    // however slow the machine is.
    let dir = tempfile::tempdir().expect("tempdir");
    let example = include_str!("../../examples/enforcer.toml");
    let tier = "[tiers.free]\nmax_tokens = 1000\nrefill_per_sec = 10\n";
    assert!(example.contains(tier));
    let no_refill = example.replacen(
        tier,
        "[tiers.free]\nmax_tokens = 1000\nrefill_per_sec = 0\n",
        1,
    );
    // The daemon listens on every address of the server namespace: dialed on 127.0.0.1 and on
    // the veth address, it sees two different peers.
    let (loopback, veth) = ("127.0.0.1:18084".to_owned(), format!("{A_ADDR}:18084"));
    let start = |config: &str, name: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, config).expect("write config");
        let port = UPSTREAM_PORT.to_string();
        let daemon = Daemon(
            link.a
                .command(enforcer_bin().to_str().expect("path"))
                .args(["run", "--config", path.to_str().expect("path")])
                .args(["--listen", "0.0.0.0:18084"])
                .args(["--iface", &link.a_if, "--protect-port", &port])
                .args(["--pin-dir", &pin.path()])
                .env("ENFORCER_REDIS_URL", "")
                .stderr(Stdio::null())
                .current_dir(dir.path())
                .spawn()
                .expect("start the daemon"),
        );
        let started = Instant::now();
        while link
            .a
            .run(|| TcpStream::connect("127.0.0.1:18084").is_err())
        {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "daemon did not come up"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        daemon
    };
    let key = "fwd-drained";
    let check = |client_ip: Option<&str>| {
        let ip = client_ip.map_or(String::new(), |ip| format!(r#","client_ip":"{ip}""#));
        let body =
            format!(r#"{{"key":"{key}","endpoint":"/generate-report","method":"POST"{ip}}}"#);
        status(&api_call(
            &link.a,
            &loopback,
            "POST /v1/check HTTP/1.1",
            &body,
        ))
    };
    let drain = || {
        // 800 tokens, 120 per report: six pass, 80 are left, and never refill.
        let statuses: Vec<u16> = (0..7).map(|_| check(None)).collect();
        assert_eq!(statuses, [200, 200, 200, 200, 200, 200, 429]);
    };
    let victim = enforcer_tests::netns::B_ADDR;
    let auth = |addr: &str| {
        let head = format!(
            "GET /v1/auth HTTP/1.1\r\nx-api-key: {key}\r\nx-original-uri: /generate-report\r\n\
             x-original-method: POST\r\nx-forwarded-for: {victim}\r\nx-real-ip: {victim}"
        );
        status(&api_call(&link.a, addr, &head, ""))
    };
    let untrusted_peers = || {
        let metrics = api_call(&link.a, &loopback, "GET /metrics HTTP/1.1", "");
        enforcer_tests::parse_metric(
            &metrics,
            "enforcer_client_addresses_total{outcome=\"untrusted_peer\"}",
        )
    };

    // The attack: the drained key names the victim's address, from peers that are no trusted
    // proxies (the default: none is), in both headers and in /v1/check's client_ip.
    let daemon = start(&no_refill, "untrusting.toml");
    assert!(call_keyless(&link.b), "the victim passes before the attack");
    drain();
    wait_until_drained(&pin, key);
    assert!(!call(&link.b, key), "the drained key is rejected");
    for _ in 0..5 {
        assert_eq!(auth(&veth), 429);
        assert_eq!(auth(&loopback), 429);
        assert_eq!(check(Some(victim)), 429);
    }
    // The sync task binds within milliseconds (as it did before the fix); give a busy machine
    // time before looking.
    std::thread::sleep(Duration::from_millis(500));
    for attempt in 0..3 {
        assert!(
            call_keyless(&link.b),
            "the victim's request without a key header still reaches the upstream ({attempt})"
        );
    }
    assert_eq!(
        seen.lock().expect("lock").get(""),
        Some(&4),
        "every request of the victim arrived"
    );
    assert_eq!(untrusted_peers(), 15.0, "every forged address was ignored");
    drop(daemon);

    // The control: with 127.0.0.1 trusted, the same headers from the veth address still bind
    // nothing, and from 127.0.0.1 they bind the address: the victim's keyless requests are then
    // judged by the drained key. (So the attack above would have bound it, had its headers
    // been believed.)
    let trusting = no_refill.replacen(
        "[server]\n",
        "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
        1,
    );
    let _daemon = start(&trusting, "trusting.toml");
    drain();
    for _ in 0..5 {
        assert_eq!(auth(&veth), 429);
    }
    assert_eq!(
        untrusted_peers(),
        5.0,
        "the veth address is no trusted proxy"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        call_keyless(&link.b),
        "nothing bound from the untrusted peer"
    );
    for _ in 0..5 {
        assert_eq!(auth(&loopback), 429);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while call_keyless(&link.b) {
        assert!(
            Instant::now() < deadline,
            "the address a trusted proxy named is bound to the drained key"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---- Paid traffic is never broken by an L4 rejection ----

/// Bytes of each paid response: many TCP segments, so the client must keep acknowledging.
const PAID_BODY: usize = 1 << 20;

/// The value of a pinned LRU hash map's entry (`None` when absent or unreadable).
fn pinned<K: aya::Pod, V: aya::Pod>(pin: &str, map: &str, key: K) -> Option<V> {
    let data = aya::maps::MapData::from_pin(format!("{pin}/{map}")).ok()?;
    let map = aya::maps::HashMap::<_, K, V>::try_from(aya::maps::Map::LruHashMap(data)).ok()?;
    map.get(&key, 0).ok()
}

/// An HTTP upstream in `ns` that is its own gateway, as nginx with `auth_request` is: for each
/// request (keep-alive) it asks the daemon's `/v1/check` (at `api`, from 127.0.0.1, a trusted
/// proxy) with the key, the path and the peer's address, and answers 429, or 200 with
/// [`PAID_BODY`] bytes. Counts the requests that reached it per key.
///
/// When a decision leaves the key below the cheapest price (1 token), it sends the body only
/// once the kernel knows: the key's snapshot is in `BUDGETS` and the peer's address in
/// `BINDINGS` (pinned under `pin`). Then the body's ACKs come from a bound address whose key
/// cannot pay the cheapest price, whatever the machine's speed.
fn paying_upstream(
    ns: &NetNs,
    api: &'static str,
    pin: String,
) -> Arc<Mutex<HashMap<String, usize>>> {
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let counts = seen.clone();
    let path = ns.path();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        enforcer_tests::netns::enter_path(&path);
        let listener =
            std::net::TcpListener::bind(("0.0.0.0", UPSTREAM_PORT)).expect("bind upstream");
        ready_tx.send(()).expect("ready");
        for stream in listener.incoming().flatten() {
            let counts = counts.clone();
            let pin = pin.clone();
            std::thread::spawn(move || {
                let peer = stream.peer_addr().expect("peer").ip();
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut out = stream;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).map(|n| n == 0).unwrap_or(true) {
                        return;
                    }
                    let mut parts = line.split_whitespace();
                    let (method, target) = (
                        parts.next().unwrap_or("").to_owned(),
                        parts.next().unwrap_or("").to_owned(),
                    );
                    let mut key = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).map(|n| n == 0).unwrap_or(true) {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("x-api-key:") {
                            key = v.trim().to_owned();
                        }
                    }
                    *counts.lock().expect("lock").entry(key.clone()).or_insert(0) += 1;
                    let body = format!(
                        r#"{{"key":"{key}","endpoint":"{target}","method":"{method}","client_ip":"{peer}"}}"#
                    );
                    let mut api_stream = TcpStream::connect(api).expect("daemon API");
                    write!(
                        api_stream,
                        "POST /v1/check HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .expect("write");
                    let mut answer = String::new();
                    api_stream.read_to_string(&mut answer).expect("read");
                    if !answer.starts_with("HTTP/1.1 200") {
                        let _ = out.write_all(
                            b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\n\r\n",
                        );
                        continue;
                    }
                    let json = &answer[answer.find("\r\n\r\n").expect("body") + 4..];
                    let remaining: f64 = serde_json::from_str::<serde_json::Value>(json)
                        .expect("json")["remaining"]
                        .as_f64()
                        .expect("remaining");
                    if remaining < 1.0 {
                        let id = enforcer_common::key_id(key.as_bytes());
                        let addr = enforcer::kernel::address_key(peer);
                        let deadline = Instant::now() + Duration::from_secs(20);
                        loop {
                            let budget: Option<enforcer_common::Budget> =
                                pinned(&pin, "BUDGETS", id);
                            let binding: Option<enforcer_common::Binding> =
                                pinned(&pin, "BINDINGS", addr);
                            if budget.is_some_and(|b| b.balance_milli < 1000)
                                && binding.is_some_and(|b| b.key_id == id)
                            {
                                break;
                            }
                            assert!(
                                Instant::now() < deadline,
                                "the daemon did not push the snapshot and the binding"
                            );
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {PAID_BODY}\r\n\r\n");
                    if out.write_all(head.as_bytes()).is_err()
                        || out.write_all(&vec![b'x'; PAID_BODY]).is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("upstream listening");
    seen
}

/// Reads one response from `conn`; its status and the bytes of its body.
fn response(conn: &TcpStream) -> std::io::Result<(u16, usize)> {
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = status(&line);
    let mut length = 0;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().expect("content-length");
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    Ok((status, length))
}

/// Starts the daemon in the server namespace for a tier of 3 tokens that never refill, where
/// every request costs at least 1 token (no free operational endpoint), with 127.0.0.1 as a
/// trusted proxy; its API on `api`. Waits until it answers.
fn metered_daemon(link: &Link, pin: &PinDir, dir: &std::path::Path, api: &str) -> Daemon {
    let config = dir.join("metered.toml");
    std::fs::write(
        &config,
        r#"
[server]
trusted_proxies = ["127.0.0.1/32"]
[budget]
default_tier = "metered"
[tiers.metered]
max_tokens = 10
refill_per_sec = 0
initial_tokens = 3
[pricing]
default_cost = 1
[[pricing.endpoints]]
method = "POST"
path = "/generate-report"
base_cost = 120
"#,
    )
    .expect("write config");
    let port = UPSTREAM_PORT.to_string();
    let daemon = Daemon(
        link.a
            .command(enforcer_bin().to_str().expect("path"))
            .args(["run", "--config", config.to_str().expect("path")])
            .args(["--listen", api])
            .args(["--iface", &link.a_if, "--protect-port", &port])
            .args(["--pin-dir", &pin.path()])
            .env("ENFORCER_REDIS_URL", "")
            .stderr(Stdio::null())
            .current_dir(dir)
            .spawn()
            .expect("start the daemon"),
    );
    let started = Instant::now();
    let api = api.to_owned();
    while link.a.run({
        let api = api.clone();
        move || TcpStream::connect(&api).is_err()
    }) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "daemon did not come up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    daemon
}

/// With every price at 1 token or more (no free operational endpoint), the request that leaves
/// a key below the cheapest price still gets its whole response: the client's ACKs of it come
/// from an address bound to a key that cannot pay, and pure ACKs are never rejected. The key's
/// next request is rejected in the kernel: at L7 on the same connection, at L4 (its SYN) on a
/// new one. Once another key shows up behind the address, it is never bound again.
#[test]
fn a_paid_response_is_never_cut_by_an_l4_rejection() {
    const PAID_API: &str = "127.0.0.1:18085";
    let link = Link::new("paid");
    let pin = PinDir::new();
    let seen = paying_upstream(&link.a, PAID_API, pin.path());
    let dir = tempfile::tempdir().expect("tempdir");
    let _daemon = metered_daemon(&link, &pin, dir.path(), PAID_API);
    let connect = || {
        link.b.run(|| {
            TcpStream::connect_timeout(
                &format!("{A_ADDR}:{UPSTREAM_PORT}").parse().expect("addr"),
                Duration::from_secs(1),
            )
        })
    };
    let ask = |conn: &mut TcpStream, key: &str| {
        let req = format!("GET /data HTTP/1.1\r\nhost: api\r\nx-api-key: {key}\r\n\r\n");
        conn.write_all(req.as_bytes()).expect("write");
    };

    // Three paid requests on one connection; the third leaves 0 tokens.
    let mut conn = connect().expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    for i in 1..=3 {
        ask(&mut conn, "paid-key");
        let answer = response(&conn);
        assert!(
            matches!(answer, Ok((200, PAID_BODY))),
            "request {i}: the whole paid response arrives: {answer:?}"
        );
    }

    // The key's next request is rejected in the kernel: at L7 on this connection...
    ask(&mut conn, "paid-key");
    conn.set_read_timeout(Some(Duration::from_millis(1500)))
        .expect("timeout");
    assert!(
        response(&conn).is_err(),
        "the drained key's next request is rejected"
    );
    // ...and at L4 on a new one: its address is bound to the drained key.
    assert!(
        connect().is_err(),
        "a new connection from the bound address is rejected"
    );
    assert_eq!(
        seen.lock().expect("lock").get("paid-key"),
        Some(&3),
        "only the three paid requests reached the upstream"
    );

    // Another key behind the same address (the gateway sees it): the address is never bound
    // again, and the other key's requests go through.
    let body = format!(
        r#"{{"key":"paid-other","endpoint":"/data","method":"GET","client_ip":"{}"}}"#,
        enforcer_tests::netns::B_ADDR
    );
    assert_eq!(
        status(&api_call(
            &link.a,
            PAID_API,
            "POST /v1/check HTTP/1.1",
            &body
        )),
        200
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut other = loop {
        if let Ok(c) = connect() {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "the address is unbound once another key shows up"
        );
    };
    other
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    ask(&mut other, "paid-other");
    let answer = response(&other);
    assert!(
        matches!(answer, Ok((200, PAID_BODY))),
        "another key behind the address passes: {answer:?}"
    );
    // The drained key is still rejected by its key header.
    ask(&mut other, "paid-key");
    other
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .expect("timeout");
    assert!(
        response(&other).is_err(),
        "L7 still rejects the drained key"
    );
}

/// An address is bound to a key only once several decisions of that key carried it: one
/// request of a key that drains it does not yet make the address the key's.
#[test]
fn an_address_is_bound_only_after_several_decisions_of_one_key() {
    const API_BIND: &str = "127.0.0.1:18086";
    let link = Link::new("bnd");
    let pin = PinDir::new();
    let _upstream = upstream(&link.a);
    let dir = tempfile::tempdir().expect("tempdir");
    let _daemon = metered_daemon(&link, &pin, dir.path(), API_BIND);
    let client = enforcer_tests::netns::B_ADDR;
    let check = |key: &str, client_ip: Option<&str>| {
        let ip = client_ip.map_or(String::new(), |ip| format!(r#","client_ip":"{ip}""#));
        let body = format!(r#"{{"key":"{key}","endpoint":"/data","method":"GET","units":3{ip}}}"#);
        status(&api_call(
            &link.a,
            API_BIND,
            "POST /v1/check HTTP/1.1",
            &body,
        ))
    };
    // The sync task handles events in order: once a later key's snapshot is in the kernel,
    // every earlier event was handled.
    let mut probes = 0;
    let mut settle = || {
        probes += 1;
        let probe = format!("bnd-probe-{probes}");
        assert_eq!(check(&probe, None), 200, "3 units drain the probe key");
        let id = enforcer_common::key_id(probe.as_bytes());
        let deadline = Instant::now() + Duration::from_secs(10);
        while pinned::<u64, enforcer_common::Budget>(&pin.path(), "BUDGETS", id).is_none() {
            assert!(Instant::now() < deadline, "the probe's snapshot arrives");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let connects = || {
        link.b.run(|| {
            TcpStream::connect_timeout(
                &format!("{A_ADDR}:{UPSTREAM_PORT}").parse().expect("addr"),
                Duration::from_secs(1),
            )
            .is_ok()
        })
    };

    assert_eq!(check("bnd-key", Some(client)), 200, "drains the key");
    settle();
    assert!(connects(), "seen once with the key: not bound");
    assert_eq!(check("bnd-key", Some(client)), 429);
    settle();
    assert!(connects(), "seen twice: not bound");
    assert_eq!(check("bnd-key", Some(client)), 429);
    settle();
    assert!(
        !connects(),
        "seen three times with one key (kernel.bind_after): bound, its connections rejected"
    );
}

/// `GET path` of the daemon's API, from the server namespace; the raw response.
fn get(server: &NetNs, path: &'static str) -> String {
    server.run(move || {
        let mut s = TcpStream::connect(API).expect("daemon API");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        )
        .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out
    })
}

/// Polls until `/readyz` and `enforcer_kernel_attached` both say `attached` (generous deadline:
/// the daemon looks at every heartbeat).
fn wait_attached(server: &NetNs, attached: bool) -> String {
    let start = Instant::now();
    loop {
        let ready = get(server, "/readyz");
        let metric = enforcer_tests::parse_metric(&metrics(server), "enforcer_kernel_attached");
        if ready.contains(&format!("\"attached\":{attached}"))
            && metric == if attached { 1.0 } else { 0.0 }
        {
            return ready;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "/readyz and the metric never said attached={attached}: {ready} (metric {metric})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `enforcer …` run in `ns`, as an operator on the node would; (exit code, stdout). A failing
/// command's stderr goes to the test's output, where a failed assertion shows it.
fn enforcer_in(ns: &NetNs, args: &[&str]) -> (i32, String) {
    let out = ns
        .command(enforcer_bin().to_str().expect("path"))
        .args(args)
        .output()
        .expect("run enforcer");
    if !out.status.success() {
        eprintln!(
            "enforcer {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `enforcer kernel detach` while the daemon runs switches the gate off at once, even when the
/// daemon holds the link (after a restart it took the pinned link over): the drained key's
/// request reaches the upstream, `/readyz` and `enforcer_kernel_attached` say so, a restarted
/// daemon does not attach again, and `enforcer kernel attach` turns it back on.
#[test]
fn detach_switches_the_gate_off_while_the_daemon_runs() {
    let link = Link::new("dtc");
    let pin = PinDir::new();
    let dir = pin.path();
    let seen = upstream(&link.a);
    // The example config without refill in the free tier: a drained key stays drained.
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("no-refill.toml");
    let example = include_str!("../../examples/enforcer.toml");
    let free = "[tiers.free]\nmax_tokens = 1000\nrefill_per_sec = 10\n";
    assert!(example.contains(free));
    std::fs::write(
        &config,
        example.replacen(
            free,
            "[tiers.free]\nmax_tokens = 1000\nrefill_per_sec = 0\n",
            1,
        ),
    )
    .expect("write");
    let config = config.to_str().expect("path");
    let key = "dtc-drained";

    let first = daemon_with(&link, &pin, config);
    let statuses: Vec<u16> = (0..7).map(|_| check(&link.a, key)).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 200, 429]);
    wait_until_drained(&pin, key);
    assert!(
        !call(&link.b, key),
        "the drained key is rejected in the kernel"
    );
    // A restart: the new daemon swaps its program into the pinned link and holds it.
    drop(first);
    let daemon = daemon_with(&link, &pin, config);
    wait_attached(&link.a, true);
    assert!(!call(&link.b, key), "still rejected after the restart");
    assert_eq!(seen.lock().expect("lock").get(key), None);

    let (code, out) = enforcer_in(&link.a, &["kernel", "detach", "--pin-dir", &dir]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("detached from {}", link.a_if)),
        "{out}"
    );
    assert!(
        call(&link.b, key),
        "once detached, the drained key's request reaches the upstream"
    );
    // At least this one. The gate drops (action "drop"): the rejected calls above were closed
    // by the client after its read timeout, but the client's kernel keeps retransmitting an
    // orphaned socket's unacknowledged request for a while, and once the gate is off such a
    // retransmission reaches the upstream too (seen on a slow CI run: 2). Exactly none got
    // through while attached is checked above.
    assert!(
        seen.lock().expect("lock").get(key).is_some_and(|n| *n >= 1),
        "{:?}",
        seen.lock().expect("lock").get(key)
    );
    let ready = wait_attached(&link.a, false);
    assert!(ready.contains("detached by an operator"), "{ready}");
    let (_, status) = enforcer_in(&link.a, &["kernel", "status", "--pin-dir", &dir]);
    assert!(status.contains("attached:    nowhere"), "{status}");
    assert!(
        status.contains("detached by an operator from every interface"),
        "{status}"
    );

    // A restarted daemon does not attach again behind the operator's back.
    drop(daemon);
    let daemon = daemon_with(&link, &pin, config);
    let ready = wait_attached(&link.a, false);
    assert!(ready.contains("detached by an operator"), "{ready}");
    assert!(call(&link.b, key), "still detached after a restart");

    // Until the operator attaches it again: the running daemon follows.
    let (code, out) = enforcer_in(&link.a, &["kernel", "attach", "--pin-dir", &dir]);
    assert_eq!(code, 0, "{out}");
    wait_attached(&link.a, true);
    // (This daemon's embedded store began afresh: drain the key in it.)
    let mut denied = false;
    for _ in 0..10 {
        if check(&link.a, key) == 429 {
            denied = true;
            break;
        }
    }
    assert!(denied, "the key is drained again");
    assert!(
        !call(&link.b, key),
        "attached again: the drained key is rejected"
    );
    let (_, status) = enforcer_in(&link.a, &["kernel", "status", "--pin-dir", &dir]);
    assert!(
        status.contains(&format!("attached:    {}", link.a_if)),
        "{status}"
    );
    drop(daemon);
}
