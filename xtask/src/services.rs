//! Private Redis, Redis Cluster and PostgreSQL instances for tests and benchmarks: free loopback
//! ports, a temporary directory, stopped (and the directory removed) on drop.
use anyhow::{Context as _, Result, bail};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
        Self::start_with(dir, None)
    }

    /// A private Redis, with the `enforcer-redis` module loaded from `module` when given.
    pub fn start_with(dir: &Path, module: Option<&Path>) -> Result<Self> {
        let port = free_port()?;
        let dir = dir.join("redis");
        std::fs::create_dir_all(&dir)?;
        crate::status(
            Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "yes"])
                // As docs/configuration.md asks of production Redis (the daemon warns above
                // 500 ms); redis_watch sets its own values.
                .args(["--busy-reply-threshold", "500"])
                .arg("--pidfile")
                .arg(dir.join("redis.pid"))
                .arg("--dir")
                .arg(&dir)
                .arg("--logfile")
                .arg(dir.join("redis.log"))
                .args(loadmodule(module))
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

/// Inclusive ranges of cluster slots.
pub type SlotRanges = Vec<(u16, u16)>;

/// A private Redis Cluster: six `redis-server`s (three primaries, one replica each) on free
/// loopback ports below 55535 (each node also listens on its port + 10000, the cluster bus),
/// `cluster-node-timeout` 2 s so a failover takes seconds. The nodes are child processes,
/// killed by PID on drop.
#[derive(Debug)]
pub struct RedisCluster {
    pub ports: Vec<u16>,
    nodes: Vec<Child>,
    dir: PathBuf,
}

impl RedisCluster {
    /// Starts the nodes, creates the cluster, waits until every node says `cluster_state:ok`
    /// and every replica is in sync (about 2 s here).
    pub fn start(dir: &Path) -> Result<Self> {
        Self::start_with(dir, None)
    }

    /// The cluster, every node with the `enforcer-redis` module loaded from `module` when given.
    pub fn start_with(dir: &Path, module: Option<&Path>) -> Result<Self> {
        let dir = dir.join("redis-cluster");
        // Another process may take a port between the check and the bind: retry elsewhere.
        let mut last = None;
        for attempt in 0..3 {
            let attempt_dir = dir.join(attempt.to_string());
            std::fs::create_dir_all(&attempt_dir)?;
            match Self::try_start(&attempt_dir, module) {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
            .context("starting a Redis Cluster")
    }

    fn try_start(dir: &Path, module: Option<&Path>) -> Result<Self> {
        let ports = cluster_ports(6)?;
        let mut cluster = Self {
            ports: ports.clone(),
            nodes: Vec::new(),
            dir: dir.to_path_buf(),
        };
        for &port in &ports {
            cluster.nodes.push(
                Command::new("redis-server")
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                    // Replicas sync at once, not after the default 5 s delay.
                    .args(["--repl-diskless-sync-delay", "0"])
                    // As docs/configuration.md asks of production clusters.
                    .args(["--cluster-require-full-coverage", "no"])
                    .args(["--busy-reply-threshold", "500"])
                    .args(["--save", "", "--appendonly", "no"])
                    .arg("--cluster-config-file")
                    .arg(dir.join(format!("nodes-{port}.conf")))
                    .arg("--dir")
                    .arg(dir)
                    .arg("--logfile")
                    .arg(dir.join(format!("redis-{port}.log")))
                    .args(loadmodule(module))
                    .stdout(Stdio::null())
                    .spawn()
                    .context("starting redis-server")?,
            );
        }
        for (i, &port) in ports.iter().enumerate() {
            wait_for("redis cluster node", || {
                cli(port, &["PING"]).is_ok_and(|o| o.trim() == "PONG")
            })?;
            // A server that lost the port race exits; the PONG came from someone else's.
            if cluster.nodes[i].try_wait()?.is_some() {
                bail!("redis-server on {port} exited (port taken?)");
            }
        }
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .context("redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        wait_for("redis cluster", || {
            ports.iter().all(|&p| {
                let state = cli(p, &["CLUSTER", "INFO"]).unwrap_or_default();
                let repl = cli(p, &["INFO", "replication"]).unwrap_or_default();
                let nodes = cli(p, &["CLUSTER", "NODES"]).unwrap_or_default();
                state.lines().any(|l| l.trim() == "cluster_state:ok")
                    && (repl.contains("role:master") || repl.contains("master_link_status:up"))
                    && settled_view(&nodes)
            })
        })?;
        Ok(cluster)
    }

    /// `redis://127.0.0.1:P` of every node, comma-separated (`ENFORCER_REDIS_CLUSTER`'s form).
    pub fn seeds(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The primaries now: client port and the slot ranges each serves.
    pub fn primaries(&self) -> Result<Vec<(u16, SlotRanges)>> {
        let nodes = cli(self.ports[0], &["CLUSTER", "NODES"])?;
        let primaries: Vec<(u16, SlotRanges)> = nodes
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if !f.get(2)?.contains("master") || f.len() <= 8 {
                    return None;
                }
                let port = f[1].split('@').next()?.rsplit(':').next()?.parse().ok()?;
                let slots = f[8..]
                    .iter()
                    .filter_map(|s| match s.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => s.parse().ok().map(|n| (n, n)),
                    })
                    .collect();
                Some((port, slots))
            })
            .collect();
        if primaries.len() != 3 {
            bail!("expected 3 primaries, CLUSTER NODES says: {nodes}");
        }
        Ok(primaries)
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether one node's `CLUSTER NODES` shows three primaries serving slots and three replicas
/// (right after `--cluster create` gossip still shows replicas as primaries without slots).
fn settled_view(nodes: &str) -> bool {
    let (mut primaries, mut replicas) = (0, 0);
    for line in nodes.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.get(2) {
            Some(flags) if flags.contains("master") && f.len() > 8 => primaries += 1,
            Some(flags) if flags.contains("slave") => replicas += 1,
            _ => {}
        }
    }
    primaries == 3 && replicas == 3
}

/// `redis-cli -p port args…`.
pub fn cli(port: u16, args: &[&str]) -> Result<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `n` ports below 55535 whose cluster bus port (+10000) is free too: the kernel's ephemeral
/// ports (32768–60999) would often put the bus port on a taken port or past 65535.
fn cluster_ports(n: usize) -> Result<Vec<u16>> {
    use std::hash::{BuildHasher as _, RandomState};
    let seed = RandomState::new();
    let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
    let mut ports = Vec::new();
    for i in 0u64..10_000 {
        let p = 20_000 + (seed.hash_one(i) % 25_000) as u16;
        if !ports.contains(&p) && free(p) && free(p + 10_000) {
            ports.push(p);
            if ports.len() == n {
                return Ok(ports);
            }
        }
    }
    bail!("no {n} free port pairs (P, P + 10000) below 55535")
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
    pub redis_cluster: RedisCluster,
    pub postgres: Postgres,
    /// The `enforcer-redis` module the Redis and the cluster loaded.
    module: PathBuf,
    dir: tempfile::TempDir,
}

/// `--loadmodule <path>`, or nothing.
fn loadmodule(module: Option<&Path>) -> Vec<std::ffi::OsString> {
    module
        .map(|m| vec!["--loadmodule".into(), m.as_os_str().to_owned()])
        .unwrap_or_default()
}

impl Services {
    /// The test services; the Redis and every cluster node load the `enforcer-redis` module at
    /// `module` (so the store tests run the daemon's default, `ENFORCER.DEBIT`; the script is
    /// tested beside it).
    pub fn start(module: &Path) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("enforcer-test-")
            .tempdir()?;
        // PostgreSQL runs as `postgres` and must be able to traverse into the directory.
        Command::new("chmod").arg("755").arg(dir.path()).status()?;
        let redis = Redis::start_with(dir.path(), Some(module))?;
        let redis_cluster = RedisCluster::start_with(dir.path(), Some(module))?;
        let postgres = Postgres::start(dir.path())?;
        eprintln!(
            "xtask: redis on {}, redis cluster on {}, postgres on {}",
            redis.url(),
            redis_cluster.seeds(),
            postgres.url()
        );
        Ok(Self {
            redis,
            redis_cluster,
            postgres,
            module: module.to_path_buf(),
            dir,
        })
    }

    /// Environment for the test processes.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("ENFORCER_TEST_REDIS_URL".into(), self.redis.url()),
            ("ENFORCER_TEST_DATABASE_URL".into(), self.postgres.url()),
            // Seeds of the shared cluster. Tests that kill nodes or move slots start their
            // own (tests/src/cluster.rs) and leave this one whole.
            (
                "ENFORCER_TEST_REDIS_CLUSTER".into(),
                self.redis_cluster.seeds(),
            ),
            (
                "ENFORCER_TEST_REDIS_PORT".into(),
                self.redis.port.to_string(),
            ),
            // Tests that start their own Redis load the same module (or leave it out on
            // purpose, to test the fallback to the script).
            (
                "ENFORCER_TEST_REDIS_MODULE".into(),
                self.module.display().to_string(),
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
