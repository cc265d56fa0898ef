//! `--log-format json` (and `ENFORCER_LOG_FORMAT`): the `enforcer` binary's stderr as a log
//! pipeline reads it, every line one JSON object, from a daemon's start to its stop and for a
//! command that fails.
use enforcer_tests::{Process, enforcer_bin};
use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Every line of `stderr` parsed as one JSON object with tracing's fields (timestamp, level,
/// target, fields.message); fails on the first line that is not.
fn json_lines(stderr: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}\nall:\n{stderr}"));
            assert!(v.is_object(), "{line}");
            for field in ["timestamp", "level", "target"] {
                assert!(v[field].is_string(), "no {field} in {line}");
            }
            assert!(v["fields"]["message"].is_string(), "no message in {line}");
            v
        })
        .collect()
}

#[test]
fn a_daemon_logs_one_json_object_per_line_from_start_to_stop() {
    let dir = tempfile::tempdir().expect("tmp");
    let child = Command::new(enforcer_bin())
        .args(["--log-format", "json", "run", "--listen", "127.0.0.1:0"])
        .args(["--grpc-listen", ""])
        .arg("--ledger-file")
        .arg(dir.path().join("ledger.jsonl"))
        .env_remove("ENFORCER_REDIS_URL")
        .env_remove("ENFORCER_REDIS_CLUSTER")
        .env_remove("ENFORCER_DATABASE_URL")
        .env_remove("ENFORCER_LOG_FORMAT")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn enforcer");
    let mut daemon = Process(child);
    let stderr = daemon.0.stderr.take().expect("stderr");
    // Lines as they come, from a thread: the test waits for "listening" with a deadline.
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let listening = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no \"enforcer listening\" line: {seen:#?}"));
        let v = json_lines(&line).remove(0);
        seen.push(line);
        if v["fields"]["message"] == "enforcer listening" {
            break v;
        }
    };
    assert_eq!(listening["level"], "INFO");
    let addr: std::net::SocketAddr = listening["fields"]["addr"]
        .as_str()
        .expect("addr field")
        .parse()
        .expect("a socket address");
    assert_ne!(addr.port(), 0, "the bound port, not the asked one");

    // SIGTERM: a clean stop, logged the same way.
    let killed = Command::new("kill")
        .args(["-TERM", &daemon.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success(), "SIGTERM sent");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = daemon.0.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the daemon did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    reader.join().expect("reader");
    seen.extend(rx.try_iter());
    let all = json_lines(&seen.join("\n"));
    assert!(
        all.iter().any(|v| v["fields"]["message"] == "stopped"),
        "{seen:#?}"
    );
}

#[test]
fn a_failing_command_says_why_in_json_from_the_environment_or_the_flag() {
    // ENFORCER_LOG_FORMAT, and the flag after the subcommand (it is global).
    let runs = [
        Command::new(enforcer_bin())
            .args(["run", "--config", "/nonexistent.toml"])
            .env("ENFORCER_LOG_FORMAT", "json")
            .env_remove("RUST_LOG")
            .output()
            .expect("run enforcer"),
        Command::new(enforcer_bin())
            .args([
                "run",
                "--log-format",
                "json",
                "--config",
                "/nonexistent.toml",
            ])
            .env_remove("ENFORCER_LOG_FORMAT")
            .env_remove("RUST_LOG")
            .output()
            .expect("run enforcer"),
    ];
    for out in runs {
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines = json_lines(&stderr);
        let error = lines
            .iter()
            .find(|v| v["level"] == "ERROR")
            .unwrap_or_else(|| panic!("an ERROR line: {stderr}"));
        assert!(
            error["fields"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("/nonexistent.toml")),
            "{stderr}"
        );
    }
}

#[test]
fn text_stays_the_default_and_an_unknown_format_is_refused() {
    let out = Command::new(enforcer_bin())
        .args(["run", "--config", "/nonexistent.toml"])
        .env_remove("ENFORCER_LOG_FORMAT")
        .output()
        .expect("run enforcer");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: "), "{stderr}");

    let out = Command::new(enforcer_bin())
        .args([
            "--log-format",
            "xml",
            "config",
            "check",
            "/nonexistent.toml",
        ])
        .output()
        .expect("run enforcer");
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("xml") && stderr.contains("json"),
        "names the bad value and the good ones: {stderr}"
    );
}
