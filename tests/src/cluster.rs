//! Redis Cluster for the tests: the shared one `cargo xtask test` started
//! ([`redis_cluster_seeds`]), and [`PrivateCluster`], six `redis-server`s of a test's own for the
//! scenarios that kill nodes or move slots, so that later tests still find the shared cluster
//! whole. Also the key-to-slot rule, to pick keys on a given primary.
use crate::Process;
use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// The seed URLs of the cluster `cargo xtask test` started (`ENFORCER_TEST_REDIS_CLUSTER`).
pub fn redis_cluster_seeds() -> Vec<String> {
    std::env::var("ENFORCER_TEST_REDIS_CLUSTER")
        .expect(
            "ENFORCER_TEST_REDIS_CLUSTER is not set: run the integration tests with `cargo xtask \
             test`, which starts a private Redis Cluster (six nodes, three primaries)",
        )
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The cluster slot of a Redis key name: the daemon's own computation (unit-tested against
/// `CLUSTER KEYSLOT` in `enforcer::store`).
pub fn key_slot(name: &str) -> u16 {
    enforcer::store::slot_of(name.as_bytes())
}

/// The slot of an API key's buckets (its Redis names carry the key hash as hash tag).
pub fn api_key_slot(api_key: &str) -> u16 {
    let key = enforcer::key::ApiKey::parse(api_key).expect("valid api key");
    key_slot(&format!("ptb:{{{}}}:b", key.hash().to_hex()))
}

/// `redis-cli -p port args…`, its standard output.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli is installed (cargo xtask setup)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// The node id.
    pub id: String,
    /// Its client port.
    pub port: u16,
    /// Primary (true) or replica.
    pub primary: bool,
    /// Marked failed (`fail` / `fail?`) by the node asked.
    pub failed: bool,
    /// The primary's id, for a replica.
    pub replica_of: Option<String>,
    /// The slots it serves (primaries).
    pub slots: Vec<(u16, u16)>,
}

/// The cluster as the node on `port` sees it.
pub fn cluster_nodes(port: u16) -> Vec<NodeInfo> {
    cli(port, &["CLUSTER", "NODES"])
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            // ip:port@busport
            let node_port = f[1].split('@').next()?.rsplit(':').next()?.parse().ok()?;
            let flags: BTreeSet<&str> = f[2].split(',').collect();
            let slots = f[8..]
                .iter()
                // Open slots ("[5-<-id]") are not served yet.
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|n| (n, n)),
                })
                .collect();
            Some(NodeInfo {
                id: f[0].to_owned(),
                port: node_port,
                primary: flags.contains("master"),
                failed: flags.contains("fail") || flags.contains("fail?"),
                replica_of: (f[3] != "-").then(|| f[3].to_owned()),
                slots,
            })
        })
        .collect()
}

/// Whether `CLUSTER INFO` on `port` says `cluster_state:ok`.
pub fn state_ok(port: u16) -> bool {
    cli(port, &["CLUSTER", "INFO"])
        .lines()
        .any(|l| l.trim() == "cluster_state:ok")
}

/// A Redis Cluster of the test's own: six nodes, three primaries with one replica each,
/// `cluster-node-timeout` 2 s (a failover takes a few seconds, not the default's 15+),
/// `cluster-require-full-coverage no` (as docs/configuration.md asks for production). Every
/// node is a child process, killed on drop (or by [`PrivateCluster::kill`]).
#[derive(Debug)]
pub struct PrivateCluster {
    /// Client ports; node `i` is killed by `kill(ports[i])`.
    pub ports: Vec<u16>,
    // Before `dir`: the servers stop before their directory goes.
    nodes: Vec<Option<Process>>,
    dir: tempfile::TempDir,
    /// `cluster-node-timeout`, milliseconds.
    node_timeout_ms: u64,
}

impl PrivateCluster {
    /// Starts six nodes, creates the cluster and waits until every node says
    /// `cluster_state:ok` and every replica is in sync with its primary.
    pub fn start() -> Self {
        Self::start_with_node_timeout(2000)
    }

    /// The same with another `cluster-node-timeout`: a long one keeps a cluster that is frozen
    /// as a whole (every node paused, then resumed) from failing over when it runs again.
    pub fn start_with_node_timeout(node_timeout_ms: u64) -> Self {
        // Another test's servers may take a port between our check and our bind: try again
        // on other ports.
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(node_timeout_ms) {
                Ok(c) => return c,
                Err(e) => last = e,
            }
        }
        panic!("could not start a private Redis Cluster: {last}")
    }

    fn try_start(node_timeout_ms: u64) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let ports = cluster_ports(6);
        let mut cluster = Self {
            nodes: Vec::new(),
            ports: ports.clone(),
            dir,
            node_timeout_ms,
        };
        for &port in &ports {
            let child = Command::new("redis-server")
                .args(node_args(port, cluster.dir.path(), node_timeout_ms))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("redis-server: {e}"))?;
            cluster.nodes.push(Some(Process(child)));
        }
        let start = Instant::now();
        for (i, &port) in ports.iter().enumerate() {
            while cli(port, &["PING"]).trim() != "PONG" {
                if start.elapsed() > Duration::from_secs(20) {
                    return Err(format!("node on {port} did not answer"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // A server that lost the port race exits; the PONG came from someone else's.
            if let Some(Some(p)) = cluster.nodes.get_mut(i)
                && !matches!(p.0.try_wait(), Ok(None))
            {
                return Err(format!("node on {port} exited (port taken?)"));
            }
        }
        let create = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .map_err(|e| format!("redis-cli --cluster create: {e}"))?;
        if !create.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&create.stdout),
                String::from_utf8_lossy(&create.stderr)
            ));
        }
        cluster.wait_healthy(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// Waits until every live node says `cluster_state:ok` and agrees on the topology (the
    /// primaries that serve slots cover all of them, every other live node is known as a
    /// replica: right after `--cluster create` gossip still shows replicas as empty primaries),
    /// and every replica's link to its primary is up (a replica that never synced would not
    /// take over).
    pub fn wait_healthy(&self, within: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            let live: Vec<u16> = self.live_ports();
            let ok = live.iter().all(|&p| state_ok(p))
                && live.iter().all(|&p| agreed(&cluster_nodes(p)))
                && live.iter().all(|&p| {
                    let info = cli(p, &["INFO", "replication"]);
                    info.contains("role:master") || info.contains("master_link_status:up")
                });
            if ok {
                return Ok(());
            }
            if start.elapsed() > within {
                return Err(format!(
                    "cluster not healthy within {within:?}: {}",
                    cli(live[0], &["CLUSTER", "NODES"])
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Ports of the nodes not killed.
    pub fn live_ports(&self) -> Vec<u16> {
        self.ports
            .iter()
            .zip(&self.nodes)
            .filter(|(_, n)| n.is_some())
            .map(|(p, _)| *p)
            .collect()
    }

    /// `redis://127.0.0.1:P` of every node (seeds for a daemon).
    pub fn seeds(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The cluster as a live node sees it.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        cluster_nodes(self.live_ports()[0])
    }

    /// The primary that serves `slot` now.
    pub fn primary_of(&self, slot: u16) -> NodeInfo {
        self.nodes()
            .into_iter()
            .find(|n| {
                n.primary && !n.failed && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
            })
            .unwrap_or_else(|| panic!("no primary serves slot {slot}"))
    }

    /// The replica of the primary `id`.
    pub fn replica_of(&self, id: &str) -> NodeInfo {
        self.nodes()
            .into_iter()
            .find(|n| n.replica_of.as_deref() == Some(id))
            .unwrap_or_else(|| panic!("primary {id} has no replica"))
    }

    /// Kills the node on `port` with SIGKILL (as abrupt as a crash).
    pub fn kill(&mut self, port: u16) {
        let i = self
            .ports
            .iter()
            .position(|&p| p == port)
            .unwrap_or_else(|| panic!("no node on {port}"));
        self.nodes[i] = None;
    }

    /// Starts the killed node on `port` again, with its old node id and configuration: after a
    /// failover it rejoins as a replica of the primary that took its slots.
    pub fn restart(&mut self, port: u16) {
        let i = self
            .ports
            .iter()
            .position(|&p| p == port)
            .unwrap_or_else(|| panic!("no node on {port}"));
        assert!(self.nodes[i].is_none(), "node on {port} is running");
        let child = Command::new("redis-server")
            .args(node_args(port, self.dir.path(), self.node_timeout_ms))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.nodes[i] = Some(Process(child));
    }

    /// Freezes every live node (SIGSTOP): the whole cluster stops answering, connections stay
    /// open, what clients send waits.
    pub fn pause_all(&self) {
        self.signal_all("-STOP");
    }

    /// Lets every node run again (SIGCONT); they then also run what was sent meanwhile.
    pub fn resume_all(&self) {
        self.signal_all("-CONT");
    }

    fn signal_all(&self, signal: &str) {
        for node in self.nodes.iter().flatten() {
            let status = Command::new("kill")
                .args([signal, &node.0.id().to_string()])
                .status()
                .expect("kill");
            assert!(status.success(), "kill {signal} of a cluster node");
        }
    }

    /// The directory holding the nodes' files.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

/// Whether one node's view is settled: live primaries serve all slots, and every live node
/// that serves none is a replica.
fn agreed(view: &[NodeInfo]) -> bool {
    let served: u32 = view
        .iter()
        .filter(|n| n.primary && !n.failed)
        .flat_map(|n| &n.slots)
        .map(|&(a, b)| u32::from(b) - u32::from(a) + 1)
        .sum();
    served == u32::from(SLOTS)
        && view
            .iter()
            .all(|n| n.failed || !n.primary || !n.slots.is_empty())
}

/// `redis-server` arguments of one cluster node.
fn node_args(port: u16, dir: &std::path::Path, node_timeout_ms: u64) -> Vec<String> {
    let p = port.to_string();
    let timeout = node_timeout_ms.to_string();
    [
        "--port",
        &p,
        "--bind",
        "127.0.0.1",
        "--cluster-enabled",
        "yes",
        "--cluster-node-timeout",
        &timeout,
        // Replicas sync at once instead of after the default 5 s delay.
        "--repl-diskless-sync-delay",
        "0",
        // As docs/configuration.md asks of production clusters: a primary that is down stops
        // its own slots, not all of them.
        "--cluster-require-full-coverage",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([
        "--cluster-config-file".to_owned(),
        dir.join(format!("nodes-{port}.conf")).display().to_string(),
        "--dir".to_owned(),
        dir.display().to_string(),
        "--logfile".to_owned(),
        dir.join(format!("redis-{port}.log")).display().to_string(),
    ])
    // The `enforcer-redis` module `cargo xtask test` built, on every node: the daemons under
    // test debit with ENFORCER.DEBIT through failovers and slot migrations.
    .chain(
        std::env::var("ENFORCER_TEST_REDIS_MODULE")
            .ok()
            .filter(|m| !m.is_empty())
            .map(|m| ["--loadmodule".to_owned(), m])
            .into_iter()
            .flatten(),
    )
    .collect()
}

/// `n` ports below 55535 whose cluster bus port (+10000) is free too. The kernel's ephemeral
/// ports (32768–60999) would often put the bus port above 65535 or on a taken port.
fn cluster_ports(n: usize) -> Vec<u16> {
    let mut ports = Vec::new();
    while ports.len() < n {
        let p = 20_000 + (uuid::Uuid::new_v4().as_u128() % 25_000) as u16;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if !ports.contains(&p) && free(p) && free(p + 10_000) {
            ports.push(p);
        }
    }
    ports
}

#[cfg(test)]
mod tests {
    use super::key_slot;

    #[test]
    fn key_slot_follows_the_cluster_spec() {
        // The examples of the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(key_slot("123456789"), 12739);
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("{user1000}.following"), key_slot("user1000"));
        assert_eq!(key_slot("foo{}{bar}"), key_slot("foo{}{bar}"));
        assert_ne!(key_slot("foo{}{bar}"), key_slot("bar"));
    }
}
