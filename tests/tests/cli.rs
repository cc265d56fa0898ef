//! The `enforcer` command line, run as a user would.
use enforcer_tests::enforcer_bin;
use std::process::Command;

fn enforcer(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(enforcer_bin())
        .args(args)
        .output()
        .expect("run enforcer");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_explains_every_command() {
    let (code, out, _) = enforcer(&["--help"]);
    assert_eq!(code, 0);
    for cmd in ["run", "config", "keys"] {
        assert!(out.contains(cmd), "--help lists {cmd}: {out}");
    }
    let (code, out, _) = enforcer(&["run", "--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--config",
        "--listen",
        "--redis-url",
        "ENFORCER_REDIS_URL",
        "--iface",
    ] {
        assert!(out.contains(flag), "run --help mentions {flag}");
    }
}

#[test]
fn config_check_accepts_the_example_and_names_every_bad_field() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/enforcer.toml");
    let (code, out, _) = enforcer(&["config", "check", example]);
    assert_eq!(code, 0, "{out}");

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[store]\ntimeout_ms = 0\non_store_failure = \"fail-open\"\n[tiers.free]\nmax_tokens = 0\nrefill_per_sec = -1\n",
    )
    .expect("write");
    let (code, _, err) = enforcer(&["config", "check", bad.to_str().expect("path")]);
    assert_eq!(code, 2);
    for path in [
        "store.timeout_ms",
        "tiers.free.max_tokens",
        "tiers.free.refill_per_sec",
    ] {
        assert!(err.contains(path), "{path} reported: {err}");
    }

    std::fs::write(&bad, "[store]\non_store_failure = \"sometimes\"\n").expect("write");
    let (code, _, err) = enforcer(&["config", "check", bad.to_str().expect("path")]);
    assert_eq!(code, 2);
    assert!(err.contains("store.on_store_failure"), "{err}");

    let (code, _, err) = enforcer(&["config", "check", "/nonexistent.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read"), "{err}");
}

#[test]
fn run_refuses_a_bad_config_without_starting() {
    let (code, _, err) = enforcer(&["run", "--config", "/nonexistent.toml"]);
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent.toml"), "{err}");
    let (code, _, err) = enforcer(&[
        "run",
        "--redis-url",
        "http://nope",
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("store.redis_url"), "{err}");
}

#[test]
fn keys_hash_prints_the_redis_name_of_a_key() {
    let (code, out, err) = enforcer_tests::enforcer_cli(&["keys", "hash"], Some("abc\n"));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    // From a file too (its one line, with or without the line end).
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("key");
    std::fs::write(&file, "abc").expect("write");
    let (code, out, _) = enforcer_tests::enforcer_cli(
        &["keys", "hash", "--key-file", file.to_str().expect("path")],
        None,
    );
    assert_eq!(code, 0);
    assert!(out.starts_with("ba7816bf"), "{out}");
}

#[test]
fn api_keys_are_never_taken_from_the_command_line() {
    // Shell history and `ps` would keep them: every key command refuses a key argument.
    for args in [
        &["keys", "hash", "abc"][..],
        &["keys", "show", "abc"],
        &["keys", "grant", "10", "--note", "x", "abc"],
        &["keys", "block", "abc", "--for", "1m"],
        &["keys", "unblock", "abc"],
        &["audit", "usage", "--key", "abc"],
    ] {
        let (code, _, err) = enforcer_tests::enforcer_cli(args, Some(""));
        assert_eq!(code, 2, "{args:?} must be a usage error: {err}");
        assert!(err.contains("unexpected argument"), "{args:?}: {err}");
    }
    // Two lines, an empty input, a key with a space: refused before anything is sent.
    for (input, says) in [
        ("k1\nk2\n", "more than one line"),
        ("", "empty"),
        ("a b\n", "whitespace"),
    ] {
        let (code, _, err) = enforcer_tests::enforcer_cli(&["keys", "hash"], Some(input));
        assert_eq!(code, 1, "{input:?}");
        assert!(err.contains(says), "{input:?}: {err}");
    }
}
