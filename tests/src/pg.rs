//! The PostgreSQL that `cargo xtask test` started: a fresh database per test, and stopping and
//! starting the server for the tests of the ledger's spill and replay.
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the integration tests with `cargo xtask test`")
    })
}

/// The server's admin URL (`…/postgres`).
pub fn admin_url() -> String {
    env("ENFORCER_TEST_DATABASE_URL")
}

/// A new, empty database; returns its URL.
pub async fn fresh_database() -> String {
    let name = crate::unique("ledger").replace('-', "_");
    let admin = sqlx::PgPool::connect(&admin_url())
        .await
        .expect("connect to the test PostgreSQL");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .expect("create database");
    admin.close().await;
    let base = admin_url();
    let server = base.rsplit_once('/').expect("url with a database").0;
    format!("{server}/{name}")
}

fn pg_ctl(args: &[&str]) -> bool {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(format!("{PG_BIN}/pg_ctl"))
        .arg("-D")
        .arg(env("ENFORCER_TEST_PGDATA"))
        .args(args)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// PostgreSQL stopped until this is dropped (then started again, even if the test panics).
#[derive(Debug)]
pub struct Outage(());

impl Outage {
    /// Stops the server (fast shutdown: open connections are cut).
    pub fn begin() -> Self {
        assert!(pg_ctl(&["-m", "fast", "-w", "stop"]), "pg_ctl stop");
        Self(())
    }

    /// Starts it again and waits until it accepts connections.
    pub fn end(self) {}
}

impl Drop for Outage {
    fn drop(&mut self) {
        let options = env("ENFORCER_TEST_PG_OPTIONS");
        let started = pg_ctl(&["-o", &options, "-w", "start"]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !started && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            if pg_ctl(&["-o", &options, "-w", "start"]) {
                break;
            }
        }
    }
}
