//! `ENFORCER_BENCH_PERF=1 cargo xtask bench`: `perf record` of the daemon and of Redis during
//! the production default's runs (the module, journal on, every core), and where their CPU
//! went: the kernel's share, the share of each crate, and the costliest functions. Real CPU,
//! kernel included, where `bench daemon` (callgrind) counts user-space instructions only.
//!
//! `cpu-clock` sampling, because these VMs expose no hardware counters. The recordings are
//! kept (`target/bench-perf/`) for `perf report` with call graphs.
use anyhow::{Context as _, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Whether the bench was asked to profile (`ENFORCER_BENCH_PERF`).
pub fn wanted() -> bool {
    std::env::var_os("ENFORCER_BENCH_PERF").is_some_and(|v| !v.is_empty() && v != "0")
}

/// A `perf record` attached to one process, stopped (and its data written) by [`Self::stop`].
pub struct Recording {
    child: Child,
    data: PathBuf,
}

impl Recording {
    /// Samples every thread of `pid` at 999 Hz, with call graphs, into `data`.
    pub fn start(pid: u32, data: &Path) -> Result<Self> {
        let child = Command::new("perf")
            .args(["record", "-e", "cpu-clock", "-F", "999", "-g", "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf record (is perf installed? `cargo xtask setup`)")?;
        Ok(Self {
            child,
            data: data.to_owned(),
        })
    }

    /// Stops the recording (SIGINT: perf writes its data and exits) and reads it.
    pub fn stop(mut self) -> Result<Profile> {
        crate::status(Command::new("kill").args(["-INT", &self.child.id().to_string()]))?;
        self.child.wait()?;
        Profile::read(&self.data)
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        // Only reached without `stop` (an error in the run): perf must not outlive the bench.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Self time (no children) per function, in per cent of the samples.
#[derive(Debug, Default)]
pub struct Profile {
    /// As `perf report`'s header gives it (`8K`: rounded).
    pub samples: String,
    /// `(per cent, kernel, function)`, costliest first.
    pub functions: Vec<(f64, bool, String)>,
}

impl Profile {
    fn read(data: &Path) -> Result<Self> {
        let out = Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "--sort",
                "sym",
                "-g",
                "none",
            ])
            .args(["--percent-limit", "0", "-i"])
            .arg(data)
            .output()
            .context("perf report")?;
        if !out.status.success() {
            bail!("perf report: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Self::parse(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Reads `perf report --stdio --sort sym` lines: `  12.34%  [k] name` (kernel) or
    /// `[.] name` (user space); the header's `# Samples: 12K of event` gives the count.
    fn parse(text: &str) -> Self {
        let mut profile = Self::default();
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("# Samples:") {
                profile.samples = rest.split_whitespace().next().unwrap_or("?").to_owned();
                continue;
            }
            let Some((share, rest)) = line.split_once('%') else {
                continue;
            };
            let Ok(share) = share.trim().parse::<f64>() else {
                continue;
            };
            let rest = rest.trim();
            let (kernel, name) = if let Some(name) = rest.strip_prefix("[k]") {
                (true, name)
            } else if let Some(name) = rest.strip_prefix("[.]") {
                (false, name)
            } else {
                continue;
            };
            profile
                .functions
                .push((share, kernel, name.trim().to_owned()));
        }
        profile.functions.sort_by(|a, b| b.0.total_cmp(&a.0));
        profile
    }

    /// Shares by where the time went: the kernel, then user space by crate (the first crate a
    /// function's name names, so a generic of hyper over the daemon's type counts as hyper).
    pub fn groups(&self) -> Vec<(&'static str, f64)> {
        const GROUPS: &[(&str, &[&str])] = &[
            ("allocation (mimalloc)", &["mi_", "_mi_"]),
            (
                "memcpy / memmove / memset",
                &["__mem", "memcpy", "memmove", "memset"],
            ),
            (
                "hyper, h2, http, axum, tonic, tower",
                &[
                    "hyper::",
                    "h2::",
                    "http::",
                    "axum",
                    "tonic::",
                    "tower",
                    "httparse",
                    "prost",
                    "envoy_types",
                ],
            ),
            (
                "redis-rs (and its parser combine)",
                &["redis::", "combine::"],
            ),
            ("tokio", &["tokio::"]),
            ("serde, serde_json", &["serde"]),
            ("sha2", &["sha2::"]),
            (
                "enforcer's own code (the daemon's, or the module's in Redis)",
                &["enforcer"],
            ),
        ];
        let mut shares: Vec<(&'static str, f64)> = vec![("the kernel", 0.0)];
        shares.extend(GROUPS.iter().map(|(g, _)| (*g, 0.0)));
        shares.push(("other", 0.0));
        for (share, kernel, name) in &self.functions {
            let at = if *kernel {
                0
            } else {
                GROUPS
                    .iter()
                    .enumerate()
                    .filter_map(|(i, (_, prefixes))| {
                        prefixes
                            .iter()
                            .filter_map(|p| name.find(p))
                            .min()
                            .map(|pos| (pos, i + 1))
                    })
                    .min()
                    .map_or(GROUPS.len() + 1, |(_, i)| i)
            };
            shares[at].1 += share;
        }
        shares
    }

    /// The report: samples, shares by group, and the `top` costliest functions.
    pub fn print(&self, what: &str, top: usize) {
        println!(
            "\nperf, {what}: {} samples; self time by group:",
            self.samples
        );
        for (group, share) in self.groups() {
            println!("  {share:>5.1} %  {group}");
        }
        println!("  the {top} costliest functions:");
        for (share, kernel, name) in self.functions.iter().take(top) {
            let short: String = name.chars().take(110).collect();
            let side = if *kernel { "[k]" } else { "[.]" };
            println!("  {share:>5.1} %  {side} {short}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_report_lines_are_read_and_grouped() {
        let text = "\
# Total Lost Samples: 0
#
# Samples: 12K of event 'cpu-clock:ppp'
# Event count (approx.): 12000000
#
# Overhead  Symbol
# ........  ......
#
    10.50%  [k] _raw_spin_unlock_irqrestore
     4.00%  [.] <hyper::proto::h1::role::Server as hyper::proto::h1::Http1Transaction>::encode
     3.00%  [.] <enforcer::store::redis::RedisStore as enforcer::store::TokenStore>::debit
     2.00%  [.] _mi_page_malloc_zero
     1.50%  [.] combine::parser::ParseMode::parse_committed
     0.50%  [.] 0x00007f0000001234
";
        let p = Profile::parse(text);
        assert_eq!(p.samples, "12K");
        assert_eq!(p.functions.len(), 6);
        assert!(p.functions[0].1, "the first is the kernel's");
        let groups: std::collections::HashMap<_, _> = p.groups().into_iter().collect();
        assert!((groups["the kernel"] - 10.5).abs() < 1e-9);
        // hyper's generic over nothing of ours, and the daemon's own impl, apart.
        assert!((groups["hyper, h2, http, axum, tonic, tower"] - 4.0).abs() < 1e-9);
        assert!(
            (groups["enforcer's own code (the daemon's, or the module's in Redis)"] - 3.0).abs()
                < 1e-9
        );
        assert!((groups["allocation (mimalloc)"] - 2.0).abs() < 1e-9);
        assert!((groups["redis-rs (and its parser combine)"] - 1.5).abs() < 1e-9);
        assert!((groups["other"] - 0.5).abs() < 1e-9);
    }
}
