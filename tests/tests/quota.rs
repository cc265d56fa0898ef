//! Calendar quotas end to end, on a daemon over a real Redis: a quota denial over HTTP charges
//! neither the bucket nor the quota and every header names the reset; `keys show` reports the
//! quota; a hot reload adds, changes and removes a quota for the next debit; a bad quota in
//! the file is refused with its field named and changes nothing.
use enforcer::reload::{ConfigSource, Overrides};
use enforcer_tests::{TestDaemon, check, enforcer_cli, redis_url, unique};
use serde_json::{Value, json};
use std::path::Path;

/// `POST /work` costs 100; the default tier `metered` holds 1000 tokens without refill and,
/// with `quota` set, a calendar quota (a TOML inline table, or "" for none).
fn config_text(quota: &str) -> String {
    format!(
        r#"
        [budget]
        default_tier = "metered"
        [tiers.metered]
        max_tokens = 1000
        refill_per_sec = 0
        idle_cap = 1
        initial_tokens = 1000
        {quota}
        [pricing]
        default_cost = 1
        [[pricing.endpoints]]
        method = "POST"
        path = "/work"
        base_cost = 100
        "#
    )
}

const MONTHLY_300: &str =
    r#"quota = { amount = 300, period = "month", anchor_day = 1, timezone = "Europe/Berlin" }"#;

fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

async fn daemon_from(text: &str) -> (TestDaemon, std::path::PathBuf, tempfile::TempDir) {
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

async fn work(d: &TestDaemon, key: &str) -> enforcer_tests::Resp {
    check(
        d.addr,
        json!({"key": key, "endpoint": "/work", "method": "POST"}),
    )
    .await
}

/// `t=` of the `RateLimit` item named `name`.
fn t_of(ratelimit: &str, name: &str) -> Option<u64> {
    ratelimit
        .split(", ")
        .find(|item| item.starts_with(&format!("\"{name}\"")))?
        .split(';')
        .find_map(|p| p.strip_prefix("t="))?
        .parse()
        .ok()
}

/// `enforcer keys show [--json]` of `key`: its standard output.
fn show_text(d: &TestDaemon, key: &str, json: bool) -> String {
    let socket = d
        .admin_socket
        .as_ref()
        .expect("admin socket")
        .display()
        .to_string();
    let mut args = vec!["keys", "show", "--socket", &socket];
    if json {
        args.push("--json");
    }
    let (code, out, err) =
        tokio::task::block_in_place(|| enforcer_cli(&args, Some(&format!("{key}\n"))));
    assert_eq!(code, 0, "{err}");
    out
}

fn show(d: &TestDaemon, key: &str) -> Value {
    serde_json::from_str(&show_text(d, key, true)).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_denial_charges_nothing_and_every_header_names_the_reset() {
    let (d, _file, _dir) = daemon_from(&config_text(MONTHLY_300)).await;
    let key = unique("quota-http");
    for i in 1..=3 {
        let r = work(&d, &key).await;
        assert_eq!(r.status, 200, "request {i}");
        let body = r.json();
        assert_eq!(body["quota"]["used"], json!(100.0 * i as f64), "{body}");
        assert_eq!(body["quota"]["amount"], json!(300.0));
    }
    // The bucket still holds 700; the quota is spent: 429, nothing charged.
    let denied = work(&d, &key).await;
    assert_eq!(denied.status, 429);
    let body = denied.json();
    assert_eq!(body["reason"], "quota_exhausted", "{body}");
    assert_eq!(body["remaining"], json!(700.0));
    assert_eq!(body["quota"]["used"], json!(300.0));
    let reset_ms = body["quota"]["resets_in_ms"]
        .as_u64()
        .expect("resets_in_ms");
    assert_eq!(body["retry_after_ms"], json!(reset_ms));
    assert!(reset_ms <= 31 * 86_400_000, "{reset_ms}");
    let secs = reset_ms.div_ceil(1000).max(1);
    let ratelimit = denied.header("ratelimit").expect("RateLimit").to_owned();
    assert_eq!(
        denied.header("retry-after"),
        Some(secs.to_string().as_str())
    );
    assert_eq!(t_of(&ratelimit, "metered"), Some(secs), "{ratelimit}");
    assert_eq!(t_of(&ratelimit, "metered-quota"), Some(secs), "{ratelimit}");
    assert!(ratelimit.contains("\"metered-quota\";r=0;"), "{ratelimit}");
    assert_eq!(
        denied.header("ratelimit-policy"),
        Some("\"metered\";q=1000, \"metered-quota\";q=300")
    );
    // `keys show`: the quota as the store keeps it, and the reset at a Berlin midnight on
    // the 1st.
    let shown = show(&d, &key);
    assert_eq!(shown["balance"], json!(700.0), "{shown}");
    let q = &shown["quota"];
    assert_eq!(
        (&q["used"], &q["left"]),
        (&json!(300.0), &json!(0.0)),
        "{shown}"
    );
    let resets = q["resets_at"].as_f64().expect("resets_at") as i64;
    let local = chrono::DateTime::from_timestamp(resets, 0)
        .expect("time")
        .with_timezone(&chrono_tz::Europe::Berlin);
    assert_eq!(
        local.format("%d %H:%M:%S").to_string(),
        "01 00:00:00",
        "{local}"
    );
    // The usage key expires when its period ends (no cron, no leftover keys).
    let mut conn = redis::Client::open(redis_url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let hash = enforcer::key::ApiKey::parse(&key)
        .expect("key")
        .hash()
        .to_hex();
    let pttl: i64 = redis::cmd("PTTL")
        .arg(format!("ptb:{{{hash}}}:q"))
        .query_async(&mut conn)
        .await
        .expect("pttl");
    assert!(
        pttl > 0 && pttl as u64 <= reset_ms,
        "expires at the reset: pttl {pttl}, reset in {reset_ms}"
    );
    let text = show_text(&d, &key, false);
    assert!(
        text.contains("quota:       300.000 used, 0.000 left of 300.000 this period; resets at "),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_changes_and_removes_a_quota_and_a_bad_one_changes_nothing() {
    let (d, file, _dir) = daemon_from(&config_text("")).await;
    let key = unique("quota-reload");
    let r = work(&d, &key).await;
    assert_eq!(r.status, 200);
    assert!(r.json().get("quota").is_none(), "no quota yet");
    // Added: the next debit counts (usage starts now).
    write(&file, &config_text(MONTHLY_300));
    d.reloader.reload().await.expect("reload");
    let body = work(&d, &key).await.json();
    assert_eq!(body["quota"]["used"], json!(100.0), "{body}");
    // A bad quota is refused with its field named; the quota in force stays.
    write(
        &file,
        &config_text(
            r#"quota = { amount = 300, period = "month", anchor_day = 31, timezone = "Mars/Base" }"#,
        ),
    );
    let err = d.reloader.reload().await.expect_err("refused").to_string();
    assert!(err.contains("tiers.metered.quota.anchor_day"), "{err}");
    assert!(err.contains("tiers.metered.quota.timezone"), "{err}");
    let body = work(&d, &key).await.json();
    assert_eq!(body["quota"]["used"], json!(200.0), "{body}");
    // A daily quota of 250 in another zone: another period start, so its usage starts at 0.
    write(
        &file,
        &config_text(r#"quota = { amount = 250, period = "day", timezone = "Asia/Tokyo" }"#),
    );
    d.reloader.reload().await.expect("reload");
    let body = work(&d, &key).await.json();
    assert_eq!(
        (&body["quota"]["used"], &body["quota"]["amount"]),
        (&json!(100.0), &json!(250.0)),
        "{body}"
    );
    // Removed: no quota any more.
    write(&file, &config_text(""));
    d.reloader.reload().await.expect("reload");
    let r = work(&d, &key).await;
    assert_eq!(r.status, 200);
    assert!(r.json().get("quota").is_none());
}
