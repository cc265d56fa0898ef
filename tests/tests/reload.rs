//! Hot reload against real Redis: a reload under load changes `/v1/costs` and the charged cost
//! while no request fails and no connection drops; a broken file changes nothing and is
//! counted; a tier change applies to the next debit; the runtime shadow switch; SIGHUP on a
//! real `enforcer run --config F` process.
use bytes::Bytes;
use enforcer::reload::{ConfigSource, Overrides, ReloadError};
use enforcer_tests::{
    Process, TestDaemon, check, enforcer_bin, free_port, http, redis_url, unique,
};
use http_body_util::{BodyExt, Full};
use serde_json::json;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A config whose `POST /work` costs `cost`; `free` is the default tier (ample), `tight` can
/// pay for five requests of cost 2 and refills next to nothing.
fn config_text(cost: f64, default_tier: &str) -> String {
    format!(
        r#"
        [budget]
        default_tier = "{default_tier}"
        [tiers.free]
        max_tokens = 1000000
        refill_per_sec = 100000
        idle_cap = 1
        initial_tokens = 1000000
        [tiers.pro]
        max_tokens = 2000000
        refill_per_sec = 200000
        idle_cap = 1
        initial_tokens = 2000000
        [tiers.tight]
        max_tokens = 10
        refill_per_sec = 0.001
        idle_cap = 1
        initial_tokens = 10
        [pricing]
        default_cost = 1
        [[pricing.endpoints]]
        method = "POST"
        path = "/work"
        base_cost = {cost}
        "#
    )
}

fn write(path: &Path, text: &str) {
    // Written whole and renamed, as an operator's tooling (or a ConfigMap update) does: a
    // reload never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

/// A daemon started from `text` in a file of its own, on the test Redis.
async fn daemon_from(text: &str) -> (TestDaemon, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("enforcer.toml");
    write(&file, text);
    let daemon = TestDaemon::start_from(ConfigSource {
        path: Some(file.clone()),
        overrides: Overrides {
            redis_url: Some(redis_url()),
            ..Overrides::default()
        },
    })
    .await;
    (daemon, file, dir)
}

/// The price of `POST /work` that `/v1/costs` serves.
async fn price(addr: SocketAddr) -> f64 {
    let costs = http(addr, "GET", "/v1/costs", &[], String::new()).await;
    assert_eq!(costs.status, 200);
    costs
        .json()
        .as_array()
        .expect("a list")
        .iter()
        .find(|c| c["endpoint"] == "/work" && c["method"] == "POST")
        .and_then(|c| c["price"].as_f64())
        .expect("/work is priced")
}

async fn work(addr: SocketAddr, key: &str) -> serde_json::Value {
    let r = check(
        addr,
        json!({"key": key, "endpoint": "/work", "method": "POST"}),
    )
    .await;
    assert!(
        r.status == 200 || r.status == 429,
        "{} {:?}",
        r.status,
        r.body
    );
    let mut body = r.json();
    body["status"] = json!(r.status);
    body
}

/// A labelled metric's value in the daemon's `/metrics` (0 when absent).
async fn metric(addr: SocketAddr, series: &str) -> f64 {
    enforcer_tests::metric(addr, series).await
}

/// One keep-alive connection: every request of a client goes over it, so a reload that
/// dropped connections would fail a request.
struct Conn(hyper::client::conn::http1::SendRequest<Full<Bytes>>);

impl Conn {
    async fn open(addr: SocketAddr) -> Self {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect to daemon");
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("http handshake");
        tokio::spawn(conn);
        Self(sender)
    }

    /// A check of `POST /work` for `key`: the status and the body, or what went wrong.
    async fn work(&mut self, key: &str) -> Result<(u16, serde_json::Value), String> {
        self.0
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let body = json!({"key": key, "endpoint": "/work", "method": "POST"}).to_string();
        let req = hyper::Request::builder()
            .method("POST")
            .uri("/v1/check")
            .header("host", "enforcer")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = self
            .0
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        let json = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{status}: not JSON ({e}): {bytes:?}"))?;
        Ok((status, json))
    }
}

/// What one client saw.
#[derive(Debug, Default)]
struct Seen {
    requests: u64,
    costs: Vec<f64>,
    failures: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_changes_the_price_and_no_request_fails() {
    let (d, file, _dir) = daemon_from(&config_text(2.0, "free")).await;
    assert_eq!(price(d.addr).await, 2.0);
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..6)
        .map(|i| {
            let (stop, total, addr) = (stop.clone(), total.clone(), d.addr);
            let key = unique(&format!("reload-load-{i}"));
            tokio::spawn(async move {
                let mut conn = Conn::open(addr).await;
                let mut seen = Seen::default();
                while !stop.load(Ordering::SeqCst) {
                    seen.requests += 1;
                    total.fetch_add(1, Ordering::SeqCst);
                    match conn.work(&key).await {
                        Ok((status, body))
                            if (status == 200 || status == 429)
                                && body["allowed"].is_boolean()
                                && body["cost"].is_number() =>
                        {
                            seen.costs.push(body["cost"].as_f64().unwrap_or(f64::NAN));
                        }
                        Ok((status, body)) => seen.failures.push(format!("{status}: {body}")),
                        Err(e) => {
                            seen.failures.push(e);
                            // A dropped connection: the rest of this client's run says nothing.
                            break;
                        }
                    }
                }
                seen
            })
        })
        .collect();
    let wait_for = |n: u64| {
        let total = total.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while total.load(Ordering::SeqCst) < n {
                assert!(Instant::now() < deadline, "the clients made no progress");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(120).await;

    write(&file, &config_text(5.0, "free"));
    let report = d.reloader.reload().await.expect("the new file is valid");
    assert_eq!(report.changed, ["pricing"]);
    assert!(report.restart_required.is_empty(), "{report:?}");
    assert_eq!(report.generation, 2);
    assert_eq!(d.reloader.generation(), 2);
    assert_eq!(price(d.addr).await, 5.0, "/v1/costs follows at once");
    let after = total.load(Ordering::SeqCst);
    wait_for(after + 120).await;
    stop.store(true, Ordering::SeqCst);

    let mut requests = 0;
    for client in clients {
        let seen = client.await.expect("client task");
        assert!(seen.failures.is_empty(), "{:?}", seen.failures);
        requests += seen.requests;
        assert!(
            seen.costs.iter().all(|c| *c == 2.0 || *c == 5.0),
            "only the old or the new price: {:?}",
            seen.costs
        );
        assert_eq!(seen.costs.first(), Some(&2.0), "the old price before");
        assert_eq!(seen.costs.last(), Some(&5.0), "the new price after");
        // Once the new price is charged, the old one never comes back.
        let first_new = seen.costs.iter().position(|c| *c == 5.0).unwrap_or(0);
        assert!(seen.costs[first_new..].iter().all(|c| *c == 5.0));
    }
    // The charged cost: a fresh key pays the new price from its initial balance.
    let body = work(d.addr, &unique("reload-fresh")).await;
    assert_eq!(body["cost"], 5.0);
    assert_eq!(body["remaining"], 1_000_000.0 - 5.0);
    requests += 1;
    // Every decision has its ledger row (journal: written before the answer).
    let rows = std::fs::read_to_string(&d.ledger_file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["t"] == "decision")
        .count() as u64;
    assert_eq!(rows, requests, "no ledger row lost across the reload");
    assert_eq!(
        metric(d.addr, "enforcer_config_reload_total{result=\"ok\"}").await,
        1.0
    );
    assert_eq!(metric(d.addr, "enforcer_config_generation").await, 2.0);
    d.stop().await;
}

#[tokio::test]
async fn a_broken_file_changes_nothing_and_is_counted() {
    let (d, file, _dir) = daemon_from(&config_text(2.0, "free")).await;
    let key = unique("reload-broken");
    assert_eq!(work(d.addr, &key).await["cost"], 2.0);

    // Not TOML.
    write(&file, "[pricing\ndefault_cost = 3\n");
    let e = d.reloader.reload().await.expect_err("bad TOML");
    assert!(matches!(e, ReloadError::File { .. }), "{e:?}");
    assert!(e.to_string().contains("enforcer.toml"), "{e}");
    // TOML, but values that make no sense: every one is named, with its path.
    write(
        &file,
        &(config_text(5.0, "free").replace("max_tokens = 10\n", "max_tokens = -1\n")
            + "[kernel]\naction = \"explode\"\n"),
    );
    let e = d.reloader.reload().await.expect_err("invalid values");
    let text = e.to_string();
    assert!(text.contains("tiers.tight.max_tokens"), "{text}");
    assert!(text.contains("kernel.action"), "{text}");
    // A file that is gone.
    std::fs::remove_file(&file).expect("remove");
    let e = d.reloader.reload().await.expect_err("no file");
    assert!(e.to_string().contains("cannot read"), "{e}");

    assert_eq!(d.reloader.generation(), 1, "nothing applied");
    assert_eq!(d.reloader.current().pricing.endpoints[0].base_cost, 2.0);
    assert_eq!(price(d.addr).await, 2.0);
    assert_eq!(
        work(d.addr, &key).await["cost"],
        2.0,
        "still charged the old price"
    );
    assert_eq!(
        metric(d.addr, "enforcer_config_reload_total{result=\"error\"}").await,
        3.0
    );
    assert_eq!(
        metric(d.addr, "enforcer_config_reload_total{result=\"ok\"}").await,
        0.0
    );
    assert_eq!(metric(d.addr, "enforcer_config_generation").await, 1.0);

    // Fixed: it applies, and what needs a restart is named, not applied.
    write(
        &file,
        &(config_text(3.0, "free")
            + "[server]\nmax_connections = 7\n[ledger]\nflush_ms = 9\nfsync = false\n"),
    );
    let report = d.reloader.reload().await.expect("valid again");
    assert_eq!(report.changed, ["pricing", "ledger.flush_ms"]);
    assert_eq!(
        report.restart_required,
        ["server.max_connections", "ledger.fsync"]
    );
    let now = d.reloader.current();
    assert_ne!(now.server.max_connections, 7);
    assert!(now.ledger.fsync, "the running value stays");
    assert_eq!(now.ledger.flush_ms, 9);
    assert_eq!(work(d.addr, &key).await["cost"], 3.0);
    d.stop().await;
}

#[tokio::test]
async fn a_tier_change_takes_effect_for_the_next_debit() {
    let (d, file, _dir) = daemon_from(&config_text(2.0, "free")).await;
    let key = unique("reload-tier");
    let before = work(d.addr, &key).await;
    assert_eq!(before["tier"], "free");
    assert_eq!(before["remaining"], 1_000_000.0 - 2.0);

    // Unassigned keys get another tier: the next debit of the same key is charged under it.
    write(&file, &config_text(2.0, "pro"));
    let report = d.reloader.reload().await.expect("valid");
    assert_eq!(report.changed, ["budget.default_tier"]);
    let after = work(d.addr, &key).await;
    assert_eq!(after["tier"], "pro");
    assert_eq!(after["status"], 200);

    // A tier's own parameters: `tight` as the default drains in five requests of 2; raising
    // its refill lets the next debit through.
    write(&file, &config_text(2.0, "tight"));
    d.reloader.reload().await.expect("valid");
    let key = unique("reload-tight");
    for _ in 0..5 {
        assert_eq!(work(d.addr, &key).await["status"], 200);
    }
    let denied = work(d.addr, &key).await;
    assert_eq!(denied["status"], 429);
    assert_eq!(denied["tier"], "tight");
    write(
        &file,
        &config_text(2.0, "tight").replace("refill_per_sec = 0.001", "refill_per_sec = 10000"),
    );
    let report = d.reloader.reload().await.expect("valid");
    assert_eq!(report.changed, ["tiers.tight"]);
    let allowed = work(d.addr, &key).await;
    assert_eq!(allowed["status"], 200, "{allowed}");
    d.stop().await;
}

#[tokio::test]
async fn the_shadow_switch_turns_denials_into_shadow_and_back() {
    // Started without a file (Server::bind): shadow switches work, a reload says why not.
    let mut config = enforcer::config::Config::parse(&config_text(2.0, "tight")).expect("valid");
    config.store.redis_url = redis_url();
    let d = TestDaemon::start(config).await;
    let e = d.reloader.reload().await.expect_err("no file");
    assert!(matches!(e, ReloadError::NoFile));
    assert!(e.to_string().contains("without a config file"), "{e}");

    let key = unique("reload-shadow");
    for _ in 0..5 {
        assert_eq!(work(d.addr, &key).await["status"], 200);
    }
    let denied = work(d.addr, &key).await;
    assert_eq!(
        (denied["status"].clone(), denied["mode"].clone()),
        (json!(429), json!("enforce"))
    );

    let report = d.reloader.set_shadow(None, true).await.expect("switch");
    assert_eq!(report.changed, ["budget.shadow"]);
    assert_eq!(report.generation, 2);
    let shadow = work(d.addr, &key).await;
    assert_eq!(shadow["status"], 200);
    assert_eq!(shadow["allowed"], true);
    assert_eq!(shadow["mode"], "shadow");
    assert_eq!(shadow["reason"], "exhausted", "what would have been denied");
    assert!(d.reloader.current().budget.shadow);

    d.reloader.set_shadow(None, false).await.expect("switch");
    assert_eq!(work(d.addr, &key).await["status"], 429);

    // One tier's.
    let report = d
        .reloader
        .set_shadow(Some("tight"), true)
        .await
        .expect("switch");
    assert_eq!(report.changed, ["tiers.tight.shadow"]);
    assert_eq!(work(d.addr, &key).await["mode"], "shadow");
    let e = d
        .reloader
        .set_shadow(Some("nope"), false)
        .await
        .expect_err("no such tier");
    assert!(
        e.to_string().contains("nope") && e.to_string().contains("tight"),
        "{e}"
    );
    assert_eq!(
        d.reloader.generation(),
        4,
        "the unknown tier changed nothing"
    );
    assert_eq!(work(d.addr, &key).await["mode"], "shadow");
    d.reloader
        .set_shadow(Some("tight"), false)
        .await
        .expect("switch");
    assert_eq!(work(d.addr, &key).await["status"], 429);
    // Counted: 4 switches, 2 errors (the reload without a file, the unknown tier).
    assert_eq!(
        metric(d.addr, "enforcer_config_reload_total{result=\"ok\"}").await,
        4.0
    );
    assert_eq!(
        metric(d.addr, "enforcer_config_reload_total{result=\"error\"}").await,
        2.0
    );
    d.stop().await;
}

/// `enforcer run --config F` as a process of its own.
struct Daemon {
    addr: SocketAddr,
    child: Process,
    dir: tempfile::TempDir,
}

impl Daemon {
    async fn start(text: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        write(&dir.path().join("enforcer.toml"), text);
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let log = std::fs::File::create(dir.path().join("daemon.log")).expect("log");
        let child = Command::new(enforcer_bin())
            .arg("run")
            .arg("--config")
            .arg(dir.path().join("enforcer.toml"))
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--grpc-listen")
            .arg("")
            .arg("--redis-url")
            .arg(redis_url())
            .arg("--ledger-file")
            .arg(dir.path().join("ledger.jsonl"))
            .env_remove("ENFORCER_REDIS_URL")
            .env_remove("ENFORCER_DATABASE_URL")
            .env_remove("ENFORCER_LEDGER_FILE")
            .env_remove("ENFORCER_GRPC_LISTEN")
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
        let deadline = Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if let Ok(Some(status)) = d.child.0.try_wait() {
                panic!("the daemon exited with {status}: {}", d.log());
            }
            assert!(Instant::now() < deadline, "not listening: {}", d.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("enforcer.toml")
    }

    fn hangup(&self) {
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(self.child.0.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits until the reload counter of `result` reaches `n`.
    async fn reloads(&self, result: &str, n: f64) {
        let series = format!("enforcer_config_reload_total{{result=\"{result}\"}}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while metric(self.addr, &series).await < n {
            assert!(
                Instant::now() < deadline,
                "no reload counted: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn sighup_reloads_a_running_daemon() {
    let mut d = Daemon::start(&config_text(2.0, "free")).await;
    assert_eq!(price(d.addr).await, 2.0);
    let key = unique("reload-hup");
    assert_eq!(work(d.addr, &key).await["cost"], 2.0);

    // A broken file first: counted, logged, and the daemon serves on unchanged.
    write(&d.file(), "[pricing]\ndefault_cost = \"lots\"\n");
    d.hangup();
    d.reloads("error", 1.0).await;
    assert!(d.log().contains("config not applied"), "{}", d.log());
    assert_eq!(price(d.addr).await, 2.0);
    assert!(matches!(d.child.0.try_wait(), Ok(None)), "still running");

    // Then a good one, which keeps the command line's overrides (listen, Redis, ledger).
    write(&d.file(), &config_text(7.0, "free"));
    d.hangup();
    d.reloads("ok", 1.0).await;
    assert_eq!(price(d.addr).await, 7.0);
    assert_eq!(work(d.addr, &key).await["cost"], 7.0);
    assert_eq!(metric(d.addr, "enforcer_config_generation").await, 2.0);
    assert!(matches!(d.child.0.try_wait(), Ok(None)), "still running");
}

/// The `/v1/costs` line of `method path`.
async fn cost_line(addr: SocketAddr, method: &str, path: &str) -> serde_json::Value {
    let costs = http(addr, "GET", "/v1/costs", &[], String::new()).await;
    costs
        .json()
        .as_array()
        .expect("a list")
        .iter()
        .find(|c| c["endpoint"] == path && c["method"] == method)
        .cloned()
        .unwrap_or_else(|| panic!("{method} {path} is not priced"))
}

#[tokio::test]
async fn the_engines_multipliers_survive_a_reload_and_a_new_endpoint_starts_at_one() {
    // The engine on, its next round an hour away: what a reload does to the multipliers is
    // all that moves them here.
    let dynamic = |cost: f64, on: bool, extra: &str| {
        config_text(cost, "free").replace(
            "default_cost = 1\n",
            &format!("default_cost = 1\ndynamic = {on}\ninterval_ms = 3600000\n{extra}"),
        )
    };
    let (d, file, _dir) = daemon_from(&dynamic(2.0, true, "")).await;
    let before = cost_line(d.addr, "POST", "/work").await;
    let m = before["multiplier"].as_f64().expect("multiplier");
    assert_ne!(
        m, 1.0,
        "the first round moved it (node telemetry): {before}"
    );
    assert_eq!(before["source"], "node");

    let new_endpoint = "[[pricing.endpoints]]\nmethod = \"GET\"\npath = \"/new\"\nbase_cost = 3\n";
    write(&file, &(dynamic(5.0, true, "") + new_endpoint));
    let report = d.reloader.reload().await.expect("valid");
    assert_eq!(report.changed, ["pricing"]);
    let after = cost_line(d.addr, "POST", "/work").await;
    assert_eq!(
        after["multiplier"], m,
        "an endpoint that stays keeps its multiplier"
    );
    // (Compared within a rounding error: serde_json's float parsing may be one ULP off.)
    let near = |v: &serde_json::Value, want: f64| (v.as_f64().expect("number") - want).abs() < 1e-9;
    assert!(near(&after["price"], 5.0 * m), "{after}");
    assert_eq!(cost_line(d.addr, "GET", "/new").await["multiplier"], 1.0);
    let charged = work(d.addr, &unique("reload-engine")).await;
    assert!(
        near(&charged["cost"], 5.0 * m),
        "charged what /v1/costs says: {charged}"
    );

    // The engine off: static prices.
    write(&file, &dynamic(5.0, false, ""));
    d.reloader.reload().await.expect("valid");
    let off = cost_line(d.addr, "POST", "/work").await;
    assert_eq!(
        (off["multiplier"].clone(), off["source"].clone()),
        (json!(1.0), json!("static"))
    );
    assert_eq!(work(d.addr, &unique("reload-static")).await["cost"], 5.0);
    // And on again: a first round runs at once.
    write(&file, &dynamic(5.0, true, ""));
    d.reloader.reload().await.expect("valid");
    assert_eq!(cost_line(d.addr, "POST", "/work").await["source"], "node");
    d.stop().await;
}
