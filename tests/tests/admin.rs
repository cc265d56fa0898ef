//! The admin API and the CLI that talks to it, against running daemons on the embedded store
//! and on a real Redis: the socket's privacy, every key command, grants that are spent and
//! audited, and the errors an operator gets.
use enforcer::key::ApiKey;
use enforcer::server::Server;
use enforcer_tests::{TestDaemon, check, enforcer_cli, example_config, redis_url, unique};
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

/// `enforcer ARGS --socket <daemon's>` with `key` on stdin; (exit code, stdout, stderr).
fn admin(daemon: &TestDaemon, args: &[&str], key: Option<&str>) -> (i32, String, String) {
    let socket = daemon
        .admin_socket
        .as_ref()
        .expect("the daemon serves an admin socket")
        .display()
        .to_string();
    let mut all = args.to_vec();
    all.extend(["--socket", &socket]);
    let stdin = key.map(|k| format!("{k}\n"));
    tokio::task::block_in_place(|| enforcer_cli(&all, stdin.as_deref()))
}

async fn report(daemon: &TestDaemon, key: &str) -> (u16, Value) {
    let r = check(
        daemon.addr,
        json!({"key": key, "endpoint": "/generate-report", "method": "POST"}),
    )
    .await;
    (r.status, r.json())
}

/// The ledger file's rows of one kind, once there are `want` (the writer flushes in the
/// background).
async fn rows_of_kind(daemon: &TestDaemon, kind: &str, want: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows: Vec<Value> = std::fs::read_to_string(&daemon.ledger_file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r["kind"] == kind)
            .collect();
        if rows.len() >= want || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_command_works_on_the_embedded_store_and_on_redis() {
    for url in [String::new(), redis_url()] {
        let store = if url.is_empty() { "memory" } else { "redis" };
        let daemon = TestDaemon::start(example_config(&url)).await;
        let key = unique("admin-key");
        let hash = ApiKey::parse(&key).expect("key").hash().to_hex();

        let (code, out, err) = admin(&daemon, &["status"], None);
        assert_eq!(code, 0, "{store}: {err}");
        assert!(
            out.contains(&format!("store:       {store} (reachable)")),
            "{store}: {out}"
        );
        assert!(out.contains("ledger:"), "{out}");

        // A tier of the config the daemon serves (no --config, no Redis URL on the CLI).
        let (code, out, err) = admin(&daemon, &["keys", "set-tier", "pro"], Some(&key));
        assert_eq!(code, 0, "{store}: {out}{err}");
        assert!(
            out.contains(&format!("key {hash} is now in tier pro")),
            "{out}"
        );
        let (status, body) = report(&daemon, &key).await;
        assert_eq!(
            (status, body["tier"].as_str()),
            (200, Some("pro")),
            "{store}"
        );
        // A tier it does not have: refused, with the ones it has.
        let (code, _, err) = admin(&daemon, &["keys", "set-tier", "gold"], Some(&key));
        assert_eq!(code, 1, "{store}");
        assert!(
            err.contains("unknown tier \"gold\"") && err.contains("free, prepaid, pro"),
            "{store}: {err}"
        );

        // A new prepaid key, empty: denied until a grant tops it up; then spent. (A tier change
        // keeps a bucket's balance: the key above keeps what it had under pro.)
        let key = unique("admin-prepaid");
        let hash = ApiKey::parse(&key).expect("key").hash().to_hex();
        assert_eq!(
            admin(&daemon, &["keys", "set-tier", "prepaid"], Some(&key)).0,
            0
        );
        assert_eq!(report(&daemon, &key).await.0, 429, "{store}: no credit");
        let (code, out, err) = admin(
            &daemon,
            &[
                "keys",
                "grant",
                "300",
                "--note",
                "invoice 7 paid",
                "--grant-id",
                "g-7",
            ],
            Some(&key),
        );
        assert_eq!(code, 0, "{store}: {out}{err}");
        assert!(out.contains("balance now 300.000"), "{store}: {out}");
        let (status, body) = report(&daemon, &key).await;
        assert_eq!(status, 200, "{store}: {body}");
        assert_eq!(body["remaining"], 180.0, "{store}");
        // The same grant id again: a replay, nothing added.
        let (code, out, _) = admin(
            &daemon,
            &[
                "keys",
                "grant",
                "300",
                "--note",
                "invoice 7 paid",
                "--grant-id",
                "g-7",
            ],
            Some(&key),
        );
        assert_eq!(code, 0);
        assert!(out.contains("applied before"), "{store}: {out}");

        // `keys show` by hash (an operator who only has the ledger's hash).
        let (code, out, err) = admin(&daemon, &["keys", "show", "--key-hash", &hash], None);
        assert_eq!(code, 0, "{store}: {err}");
        assert!(out.contains("tier:        prepaid (assigned)"), "{out}");
        assert!(out.contains("balance:     180.000"), "{store}: {out}");
        assert!(out.contains("operational: 10.000"), "{out}");
        assert!(
            out.contains("kernel:      not running on this daemon"),
            "{out}"
        );
        let (code, json_out, _) = admin(&daemon, &["keys", "show", "--json"], Some(&key));
        assert_eq!(code, 0);
        let shown: Value = serde_json::from_str(&json_out).expect("json");
        assert_eq!(shown["balance"], 180.0, "{store}");
        assert_eq!(shown["key_hash"], hash.as_str());

        // Bad grants: refused with the reason, nothing granted.
        for (args, says) in [
            (&["keys", "grant", "0", "--note", "x"][..], "tokens must be"),
            (&["keys", "grant", "10", "--note", "  "], "note must be"),
            (
                &["keys", "grant", "10", "--note", "a\u{1}b"],
                "note must be",
            ),
            (&["keys", "grant", "1e300", "--note", "x"], "tokens must be"),
            (&["keys", "grant", "4900", "--note", "x"], "grant_ceiling"),
        ] {
            let (code, _, err) = admin(&daemon, args, Some(&key));
            assert_eq!(code, 1, "{store}: {args:?}");
            assert!(err.contains(says), "{store}: {args:?}: {err}");
        }
        let (_, json_out, _) = admin(&daemon, &["keys", "show", "--json"], Some(&key));
        let shown: Value = serde_json::from_str(&json_out).expect("json");
        assert_eq!(
            shown["balance"], 180.0,
            "{store}: refused grants changed nothing"
        );

        // Back to the default tier.
        let (code, out, _) = admin(&daemon, &["keys", "set-tier", "--clear"], Some(&key));
        assert_eq!(code, 0);
        assert!(out.contains("has no tier assignment"), "{out}");
        let (_, out, _) = admin(&daemon, &["keys", "show"], Some(&key));
        assert!(
            out.contains("tier:        free (default for keys without an assignment)"),
            "{store}: {out}"
        );

        // The grant is an audit row: tokens, balance after, note, the operator's uid.
        let grants = rows_of_kind(&daemon, "grant", 1).await;
        assert_eq!(
            grants.len(),
            1,
            "{store}: one grant row (the replay adds none)"
        );
        let g = &grants[0];
        assert_eq!(g["cost"], 300.0);
        assert_eq!(g["remaining"], 300.0);
        assert_eq!(g["note"], "invoice 7 paid");
        assert_eq!(g["request_id"], "g-7");
        let uid = rustix::process::geteuid().as_raw();
        assert_eq!(g["operator"], format!("uid:{uid}"));
        assert_eq!(g["key_hash"], hash.as_str());
        // The raw key went to the daemon over the socket, and nowhere from there.
        let ledger = std::fs::read_to_string(&daemon.ledger_file).expect("ledger");
        assert!(
            !ledger.contains(&key),
            "{store}: the raw key is in the ledger"
        );

        // Every action is counted, refused ones too.
        let metrics = enforcer_tests::http(daemon.addr, "GET", "/metrics", &[], String::new())
            .await
            .body;
        let text = String::from_utf8_lossy(&metrics);
        for (series, at_least) in [
            (
                r#"enforcer_admin_actions_total{action="grant",result="ok"}"#,
                2.0,
            ),
            (
                r#"enforcer_admin_actions_total{action="grant",result="refused"}"#,
                5.0,
            ),
            (
                r#"enforcer_admin_actions_total{action="set_tier",result="ok"}"#,
                3.0,
            ),
            (
                r#"enforcer_admin_actions_total{action="set_tier",result="refused"}"#,
                1.0,
            ),
        ] {
            let n = enforcer_tests::parse_metric(&text, series);
            assert!(n >= at_least, "{store}: {series} = {n}");
        }
        daemon.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_private_and_nothing_administrative_is_on_tcp() {
    let dir = tempfile::tempdir().expect("tmp");
    let sockdir = dir.path().join("run");
    std::fs::create_dir(&sockdir).expect("mkdir");
    // A directory others may enter is made 0700 (the daemon owns it).
    std::fs::set_permissions(&sockdir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let socket = sockdir.join("admin.sock");
    let mut config = example_config("");
    config.server.admin_socket = socket.display().to_string();
    let daemon = TestDaemon::start(config.clone()).await;
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(mode(&sockdir), 0o700);
    for (method, path) in [
        ("GET", "/v1/status"),
        ("POST", "/v1/keys/grant"),
        ("POST", "/v1/keys/tier"),
        ("POST", "/v1/reload"),
    ] {
        let r = enforcer_tests::http(daemon.addr, method, path, &[], "{}").await;
        assert_eq!(r.status, 404, "{method} {path} must not exist on TCP");
    }
    // A second daemon on the same socket: refused, the first keeps it.
    let mut second = config.clone();
    second.server.listen = "127.0.0.1:0".parse().expect("addr");
    second.server.grpc_listen = String::new();
    let err = Server::bind(&second).await.expect_err("socket in use");
    assert!(err.to_string().contains("another daemon"), "{err}");
    assert!(socket.exists());
    let (code, _, err) = admin(&daemon, &["status"], None);
    assert_eq!(code, 0, "{err}");
    daemon.stop().await;
    assert!(!socket.exists(), "removed at shutdown");

    // A stale socket (a daemon killed with SIGKILL leaves one) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    assert!(socket.exists());
    let daemon = TestDaemon::start(config.clone()).await;
    assert_eq!(admin(&daemon, &["status"], None).0, 0);
    daemon.stop().await;

    // A path that is not a socket is never removed.
    std::fs::write(&socket, "precious").expect("write");
    let err = Server::bind(&second).await.expect_err("not a socket");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&socket).expect("kept"), "precious");

    // No daemon: the CLI says where it looked.
    std::fs::remove_file(&socket).expect("rm");
    let (code, _, err) = enforcer_cli(
        &["status", "--socket", socket.to_str().expect("path")],
        None,
    );
    assert_eq!(code, 1);
    assert!(err.contains("no daemon answers on"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_store_down_status_says_so_and_a_grant_says_how_to_retry() {
    let mut redis = enforcer_tests::PrivateRedis::start();
    let mut config = example_config(&redis.url());
    config.store.timeout_ms = 200;
    let daemon = TestDaemon::start(config).await;
    let key = unique("down-key");
    assert_eq!(
        admin(&daemon, &["keys", "set-tier", "prepaid"], Some(&key)).0,
        0
    );
    redis.stop();
    let (code, out, _) = admin(&daemon, &["status"], None);
    assert_eq!(code, 0);
    assert!(out.contains("store:       redis (UNREACHABLE"), "{out}");
    let (code, _, err) = admin(
        &daemon,
        &[
            "keys",
            "grant",
            "10",
            "--note",
            "x",
            "--grant-id",
            "retry-me",
        ],
        Some(&key),
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("retry with grant id retry-me"),
        "the operator learns how to retry safely: {err}"
    );
    redis.restart();
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_usage_shows_grants_beside_charges() {
    let url = enforcer_tests::pg::fresh_database().await;
    let mut config = example_config("");
    config.ledger.database_url = url.clone();
    config.ledger.migrate = true;
    let daemon = TestDaemon::start(config).await;
    let key = unique("usage-grant");
    let hash = ApiKey::parse(&key).expect("key").hash().to_hex();
    assert_eq!(
        admin(&daemon, &["keys", "set-tier", "prepaid"], Some(&key)).0,
        0
    );
    let (code, out, err) = admin(
        &daemon,
        &["keys", "grant", "250", "--note", "welcome credit"],
        Some(&key),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(report(&daemon, &key).await.0, 200);
    daemon.stop().await;
    let (code, out, err) = tokio::task::block_in_place(|| {
        enforcer_cli(
            &[
                "audit",
                "usage",
                "--key-hash",
                &hash,
                "--database-url",
                &url,
            ],
            None,
        )
    });
    assert_eq!(code, 0, "{err}");
    let total = out.lines().last().expect("a line");
    let fields: Vec<&str> = total.split_whitespace().collect();
    // total, decisions, allowed, refunds, tokens charged, tokens granted, tokens settled,
    // paid by grants, grants expired, reservations, unsettled
    assert_eq!(
        fields,
        [
            "total", "1", "1", "0", "120.000", "250.000", "120.000", "0.000", "0.000", "0", "0"
        ],
        "{out}"
    );
    // By endpoint, the grant has a line of its own.
    let (_, out, _) = tokio::task::block_in_place(|| {
        enforcer_cli(
            &[
                "audit",
                "usage",
                "--by",
                "endpoint",
                "--key-hash",
                &hash,
                "--database-url",
                &url,
            ],
            None,
        )
    });
    assert!(out.contains("(grants)"), "{out}");
    let sql = sqlx::PgPool::connect(&url).await.expect("pg");
    let (note, operator): (String, String) = sqlx::query_as(
        "SELECT note, operator FROM token_transactions WHERE kind = 'grant' AND key_hash = $1",
    )
    .bind(&hash)
    .fetch_one(&sql)
    .await
    .expect("grant row");
    assert_eq!(note, "welcome credit");
    assert!(operator.starts_with("uid:"), "{operator}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_grant_from_the_cli_is_spent_first_shown_and_audited() {
    let url = enforcer_tests::pg::fresh_database().await;
    let mut config = example_config("");
    config.ledger.database_url = url.clone();
    config.ledger.migrate = true;
    let daemon = TestDaemon::start(config).await;
    let key = unique("wallet-cli");
    let hash = ApiKey::parse(&key).expect("key").hash().to_hex();
    assert_eq!(
        admin(&daemon, &["keys", "set-tier", "prepaid"], Some(&key)).0,
        0
    );
    let (code, out, err) = admin(
        &daemon,
        &[
            "keys",
            "grant",
            "100",
            "--note",
            "promo",
            "--expires",
            "30d",
            "--priority",
            "2",
            "--grant-id",
            "promo-dec",
        ],
        Some(&key),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("held in the key's wallet, spent before its bucket: priority 2"),
        "{out}"
    );
    let (code, out, err) = admin(
        &daemon,
        &["keys", "grant", "250", "--note", "top-up"],
        Some(&key),
    );
    assert_eq!(code, 0, "{out}{err}");
    // A bad expiry is refused by clap or the daemon, nothing granted.
    let (code, _, err) = admin(
        &daemon,
        &["keys", "grant", "5", "--note", "x", "--expires", "0s"],
        Some(&key),
    );
    assert_ne!(code, 0, "{err}");
    let (_, out, _) = admin(&daemon, &["keys", "show"], Some(&key));
    assert!(
        out.contains("grant:       100.000 left of promo-dec, priority 2"),
        "{out}"
    );
    assert!(out.contains("balance:     250.000"), "{out}");
    // 120: the grant's 100 first, then 20 of the bucket.
    let (status, body) = report(&daemon, &key).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["remaining"], 230.0, "{body}");
    let (_, out, _) = admin(&daemon, &["keys", "show"], Some(&key));
    assert!(!out.contains("grant: "), "the emptied grant is gone: {out}");
    daemon.stop().await;

    let sql = sqlx::PgPool::connect(&url).await.expect("pg");
    let spends: Vec<(f64, String, String)> = sqlx::query_as(
        "SELECT cost, note, endpoint FROM token_transactions \
         WHERE kind = 'grant_spend' AND key_hash = $1",
    )
    .bind(&hash)
    .fetch_all(&sql)
    .await
    .expect("spend rows");
    assert_eq!(
        spends,
        [(100.0, "promo-dec".to_owned(), "/generate-report".to_owned())]
    );
    let (note,): (String,) = sqlx::query_as(
        "SELECT note FROM token_transactions WHERE kind = 'grant' AND request_id = 'promo-dec'",
    )
    .fetch_one(&sql)
    .await
    .expect("grant row");
    assert!(note.starts_with("promo [expires 20"), "{note}");
    assert!(note.ends_with(", priority 2]"), "{note}");
    let (code, out, err) = tokio::task::block_in_place(|| {
        enforcer_cli(
            &[
                "audit",
                "usage",
                "--key-hash",
                &hash,
                "--database-url",
                &url,
            ],
            None,
        )
    });
    assert_eq!(code, 0, "{err}");
    let fields: Vec<&str> = out
        .lines()
        .last()
        .expect("a line")
        .split_whitespace()
        .collect();
    assert_eq!(
        fields,
        [
            "total", "1", "1", "0", "120.000", "350.000", "120.000", "100.000", "0.000", "0", "0"
        ],
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reloads_the_file_and_switches_shadow_mode() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("enforcer.toml");
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/enforcer.toml"),
    )
    .expect("example config");
    assert!(example.contains("base_cost = 120"), "the report's price");
    std::fs::write(&file, &example).expect("write");
    let daemon = TestDaemon::start_from(enforcer::reload::ConfigSource {
        path: Some(file.clone()),
        overrides: enforcer::reload::Overrides::default(),
    })
    .await;
    let key = unique("reload-cli");
    assert_eq!(report(&daemon, &key).await.1["cost"], 120.0);

    let (code, out, err) = admin(&daemon, &["reload"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("changed:  nothing"), "{out}");

    std::fs::write(&file, example.replace("base_cost = 120", "base_cost = 60")).expect("write");
    let (code, out, err) = admin(&daemon, &["reload"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("config generation 2"), "{out}");
    assert!(out.contains("changed:  pricing"), "{out}");
    assert_eq!(report(&daemon, &key).await.1["cost"], 60.0);

    // A broken file: refused with the field, nothing changes.
    std::fs::write(
        &file,
        example.replace("max_tokens = 1000", "max_tokens = -1"),
    )
    .expect("write");
    let (code, _, err) = admin(&daemon, &["reload"], None);
    assert_eq!(code, 1);
    assert!(
        err.contains("old one keeps serving") && err.contains("tiers.free.max_tokens"),
        "{err}"
    );
    assert_eq!(report(&daemon, &key).await.1["cost"], 60.0);
    std::fs::write(&file, example.replace("base_cost = 120", "base_cost = 60")).expect("write");

    // Shadow mode of one tier: a prepaid key without credit is let through, and recorded.
    let poor = unique("shadow-cli");
    assert_eq!(
        admin(&daemon, &["keys", "set-tier", "prepaid"], Some(&poor)).0,
        0
    );
    assert_eq!(report(&daemon, &poor).await.0, 429);
    let (code, out, err) = admin(&daemon, &["shadow", "on", "--tier", "prepaid"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("shadow mode of tier prepaid is on"), "{out}");
    let (status, body) = report(&daemon, &poor).await;
    assert_eq!(
        (status, body["mode"].as_str()),
        (200, Some("shadow")),
        "{body}"
    );
    let (_, out, _) = admin(&daemon, &["status"], None);
    assert!(out.contains("config:      generation 3"), "{out}");
    assert_eq!(
        admin(&daemon, &["shadow", "off", "--tier", "prepaid"], None).0,
        0
    );
    assert_eq!(report(&daemon, &poor).await.0, 429);
    let (code, _, err) = admin(&daemon, &["shadow", "on", "--tier", "gold"], None);
    assert_eq!(code, 1);
    assert!(err.contains("gold"), "{err}");

    let metrics = enforcer_tests::http(daemon.addr, "GET", "/metrics", &[], String::new())
        .await
        .body;
    let text = String::from_utf8_lossy(&metrics);
    for (series, want) in [
        (
            r#"enforcer_admin_actions_total{action="reload",result="ok"}"#,
            2.0,
        ),
        (
            r#"enforcer_admin_actions_total{action="reload",result="refused"}"#,
            1.0,
        ),
        (
            r#"enforcer_admin_actions_total{action="shadow",result="ok"}"#,
            2.0,
        ),
        (
            r#"enforcer_admin_actions_total{action="shadow",result="refused"}"#,
            1.0,
        ),
    ] {
        assert_eq!(
            enforcer_tests::parse_metric(&text, series),
            want,
            "{series}"
        );
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_a_shared_budget_spend_one_balance_through_the_daemon() {
    for url in [String::new(), redis_url()] {
        let (a, b, outsider) = (unique("org-a"), unique("org-b"), unique("solo"));
        let hash = |k: &str| ApiKey::parse(k).expect("key").hash().to_hex();
        let mut config = example_config(&url);
        config.shared_budgets.insert(
            unique("acme"),
            enforcer::config::SharedBudgetConfig {
                tier: "pro".into(),
                keys: vec![hash(&a), hash(&b)],
                key_limit: Some(enforcer::config::KeyLimitConfig {
                    max_tokens: 250.0,
                    refill_per_sec: 0.001,
                }),
            },
        );
        let daemon = TestDaemon::start(config).await;
        // pro starts at 8000 (idle_cap 0.8 × 10000) and refills 100/s; the report costs 120.
        let started = Instant::now();
        let (status, first) = report(&daemon, &a).await;
        assert_eq!(status, 200, "{first}");
        let (_, second) = report(&daemon, &b).await;
        // What refill can have added between the two (a busy machine takes its time).
        let refill = 100.0 * started.elapsed().as_secs_f64();
        let spent = first["remaining"].as_f64().expect("remaining")
            - second["remaining"].as_f64().expect("remaining");
        assert!(
            refill < 60.0 && (120.0 - refill - 0.01..=120.0).contains(&spent),
            "{url}: b's check sees a's spending (refill up to {refill}): {first} {second}"
        );
        // Another key is on its own.
        let (_, solo) = report(&daemon, &outsider).await;
        assert!(
            solo["remaining"].as_f64() < Some(1000.0),
            "{url}: free: {solo}"
        );
        // a's own limit (250) allows a second report, not a third.
        assert_eq!(report(&daemon, &a).await.0, 200, "{url}");
        let (status, third) = report(&daemon, &a).await;
        assert_eq!(status, 429, "{url}: {third}");
        assert_eq!(third["reason"], "key_limit", "{url}: {third}");
        // b still may.
        assert_eq!(report(&daemon, &b).await.0, 200, "{url}");
        let (code, out, err) = admin(&daemon, &["keys", "show"], Some(&b));
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("budget:      shared budget acme-"), "{out}");
        daemon.stop().await;
    }
}
