//! Private Redis and PostgreSQL instances for tests and benchmarks: free loopback ports, a
//! temporary directory, stopped (and the directory removed) on drop.
use anyhow::{Context as _, Result, bail};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not become ready within 30 s")
}

/// A private Redis.
#[derive(Debug)]
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
}

impl Redis {
    pub fn start(dir: &Path) -> Result<Self> {
        let port = free_port()?;
        let dir = dir.join("redis");
        std::fs::create_dir_all(&dir)?;
        crate::status(
            Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "yes"])
                .arg("--pidfile")
                .arg(dir.join("redis.pid"))
                .arg("--dir")
                .arg(&dir)
                .arg("--logfile")
                .arg(dir.join("redis.log"))
                .stdout(Stdio::null()),
        )
        .context("starting redis-server")?;
        let redis = Self { port, dir };
        wait_for("redis", || {
            redis.cli(&["PING"]).is_ok_and(|o| o.trim() == "PONG")
        })?;
        Ok(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.cli(&["SHUTDOWN", "NOSAVE"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private PostgreSQL 15 cluster (it refuses to run as root: it runs as `postgres`).
#[derive(Debug)]
pub struct Postgres {
    pub port: u16,
    dir: PathBuf,
}

impl Postgres {
    /// A cluster for tests: `fsync=off` (nothing to keep across a crash, and faster).
    pub fn start(dir: &Path) -> Result<Self> {
        Self::start_with(dir, false)
    }

    /// A cluster with `fsync` on or off.
    pub fn start_with(dir: &Path, fsync: bool) -> Result<Self> {
        let port = free_port()?;
        let dir = dir.join("pg");
        std::fs::create_dir_all(&dir)?;
        crate::status(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir),
        )?;
        let as_pg = |bin: &str| {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"])
                .arg(Path::new(PG_BIN).join(bin));
            c
        };
        let data = dir.join("data");
        crate::status(
            as_pg("initdb")
                .arg("-D")
                .arg(&data)
                .args(["-A", "trust", "-U", "postgres", "--encoding=UTF8"])
                .stdout(Stdio::null()),
        )
        .context("initdb")?;
        crate::status(
            as_pg("pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-o")
                .arg(Self::options(port, &dir, fsync))
                .arg("-l")
                .arg(dir.join("pg.log"))
                .args(["-w", "start"])
                .stdout(Stdio::null()),
        )
        .context("starting PostgreSQL")?;
        Ok(Self { port, dir })
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Server options (`pg_ctl -o`); the ledger tests stop and start the server with them.
    fn options(port: u16, dir: &Path, fsync: bool) -> String {
        let fsync = if fsync { "on" } else { "off" };
        format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync={fsync}",
            dir.display()
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(Path::new(PG_BIN).join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Everything `cargo xtask test` provides to the tests.
#[derive(Debug)]
pub struct Services {
    pub redis: Redis,
    pub postgres: Postgres,
    dir: tempfile::TempDir,
}

impl Services {
    pub fn start() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("enforcer-test-")
            .tempdir()?;
        // PostgreSQL runs as `postgres` and must be able to traverse into the directory.
        Command::new("chmod").arg("755").arg(dir.path()).status()?;
        let redis = Redis::start(dir.path())?;
        let postgres = Postgres::start(dir.path())?;
        eprintln!(
            "xtask: redis on {}, postgres on {}",
            redis.url(),
            postgres.url()
        );
        Ok(Self {
            redis,
            postgres,
            dir,
        })
    }

    /// Environment for the test processes.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("ENFORCER_TEST_REDIS_URL".into(), self.redis.url()),
            ("ENFORCER_TEST_DATABASE_URL".into(), self.postgres.url()),
            (
                "ENFORCER_TEST_REDIS_PORT".into(),
                self.redis.port.to_string(),
            ),
            // Daemons the tests spawn keep their audit rows here, not in the checkout.
            (
                "ENFORCER_LEDGER_FILE".into(),
                self.dir.path().join("ledger.jsonl").display().to_string(),
            ),
            // For the ledger tests that stop PostgreSQL in the middle of a run.
            (
                "ENFORCER_TEST_PGDATA".into(),
                self.postgres.dir.join("data").display().to_string(),
            ),
            (
                "ENFORCER_TEST_PG_OPTIONS".into(),
                Postgres::options(self.postgres.port, &self.postgres.dir, false),
            ),
        ]
    }
}
