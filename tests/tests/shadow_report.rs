//! The shadow candidate policy (`[shadow]`) end to end: a daemon on the real Redis store (and
//! on the embedded one) records the candidate's would-be decision beside the real one in the
//! real PostgreSQL ledger, and `enforcer audit shadow-report` shows exactly the extra denials
//! computed by hand for a recorded workload under a tighter candidate. The real decisions are
//! those of the same daemon without a candidate; a replayed request id debits the candidate
//! once; `enforcer config check` names the candidate's config errors.
use enforcer::config::Config;
use enforcer::key::ApiKey;
use enforcer_tests::{TestDaemon, check, enforcer_cli, pg, redis_url, unique};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Two tiers without refill (every balance moves only by the workload, whatever the clock),
/// two priced endpoints and an operational one.
const ENFORCED: &str = r#"
[budget]
default_tier = "free"

[tiers.free]
max_tokens = 100
refill_per_sec = 0
idle_cap = 1.0

[tiers.pro]
max_tokens = 300
refill_per_sec = 0
idle_cap = 1.0

[[pricing.endpoints]]
method = "GET"
path = "/search"
base_cost = 10

[[pricing.endpoints]]
method = "POST"
path = "/generate-report"
base_cost = 40

[[pricing.endpoints]]
path = "/health"
base_cost = 1
operational = true
"#;

/// The tighter candidate: smaller buckets (free 60, pro 200: new keys start full, idle_cap 1),
/// and reports at 50 instead of 40 (× 1.25; /search unchanged).
const CANDIDATE: &str = r#"
[shadow.tiers.free]
max_tokens = 60

[shadow.tiers.pro]
max_tokens = 200

[[shadow.endpoints]]
method = "POST"
path = "/generate-report"
base_cost = 50
"#;

/// The workload's keys, by role.
struct Keys {
    f1: String,
    f2: String,
    p1: String,
    p2: String,
}

impl Keys {
    fn new() -> Self {
        Self {
            f1: unique("shadow-f1"),
            f2: unique("shadow-f2"),
            p1: unique("shadow-p1"),
            p2: unique("shadow-p2"),
        }
    }
}

/// One request of the workload: key, method, endpoint, units, request id, and what the
/// enforced and the candidate policy decide (hand-computed; `None`: no candidate decision).
struct Step {
    key: &'static str,
    method: &'static str,
    endpoint: &'static str,
    units: u32,
    request_id: Option<&'static str>,
    old: bool,
    new: Option<bool>,
}

const fn step(
    key: &'static str,
    method: &'static str,
    endpoint: &'static str,
    old: bool,
    new: bool,
) -> Step {
    Step {
        key,
        method,
        endpoint,
        units: 1,
        request_id: None,
        old,
        new: Some(new),
    }
}

const S: &str = "/search";
const R: &str = "/generate-report";

/// The recorded workload, in order, with the balances it leaves (enforced | candidate).
fn workload() -> Vec<Step> {
    let mut w = vec![
        // f1 (free): 100 | 60
        step("f1", "POST", R, true, true),  // 60 | 10
        step("f1", "GET", S, true, true),   // 50 | 0
        step("f1", "GET", S, true, false),  // 40 | 0   newly denied
        step("f1", "POST", R, true, false), // 0  | 0   newly denied
        step("f1", "GET", S, false, false), // 0  | 0   both deny
    ];
    // Operational: its own bucket, no candidate decision.
    w.push(Step {
        new: None,
        ..step("f1", "GET", "/health", true, true)
    });
    // f2 (free): six searches spend the candidate's 60.
    for _ in 0..6 {
        w.push(step("f2", "GET", S, true, true)); // … 40 | 0
    }
    w.push(step("f2", "GET", S, true, false)); // 30 | 0   newly denied
    w.push(step("f2", "POST", R, false, false)); // 30 | 0  both deny
    // p1 (pro): 300 | 200
    for _ in 0..4 {
        w.push(step("p1", "POST", R, true, true)); // … 140 | 0
    }
    w.push(step("p1", "POST", R, true, false)); // 100 | 0   newly denied
    w.push(step("p1", "GET", S, true, false)); // 90 | 0   newly denied
    // p2 (pro)
    w.push(step("p2", "GET", S, true, true)); // 290 | 190
    let report = Step {
        units: 2,
        request_id: Some("p2-report"),
        ..step("p2", "POST", R, true, true) // 210 | 90 (80 | 100 for 2 units)
    };
    w.push(report);
    // The same request again: a replay, charged nothing, and no candidate decision.
    w.push(Step {
        units: 2,
        request_id: Some("p2-report"),
        new: None,
        ..step("p2", "POST", R, true, true)
    });
    w
}

/// One line of the report: requests, tokens old, tokens new, denials old, denials new, newly
/// denied, newly allowed, and the newly denied keys (hash, requests).
type Line = (i64, f64, f64, i64, i64, i64, i64, Vec<(String, i64)>);

/// What the report must say per (tier, endpoint), computed by hand from [`workload`].
fn expected(keys: &Keys) -> BTreeMap<(&'static str, &'static str), Line> {
    let h = |k: &str| ApiKey::parse(k).expect("key").hash().to_hex();
    let mut tied = vec![(h(&keys.f1), 1), (h(&keys.f2), 1)];
    tied.sort();
    let mut total_keys = vec![(h(&keys.f1), 2), (h(&keys.p1), 2)];
    total_keys.sort();
    total_keys.push((h(&keys.f2), 1));
    BTreeMap::from([
        // f1's two reports (40 each allowed; the candidate 50 once) and f2's denied one.
        (
            ("free", R),
            (3, 80.0, 50.0, 1, 2, 1, 0, vec![(h(&keys.f1), 1)]),
        ),
        // f1: 10 + 10 old, 10 new; f2: 7 × 10 old, 6 × 10 new.
        (("free", S), (10, 90.0, 70.0, 1, 3, 2, 0, tied)),
        // p1: 5 × 40 old, 4 × 50 new; p2: 80 old, 100 new (2 units); the replay not counted.
        (
            ("pro", R),
            (6, 280.0, 300.0, 0, 1, 1, 0, vec![(h(&keys.p1), 1)]),
        ),
        (
            ("pro", S),
            (2, 20.0, 10.0, 0, 1, 1, 0, vec![(h(&keys.p1), 1)]),
        ),
        (("*", "*"), (21, 470.0, 430.0, 2, 7, 5, 0, total_keys)),
    ])
}

/// Runs the workload against `daemon`; returns each answer's (allowed, remaining).
async fn run(daemon: &TestDaemon, keys: &Keys) -> Vec<(bool, Option<f64>)> {
    let mut answers = Vec::new();
    for s in workload() {
        let key = match s.key {
            "f1" => &keys.f1,
            "f2" => &keys.f2,
            "p1" => &keys.p1,
            _ => &keys.p2,
        };
        let mut body =
            json!({"key": key, "endpoint": s.endpoint, "method": s.method, "units": s.units});
        if let Some(id) = s.request_id {
            body["request_id"] = json!(format!("{key}-{id}"));
        }
        let r = check(daemon.addr, body).await;
        let v = r.json();
        assert_eq!(
            v["allowed"], s.old,
            "{} {} {}: the enforced decision: {v}",
            s.key, s.method, s.endpoint
        );
        answers.push((v["allowed"] == true, v["remaining"].as_f64()));
    }
    answers
}

/// Assigns the pro keys their tier through the admin socket, as an operator does.
fn assign_pro(daemon: &TestDaemon, keys: &Keys) {
    let socket = daemon
        .admin_socket
        .as_ref()
        .expect("admin socket")
        .display()
        .to_string();
    for key in [&keys.p1, &keys.p2] {
        let (code, _, err) = tokio::task::block_in_place(|| {
            enforcer_cli(
                &["keys", "set-tier", "pro", "--socket", &socket],
                Some(&format!("{key}\n")),
            )
        });
        assert_eq!(code, 0, "{err}");
    }
}

fn config(store_url: &str, db: Option<&str>, candidate: bool) -> Config {
    let text = if candidate {
        format!("{ENFORCED}\n{CANDIDATE}")
    } else {
        ENFORCED.to_owned()
    };
    let mut c = Config::parse(&text).expect("valid config");
    c.store.redis_url = store_url.to_owned();
    c.store.timeout_ms = 2000;
    if let Some(url) = db {
        c.ledger.database_url = url.to_owned();
        c.ledger.migrate = true;
        c.ledger.flush_ms = 20;
    }
    c
}

/// Waits until PostgreSQL holds `n` ledger rows.
async fn wait_rows(url: &str, n: i64) {
    let pool = sqlx::PgPool::connect(url).await.expect("connect");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let have: i64 = sqlx::query_scalar("SELECT count(*) FROM token_transactions")
            .fetch_one(&pool)
            .await
            .unwrap_or(0);
        if have >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {have} of {n} rows in PostgreSQL"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pool.close().await;
}

fn cli(args: &[&str]) -> String {
    let (code, out, err) = tokio::task::block_in_place(|| enforcer_cli(args, None));
    assert_eq!(code, 0, "enforcer {args:?}: {err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tighter_candidate_shows_exactly_the_hand_computed_extra_denials() {
    for store in [redis_url(), String::new()] {
        let name = if store.is_empty() { "memory" } else { "redis" };
        let url = pg::fresh_database().await;
        let keys = Keys::new();
        let daemon = TestDaemon::start(config(&store, Some(&url), true)).await;
        assign_pro(&daemon, &keys);
        let with = run(&daemon, &keys).await;

        // The same workload without a candidate (fresh keys): the same answers.
        let plain = TestDaemon::start(config(&store, None, false)).await;
        let other = Keys::new();
        assign_pro(&plain, &other);
        let without = run(&plain, &other).await;
        assert_eq!(
            with, without,
            "{name}: the candidate changed a real decision"
        );
        plain.stop().await;

        // The replay did not debit the candidate twice: p2's candidate bucket holds
        // 200 − 10 − 100 = 90 (a second debit of 100 would have been refused, leaving 90 too,
        // so the metric and the rows say it: 21 candidate decisions, none for the replay).
        let metrics = String::from_utf8_lossy(
            &enforcer_tests::http(daemon.addr, "GET", "/metrics", &[], String::new())
                .await
                .body,
        )
        .into_owned();
        let count = |outcome: &str| {
            enforcer_tests::parse_metric(
                &metrics,
                &format!("enforcer_shadow_candidate_decisions_total{{outcome=\"{outcome}\"}}"),
            )
        };
        assert_eq!((count("allow"), count("deny")), (14.0, 7.0), "{name}");
        if !store.is_empty() {
            let hash = ApiKey::parse(&keys.p2).expect("key").hash().to_hex();
            let mut conn = enforcer_tests::redis_conn(&store).await;
            let bucket: String = redis::cmd("GET")
                .arg(format!("ptc:{{{hash}}}:b"))
                .query_async(&mut conn)
                .await
                .expect("the candidate bucket");
            assert!(bucket.starts_with("90 "), "{bucket}");
        }

        // Every decision row reaches PostgreSQL: 21 with a candidate decision, the
        // operational one and the replay without.
        wait_rows(&url, 23).await;
        daemon.stop().await;
        let pool = sqlx::PgPool::connect(&url).await.expect("connect");
        // Each row holds the candidate's decision of its request, as computed by hand.
        let recorded: Vec<Option<bool>> = sqlx::query_scalar(
            "SELECT candidate_allowed FROM token_transactions ORDER BY recorded_at, id",
        )
        .fetch_all(&pool)
        .await
        .expect("rows");
        let by_hand: Vec<Option<bool>> = workload().iter().map(|s| s.new).collect();
        assert_eq!(recorded, by_hand, "{name}");
        let without_candidate: Vec<(String, String)> = sqlx::query_as(
            "SELECT endpoint, decided_by FROM token_transactions \
             WHERE candidate_allowed IS NULL ORDER BY endpoint",
        )
        .fetch_all(&pool)
        .await
        .expect("rows");
        assert_eq!(
            without_candidate,
            [
                ("/generate-report".to_owned(), "replay".to_owned()),
                ("/health".to_owned(), name.to_owned())
            ],
            "{name}"
        );
        pool.close().await;

        let json_out = cli(&[
            "audit",
            "shadow-report",
            "--since",
            "1h",
            "--format",
            "json",
            "--top",
            "5",
            "--database-url",
            &url,
        ]);
        let report: Value = serde_json::from_str(&json_out).expect("JSON report");
        let want = expected(&keys);
        let hours = report["hours_covered"].as_f64().expect("hours_covered");
        assert!(hours > 0.0 && hours < 1.0, "{report}");
        assert_eq!(report["rate_basis"], enforcer::ledger::shadow::RATE_BASIS);
        let mut groups: Vec<&Value> = report["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .collect();
        groups.push(&report["total"]);
        let mut seen = BTreeMap::new();
        for g in groups {
            let key = (
                g["tier"].as_str().expect("tier").to_owned(),
                g["endpoint"].as_str().expect("endpoint").to_owned(),
            );
            let keys_of: Vec<(String, i64)> = g["newly_denied_keys"]
                .as_array()
                .expect("keys")
                .iter()
                .map(|k| {
                    let hash = k["key_hash"].as_str().expect("hash").to_owned();
                    assert_eq!(k["key_prefix"], hash[..16], "{k}");
                    (hash, k["requests"].as_i64().expect("n"))
                })
                .collect();
            let (old, new) = (
                g["denials_old"].as_i64().expect("old"),
                g["denials_new"].as_i64().expect("new"),
            );
            let rate = g["denials_per_hour_change"].as_f64().expect("a rate");
            assert!(
                (rate - (new - old) as f64 / hours).abs() < 1e-6 * rate.abs().max(1.0),
                "{g}"
            );
            seen.insert(
                key,
                (
                    g["requests"].as_i64().expect("requests"),
                    g["tokens_old"].as_f64().expect("old"),
                    g["tokens_new"].as_f64().expect("new"),
                    old,
                    new,
                    g["newly_denied"].as_i64().expect("newly denied"),
                    g["newly_allowed"].as_i64().expect("newly allowed"),
                    keys_of,
                ),
            );
        }
        let want: BTreeMap<(String, String), _> = want
            .into_iter()
            .map(|((t, e), v)| ((t.to_owned(), e.to_owned()), v))
            .collect();
        assert_eq!(seen, want, "{name}: {json_out}");

        // The CSV: the same numbers, a line per group and the total.
        let csv = cli(&[
            "audit",
            "shadow-report",
            "--since",
            "1h",
            "--format",
            "csv",
            "--database-url",
            &url,
        ]);
        let mut lines = csv.lines();
        assert_eq!(
            lines.next(),
            Some(
                "tier,endpoint,requests,tokens_old,tokens_new,denials_old,denials_new,\
                 newly_denied,newly_allowed,denials_per_hour_change,hours_covered,newly_denied_keys"
            )
        );
        let mut csv_rows = 0;
        for line in lines {
            let f: Vec<&str> = line.split(',').collect();
            assert_eq!(f.len(), 12, "{line}");
            let (requests, told, tnew, dold, dnew, newly, allowed, keys_of) =
                &want[&(f[0].to_owned(), f[1].to_owned())];
            assert_eq!(f[2].parse::<i64>().ok(), Some(*requests), "{line}");
            assert_eq!(f[3].parse::<f64>().ok(), Some(*told), "{line}");
            assert_eq!(f[4].parse::<f64>().ok(), Some(*tnew), "{line}");
            assert_eq!(
                f[5..9],
                [dold, dnew, newly, allowed].map(|n| n.to_string()),
                "{line}"
            );
            let listed: Vec<String> = keys_of
                .iter()
                .map(|(h, n)| format!("{}:{n}", &h[..16]))
                .collect();
            assert_eq!(f[11], listed.join(" "), "{line}");
            csv_rows += 1;
        }
        assert_eq!(csv_rows, 5, "{csv}");

        // The table: a line per group with the same numbers, and the newly denied keys.
        let table = cli(&[
            "audit",
            "shadow-report",
            "--since",
            "1h",
            "--database-url",
            &url,
        ]);
        // What docs/observability.md shows (`--nocapture`).
        println!("{name} store:\n{table}\n{csv}\n{json_out}");
        for ((tier, endpoint), (requests, told, tnew, dold, dnew, newly, allowed, _)) in &want {
            let line = table
                .lines()
                .find(|l| {
                    let mut w = l.split_whitespace();
                    w.next() == Some(tier.as_str()) && w.next() == Some(endpoint.as_str())
                })
                .unwrap_or_else(|| panic!("no line for {tier} {endpoint}:\n{table}"));
            let w: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(
                w[2..9],
                [
                    requests.to_string(),
                    format!("{told:.3}"),
                    format!("{tnew:.3}"),
                    dold.to_string(),
                    dnew.to_string(),
                    newly.to_string(),
                    allowed.to_string()
                ],
                "{line}"
            );
        }
        let f1 = ApiKey::parse(&keys.f1).expect("key").hash().to_hex();
        assert!(table.contains(&format!("{} (2)", &f1[..16])), "{table}");

        // A window that ends before the workload holds nothing.
        let empty = cli(&[
            "audit",
            "shadow-report",
            "--since",
            "2h",
            "--until",
            "1h",
            "--format",
            "json",
            "--database-url",
            &url,
        ]);
        let empty: Value = serde_json::from_str(&empty).expect("json");
        assert_eq!(empty["total"]["requests"], 0, "{empty}");
        assert_eq!(empty["groups"], json!([]));
        assert_eq!(empty["first_row"], Value::Null);
    }
}

#[test]
fn config_check_names_the_candidates_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("enforcer.toml");
    std::fs::write(
        &file,
        format!(
            "{ENFORCED}\n[shadow.tiers.free]\nmax_tokens = -1\nrefill_per_sec = -2\n\
             [[shadow.endpoints]]\nmethod = \"DELETE\"\npath = \"/generate-report\"\nbase_cost = 5\n\
             [[shadow.endpoints]]\nmethod = \"POST\"\npath = \"/generate-report\"\nbase_cost = -3\n"
        ),
    )
    .expect("write");
    let path = file.display().to_string();
    let (code, _, err) = enforcer_cli(&["config", "check", &path], None);
    assert_eq!(code, 2, "{err}");
    for field in [
        "shadow.tiers.free.max_tokens",
        "shadow.tiers.free.refill_per_sec",
        "shadow.endpoints[0].path",
        "shadow.endpoints[1].base_cost",
    ] {
        assert!(err.contains(&format!("{field}: ")), "{field} in:\n{err}");
    }
    std::fs::write(&file, format!("{ENFORCED}\n{CANDIDATE}")).expect("write");
    let (code, out, err) = enforcer_cli(&["config", "check", &path], None);
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_switches_the_candidate_on_and_off_while_serving() {
    use enforcer::reload::{ConfigSource, Overrides};
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("enforcer.toml");
    std::fs::write(&file, ENFORCED).expect("write");
    let daemon = TestDaemon::start_from(ConfigSource {
        path: Some(file.clone()),
        overrides: Overrides::default(),
    })
    .await;
    let key = unique("shadow-reload");
    let ask = |id: &str| json!({"key": key, "endpoint": R, "method": "POST", "request_id": format!("{key}-{id}")});
    let row = |rows: Vec<Value>| rows.into_iter().next().expect("a decision row");
    check(daemon.addr, ask("before")).await;
    let before = row(daemon.ledger_rows(&format!("{key}-before"), 1).await);
    assert!(before.get("candidate_allowed").is_none(), "{before}");

    std::fs::write(&file, format!("{ENFORCED}\n{CANDIDATE}")).expect("write");
    let report = daemon.reloader.reload().await.expect("reloaded");
    assert_eq!(report.changed, ["shadow"]);
    assert!(report.restart_required.is_empty());
    check(daemon.addr, ask("during")).await;
    let during = row(daemon.ledger_rows(&format!("{key}-during"), 1).await);
    // The key has 60 of 100 left; the candidate bucket, new, starts at 60 and pays 50.
    assert_eq!(during["allowed"], true, "{during}");
    assert_eq!(during["candidate_allowed"], true, "{during}");
    assert_eq!(during["candidate_cost"], 50.0, "{during}");

    std::fs::write(&file, ENFORCED).expect("write");
    assert_eq!(
        daemon.reloader.reload().await.expect("reloaded").changed,
        ["shadow"]
    );
    check(daemon.addr, ask("after")).await;
    let after = row(daemon.ledger_rows(&format!("{key}-after"), 1).await);
    assert!(after.get("candidate_allowed").is_none(), "{after}");
    daemon.stop().await;
}
