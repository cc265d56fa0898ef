//! The `enforcer` command line.
//!
//! The kernel gate's commands (`kernel …`, `keys block|unblock`) are in [`kernel`].
use crate::config::Config;
use crate::reload::{ConfigSource, Overrides};
use crate::server::{Server, shutdown_signal};
use crate::trace::Traces;
use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

pub mod admin;
pub mod kernel;
pub mod shadow_report;

/// enforcer: cost-weighted API token budgets, debited atomically in Redis, enforced down to the
/// kernel.
#[derive(Debug, Parser)]
#[command(name = "enforcer", version, about, long_about = None)]
pub struct Cli {
    /// Log format on stderr: `text` for people, `json` for log pipelines (one JSON object per
    /// line: timestamp, level, fields, target). RUST_LOG filters either.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "ENFORCER_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (tracing-subscriber's JSON formatter).
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: the HTTP decision API, and the kernel gate when interfaces are given.
    Run(RunArgs),
    /// Work with config files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// A running daemon's state, through its admin socket: version, config generation, store,
    /// breakers, kernel gate, ledger backlog.
    Status {
        #[command(flatten)]
        socket: admin::SocketArg,
        /// Print the daemon's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Work with API keys (a running daemon's, through its admin socket). Keys are read from
    /// stdin or --key-file, never from the command line.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Shadow mode of a running daemon, global or one tier's: decide and record, always allow.
    /// Lasts until the next reload or restart (which read the config file).
    Shadow {
        /// on or off.
        #[arg(value_enum)]
        state: OnOff,
        /// Only this tier (default: global shadow mode, `budget.shadow`).
        #[arg(long)]
        tier: Option<String>,
        #[command(flatten)]
        socket: admin::SocketArg,
    },
    /// Make a running daemon read its config file again (as SIGHUP does). The file is
    /// validated first: on any error the daemon keeps its config and the errors are printed.
    Reload {
        #[command(flatten)]
        socket: admin::SocketArg,
    },
    /// Inspect, detach or re-attach the kernel gate of this node (root; works on the pinned
    /// maps and the kernel's links).
    #[command(subcommand)]
    Kernel(KernelCommand),
    /// Apply the audit ledger's migrations (migrations/, embedded) to PostgreSQL.
    Migrate {
        /// PostgreSQL URL.
        #[arg(long, env = "ENFORCER_DATABASE_URL")]
        database_url: String,
    },
    /// The audit ledger: partitions, imports, usage and exports for billing and disputes.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Every endpoint's price now, from a running daemon (`GET /v1/costs`), as a table.
    Costs {
        /// The daemon's HTTP API address, `host:port` (a name such as `localhost:8080` is
        /// resolved).
        #[arg(long, default_value = "127.0.0.1:8080", env = "ENFORCER_ADDR")]
        addr: String,
        /// Print the JSON as the daemon sends it.
        #[arg(long)]
        json: bool,
    },
}

/// `enforcer audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Monthly partitions of `token_transactions`.
    #[command(subcommand)]
    Partitions(PartitionsCommand),
    /// Load ledger files (the embedded default's, rotated ones compressed with gzip, or a
    /// spill file) into PostgreSQL, one after the other. Rows already there are skipped, so
    /// importing twice adds nothing; it prints the rows read, inserted and already present per
    /// file. Rows PostgreSQL refuses for their data are written to a quarantine file, the rest
    /// imported; the command then fails.
    Import {
        /// The JSON-lines ledger files, plain or gzip (`enforcer-ledger.*.jsonl.gz
        /// enforcer-ledger.jsonl`: oldest first).
        #[arg(required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// PostgreSQL URL.
        #[arg(long, env = "ENFORCER_DATABASE_URL")]
        database_url: String,
        /// Where refused rows go (appended); default: each FILE with the extension
        /// `.quarantine.jsonl` (`ledger.jsonl` → `ledger.quarantine.jsonl`,
        /// `ledger.20261203T081500Z.jsonl.gz` → `ledger.20261203T081500Z.quarantine.jsonl`).
        #[arg(long)]
        quarantine: Option<PathBuf>,
    },
    /// A key's usage: decisions, allowed decisions, refunds, tokens charged net of refunds,
    /// and tokens granted. The key is read from stdin or --key-file (and hashed here, as in
    /// the ledger), or named by --key-hash.
    Usage {
        #[command(flatten)]
        key: admin::KeyArg,
        /// How far back: `90s`, `10m`, `24h`, `30d`.
        #[arg(long, value_parser = parse_duration, default_value = "24h")]
        since: Duration,
        /// Group by endpoint or by hour (UTC); without it, one total.
        #[arg(long, value_enum)]
        by: Option<UsageGroup>,
        /// PostgreSQL URL.
        #[arg(long, env = "ENFORCER_DATABASE_URL")]
        database_url: String,
    },
    /// Are prices proportional to cost? Compares each endpoint's tokens charged (the ledger)
    /// with the CPU-seconds its backends spent (Prometheus) over the window, prints tokens per
    /// CPU-second, their spread, the calibration error and a proposed base_cost per endpoint.
    /// Changes nothing; with --write, saves the proposal as a diff of the config to review.
    Calibrate(CalibrateArgs),
    /// Every decision since a time, oldest first, to stdout (times in UTC).
    Export {
        /// How far back: `90s`, `10m`, `24h`, `30d`.
        #[arg(long, value_parser = parse_duration)]
        since: Duration,
        /// Output format.
        #[arg(long, value_enum, default_value = "csv")]
        format: ExportFormat,
        /// PostgreSQL URL.
        #[arg(long, env = "ENFORCER_DATABASE_URL")]
        database_url: String,
    },
    /// The shadow candidate policy (`[shadow]`) against the enforced one, over the decisions
    /// both decided: per tier and endpoint, requests, tokens charged and denials old vs new,
    /// the keys the candidate would newly deny (top N, by hashed key), and the estimated
    /// change in denials per hour (per hour of the span the rows cover).
    ShadowReport(shadow_report::ShadowReportArgs),
}

/// `enforcer audit partitions …`
#[derive(Debug, Subcommand)]
pub enum PartitionsCommand {
    /// Create last month's, this month's and the next months' partitions, and those of any
    /// month with rows in the default partition (moving the rows in).
    Ensure {
        /// Months ahead of the current one.
        #[arg(long, default_value_t = 2)]
        ahead: u32,
        /// Also drop partitions older than this many months (0: keep all).
        #[arg(long, default_value_t = 0)]
        retention_months: u32,
        /// PostgreSQL URL.
        #[arg(long, env = "ENFORCER_DATABASE_URL")]
        database_url: String,
    },
}

/// `on` / `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    /// On.
    On,
    /// Off.
    Off,
}

/// `--by` of `enforcer audit usage`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum UsageGroup {
    /// One line per endpoint.
    Endpoint,
    /// One line per hour (UTC).
    Hour,
}

/// `enforcer audit calibrate`
#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// The config whose cost matrix is calibrated (its endpoints, `[pricing.calibration]`
    /// and `[pricing.prometheus]`).
    #[arg(long, short)]
    pub config: PathBuf,
    /// How far back: `90s`, `10m`, `24h`, `30d`.
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    pub since: Duration,
    /// Prometheus base URL (http:// or https://); default: `[pricing.prometheus] url`.
    #[arg(long, value_name = "URL")]
    pub prometheus: Option<String>,
    /// PEM CA file trusted for Prometheus (default: `[pricing.prometheus] ca_file`).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Bearer token file for Prometheus (default: the config's auth).
    #[arg(long)]
    pub bearer_token_file: Option<PathBuf>,
    /// Basic-auth user for Prometheus, with --password-file (default: the config's auth).
    #[arg(long, requires = "password_file")]
    pub username: Option<String>,
    /// Basic-auth password file for Prometheus.
    #[arg(long, requires = "username")]
    pub password_file: Option<PathBuf>,
    /// PromQL of an endpoint's CPU-seconds over `$window` (`$method`, `$path` replaced);
    /// default: `[pricing.calibration] cpu_seconds_query`, or the endpoint's own.
    #[arg(long, value_name = "PROMQL")]
    pub query: Option<String>,
    /// Bound on each Prometheus query, seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: ReportFormat,
    /// Write the proposal as a unified diff to CONFIG.calibration.diff (apply it with
    /// `patch CONFIG < CONFIG.calibration.diff` after review, then `enforcer reload`).
    #[arg(long)]
    pub write: bool,
    /// PostgreSQL URL.
    #[arg(long, env = "ENFORCER_DATABASE_URL")]
    pub database_url: String,
}

/// `--format` of reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    /// Aligned columns for people.
    Table,
    /// One JSON document.
    Json,
}

/// `--format` of `enforcer audit export`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ExportFormat {
    /// Comma-separated, with a header line.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

/// `enforcer kernel …`
#[derive(Debug, Subcommand)]
pub enum KernelCommand {
    /// Where the gate runs (live links, asked of the kernel), stale pins, the operator's
    /// switch, config generation, daemon heartbeat, map fill and counters.
    Status {
        /// Where the daemon pinned the gate's maps.
        #[arg(long, default_value = enforcer_common::names::PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Switch the gate off on one interface, or on all: its links are detached at once (even
    /// one a running daemon holds), and no daemon attaches there again, now or after a
    /// restart, until `enforcer kernel attach`. The maps stay.
    Detach {
        /// Only this interface (a name in this network namespace).
        #[arg(long = "iface")]
        iface: Option<String>,
        /// Where the daemon pinned the gate.
        #[arg(long, default_value = enforcer_common::names::PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Lift an operator's detach: a running daemon attaches the gate again at its next
    /// heartbeat, a stopped one when it starts.
    Attach {
        /// Only this interface.
        #[arg(long = "iface")]
        iface: Option<String>,
        /// Where the daemon pinned the gate.
        #[arg(long, default_value = enforcer_common::names::PIN_DIR)]
        pin_dir: PathBuf,
    },
}

/// `enforcer run`
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Config file (TOML); see docs/configuration.md. Without it, built-in defaults.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Address of the HTTP API (overrides server.listen).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Address of Envoy's rate-limit API and gRPC health (overrides server.grpc_listen;
    /// default 127.0.0.1:8081); "" serves no gRPC.
    #[arg(long, env = "ENFORCER_GRPC_LISTEN", value_name = "ADDR")]
    pub grpc_listen: Option<String>,
    /// The admin API's Unix socket (overrides server.admin_socket; default
    /// /run/enforcer/admin.sock); "" serves none.
    #[arg(long, env = "ENFORCER_ADMIN_SOCKET", value_name = "PATH")]
    pub admin_socket: Option<String>,
    /// Redis URL (overrides store.redis_url); empty or absent: the embedded in-process store.
    #[arg(long, env = "ENFORCER_REDIS_URL")]
    pub redis_url: Option<String>,
    /// A seed node of a Redis Cluster, `redis://host:port` (repeatable; replaces
    /// store.redis_cluster). The environment takes a comma-separated list.
    #[arg(
        long = "redis-cluster",
        env = "ENFORCER_REDIS_CLUSTER",
        value_delimiter = ',',
        value_name = "URL"
    )]
    pub redis_cluster: Vec<String>,
    /// Attach the kernel gate to this interface's ingress (repeatable; adds to kernel.interfaces).
    #[arg(long = "iface")]
    pub interfaces: Vec<String>,
    /// TCP port the kernel gate protects (repeatable; adds to kernel.protect_ports).
    #[arg(long = "protect-port")]
    pub protect_ports: Vec<u16>,
    /// Where the kernel gate's maps are pinned (overrides kernel.pin_dir).
    #[arg(long)]
    pub pin_dir: Option<String>,
    /// Worker threads of the async runtime (default: one per CPU).
    #[arg(long, env = "ENFORCER_WORKERS")]
    pub workers: Option<usize>,
    /// PostgreSQL URL of the audit ledger (overrides ledger.database_url); absent: rows go
    /// to the local ledger file.
    #[arg(long, env = "ENFORCER_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Apply the ledger's migrations at start (sets ledger.migrate).
    #[arg(long)]
    pub migrate: bool,
    /// The local ledger / spill file (overrides ledger.file).
    #[arg(long, env = "ENFORCER_LEDGER_FILE")]
    pub ledger_file: Option<String>,
    /// OTLP/HTTP receiver of the daemon's traces (overrides telemetry.otlp_endpoint); ""
    /// exports none.
    #[arg(long, env = "ENFORCER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

/// `enforcer config …`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file and report every error with its field path.
    Check {
        /// The file.
        file: PathBuf,
    },
}

/// `enforcer keys …`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print the SHA-256 of a key (read from stdin or --key-file): its name in Redis
    /// (`ptb:{<hash>}:…`) and in audit rows.
    Hash {
        /// Read the key from this file (its one line); default: stdin.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
    },
    /// A key's tier, balance now, operational bucket, and this node's kernel snapshot and
    /// block.
    Show {
        #[command(flatten)]
        key: admin::KeyArg,
        #[command(flatten)]
        socket: admin::SocketArg,
        /// Print the daemon's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Assign a key to a tier of the config the daemon serves, or remove its assignment with
    /// --clear (the key then falls back to budget.unknown_keys). Works on every store; this
    /// node's kernel gate follows at once (other nodes' at the key's next decision there).
    SetTier {
        /// Tier name, as in the daemon's [tiers] (checked by the daemon).
        #[arg(required_unless_present = "clear")]
        tier: Option<String>,
        /// Remove the assignment.
        #[arg(long, conflicts_with = "tier")]
        clear: bool,
        #[command(flatten)]
        key: admin::KeyArg,
        #[command(flatten)]
        socket: admin::SocketArg,
    },
    /// Grant tokens to a key (a prepaid top-up, a goodwill credit): added to its balance
    /// atomically, up to its tier's grant_ceiling (else nothing is granted), recorded in the
    /// audit ledger with the note and your uid. Without --expires and --priority the tokens
    /// top up the tier bucket (spent last, kept for ever); with either, the grant is kept
    /// apart in the key's wallet and spent first: highest priority, then the one that expires
    /// first, then the oldest. An expired grant's remaining tokens are forfeited (a
    /// `grant_expiry` ledger row).
    Grant {
        /// Tokens to add.
        tokens: f64,
        /// Why (the audit row's note; required).
        #[arg(long)]
        note: String,
        /// The grant expires this long after it is made (store time): `30d`, `12h`, `90m`.
        #[arg(long, value_parser = parse_duration)]
        expires: Option<Duration>,
        /// Spend priority among the key's wallet grants: higher is spent first (default 0
        /// when --expires is given).
        #[arg(long, allow_hyphen_values = true)]
        priority: Option<i64>,
        /// Id of this grant: the same id again is a replay, never a second grant (default: a
        /// new one, printed, to retry with if the answer was lost).
        #[arg(long)]
        grant_id: Option<String>,
        #[command(flatten)]
        key: admin::KeyArg,
        #[command(flatten)]
        socket: admin::SocketArg,
    },
    /// Block a key in this node's kernel gate for a while (e.g. `--for 10m`; ms, s, m, h, d).
    /// Through the daemon; when no daemon answers, in the pinned maps directly.
    Block {
        /// How long: `500ms`, `90s`, `10m`, `2h`, `1d`.
        #[arg(long = "for", value_parser = parse_duration)]
        duration: Duration,
        /// Read the key from this file (its one line); default: stdin.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        #[command(flatten)]
        socket: admin::SocketArg,
        /// Where the gate's maps are pinned (used when no daemon answers).
        #[arg(long, default_value = enforcer_common::names::PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Lift a key's block in this node's kernel gate (through the daemon, else in the pinned
    /// maps directly).
    Unblock {
        /// Read the key from this file (its one line); default: stdin.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        #[command(flatten)]
        socket: admin::SocketArg,
        /// Where the gate's maps are pinned (used when no daemon answers).
        #[arg(long, default_value = enforcer_common::names::PIN_DIR)]
        pin_dir: PathBuf,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format;
    // The daemon's traces go out through the tracing subscriber: set up with it, from the
    // config the daemon will run with.
    let traces = match &cli.command {
        Command::Run(args) => daemon_traces(args),
        _ => Ok(None),
    };
    init_tracing(format, traces.as_ref().ok().and_then(Option::as_ref));
    let result = traces
        .context("traces ([telemetry])")
        .and_then(|traces| dispatch(cli, traces));
    match result {
        Ok(code) => code,
        // `enforcer kernel status | head`: the reader is gone, nobody is left to tell.
        Err(e) if kernel::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            match format {
                LogFormat::Text => eprintln!("error: {e:#}"),
                // A log pipeline reads stderr line by line as JSON: the last word too.
                LogFormat::Json => tracing::error!(error = format!("{e:#}"), "enforcer failed"),
            }
            ExitCode::FAILURE
        }
    }
}

/// The traces `enforcer run` will export, if its config (file and overrides) names a
/// receiver. A config that does not load has none: `run` reports its errors.
fn daemon_traces(args: &RunArgs) -> Result<Option<Traces>, crate::trace::TraceError> {
    match args.source().load() {
        Ok(config) => Traces::new(&config.telemetry),
        Err(_) => Ok(None),
    }
}

fn init_tracing(format: LogFormat, traces: Option<&Traces>) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The trace spans exist only when they are exported (crate::trace).
    if let Some(directive) = crate::trace::directive(traces.is_some()) {
        filter = filter.add_directive(directive);
    }
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(traces.map(Traces::layer))
        .try_init();
    match format {
        LogFormat::Text => {}
        LogFormat::Json => {
            // A panic's default message is plain text on stderr: make it one JSON line as well.
            std::panic::set_hook(Box::new(|info| {
                let location = info
                    .location()
                    .map(|l| format!("{}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                let payload = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(panic = payload, location, "panicked");
            }));
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    runtime_with(None)
}

fn runtime_with(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n.max(1));
    }
    builder
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn dispatch(cli: Cli, traces: Option<Traces>) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => {
            run(args, traces)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Check { file }) => match Config::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{}: invalid", file.display());
                for line in e.to_string().lines() {
                    eprintln!("  {line}");
                }
                Ok(ExitCode::from(2))
            }
        },
        Command::Kernel(KernelCommand::Status { pin_dir }) => {
            kernel::status(&pin_dir, &mut std::io::stdout().lock())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Kernel(KernelCommand::Detach { iface, pin_dir }) => {
            kernel::detach(&pin_dir, iface.as_deref(), &mut std::io::stdout().lock())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Kernel(KernelCommand::Attach { iface, pin_dir }) => {
            kernel::attach(&pin_dir, iface.as_deref(), &mut std::io::stdout().lock())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(command) => admin::keys(command),
        Command::Status { socket, json } => admin::status(&socket.socket, json),
        Command::Shadow {
            state,
            tier,
            socket,
        } => admin::shadow(&socket.socket, state == OnOff::On, tier.as_deref()),
        Command::Reload { socket } => admin::reload(&socket.socket),
        Command::Migrate { database_url } => {
            runtime()?.block_on(async {
                let pool = ledger_pool(&database_url)?;
                crate::ledger::postgres::migrate(&pool).await?;
                let applied = crate::ledger::postgres::MIGRATOR.iter().count();
                println!("migrations applied ({applied} in total)");
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Costs { addr, json } => {
            let body = http_get(&addr, "/v1/costs")?;
            if json {
                println!("{body}");
                return Ok(ExitCode::SUCCESS);
            }
            let costs: Vec<crate::pricing::Cost> =
                serde_json::from_str(&body).context("the daemon's /v1/costs answer")?;
            println!(
                "{:<32} {:<7} {:>10} {:>10} {:>12}  {:<11} updated",
                "endpoint", "method", "base", "multiplier", "price", "source"
            );
            for c in costs {
                println!(
                    "{:<32} {:<7} {:>10.3} {:>10.4} {:>12.4}  {:<11} {}",
                    c.endpoint,
                    c.method,
                    c.base_cost,
                    c.multiplier,
                    c.price,
                    c.source,
                    c.updated_at
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(command) => {
            runtime()?.block_on(audit(command))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A GET of the daemon's HTTP API at `addr` (`host:port`); the body, or an error with the
/// status.
fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let client = crate::http_client::remote(None, Duration::from_secs(5))?;
    let url = format!("http://{addr}{path}");
    let request = async {
        let response = client.get(&url).send().await?;
        let status = response.status();
        Ok::<_, reqwest::Error>((status, response.text().await?))
    };
    let (status, body) = crate::http_client::block_on(request)?.map_err(|e| {
        anyhow::anyhow!(
            "connecting to the daemon at {addr}: {}",
            crate::http_client::error_chain(&e)
        )
    })?;
    if !status.is_success() {
        bail!("{path}: HTTP {}: {body}", status.as_u16());
    }
    Ok(body)
}

/// `1 row`, `2 rows`.
fn rows(n: u64) -> String {
    if n == 1 {
        "1 row".to_owned()
    } else {
        format!("{n} rows")
    }
}

/// `enforcer audit calibrate`.
async fn calibrate(args: CalibrateArgs) -> anyhow::Result<()> {
    use crate::http_client::{Auth, Secret};
    use crate::pricing::calibrate;
    let config =
        Config::load(&args.config).with_context(|| format!("reading {}", args.config.display()))?;
    let prom = &config.pricing.prometheus;
    let url = args.prometheus.clone().unwrap_or_else(|| prom.url.clone());
    if url.is_empty() {
        bail!("no Prometheus: give --prometheus URL, or set [pricing.prometheus] url");
    }
    let ca_file = args
        .ca_file
        .clone()
        .or_else(|| (!prom.ca_file.is_empty()).then(|| PathBuf::from(&prom.ca_file)));
    let auth = match (&args.bearer_token_file, &args.username, &args.password_file) {
        (Some(token), _, _) => Auth::Bearer(Secret::File(token.clone())),
        (None, Some(username), Some(password)) => Auth::Basic {
            username: username.clone(),
            password: Secret::File(password.clone()),
        },
        _ => prom.auth(),
    };
    let prometheus = crate::pricing::telemetry::Prometheus::with(
        &url,
        ca_file.as_deref(),
        auth,
        Duration::from_secs(args.timeout_secs.max(1)),
    );
    let template = args
        .query
        .clone()
        .unwrap_or_else(|| config.pricing.calibration.cpu_seconds_query.clone());
    let pool = ledger_pool(&args.database_url)?;
    let to_us = crate::ledger::now_us();
    let from_us = to_us - i64::try_from(args.since.as_micros()).unwrap_or(i64::MAX / 2);
    let result = calibrate::Calibrator {
        config: &config,
        pool: &pool,
        prometheus: &prometheus,
        template: &template,
    }
    .run(from_us, to_us)
    .await?;
    match args.format {
        ReportFormat::Json => println!("{}", serde_json::to_string_pretty(&result)?),
        ReportFormat::Table => print_calibration(&result),
    }
    if args.write {
        let path = args.config.display().to_string();
        let text =
            std::fs::read_to_string(&args.config).with_context(|| format!("reading {path}"))?;
        let new = calibrate::rewrite_config(&text, &result)?;
        let diff_path = PathBuf::from(format!("{path}.calibration.diff"));
        if new == text {
            eprintln!("the proposal changes nothing in {path}: no diff written");
        } else {
            let diff = calibrate::proposal_diff(&path, &text, &new);
            std::fs::write(&diff_path, &diff)
                .with_context(|| format!("writing {}", diff_path.display()))?;
            eprint!("{diff}");
            eprintln!(
                "proposal written to {} ({path} is unchanged): review it, then \
                 `patch {path} < {}` and `enforcer reload`",
                diff_path.display(),
                diff_path.display()
            );
        }
    }
    Ok(())
}

/// The table of `enforcer audit calibrate`.
fn print_calibration(c: &crate::pricing::calibrate::Calibration) {
    let pct = |v: f64| format!("{:+.1}%", v * 100.0);
    println!(
        "{:<8} {:<32} {:>10} {:>10} {:>14} {:>12} {:>14} {:>9} {:>10} {:>9}",
        "method",
        "endpoint",
        "requests",
        "base_cost",
        "tokens",
        "cpu seconds",
        "tokens/cpu-s",
        "error",
        "proposed",
        "after"
    );
    for e in &c.endpoints {
        println!(
            "{:<8} {:<32} {:>10} {:>10} {:>14.3} {:>12.3} {:>14.3} {:>9} {:>10} {:>9}",
            e.method,
            e.path,
            e.requests,
            e.base_cost,
            e.tokens,
            e.cpu_seconds,
            e.tokens_per_cpu_second,
            pct(e.error),
            e.proposed_base_cost,
            pct(e.error_after)
        );
    }
    for s in &c.skipped {
        println!("{:<8} {:<32} skipped: {}", s.method, s.path, s.reason);
    }
    println!(
        "reference: {:.3} tokens per CPU-second; spread (highest / lowest): {:.2}x",
        c.reference_tokens_per_cpu_second, c.spread
    );
    let summary = |name: &str, e: &crate::pricing::calibrate::ErrorSummary| {
        println!(
            "calibration error {name}: max ±{:.1}%, CPU-weighted mean {:.1}%",
            e.max_abs * 100.0,
            e.weighted_mean_abs * 100.0
        );
    };
    summary("now", &c.error_before);
    summary("with the proposal (same window)", &c.error_after);
    match &c.error_out_of_sample {
        Some(e) => summary("out of sample (fitted on the first half, on the second)", e),
        None => println!(
            "calibration error out of sample: not enough data in both halves of the window"
        ),
    }
}

fn ledger_pool(url: &str) -> anyhow::Result<sqlx::PgPool> {
    crate::ledger::postgres::pool(url).context("PostgreSQL URL")
}

async fn audit(command: AuditCommand) -> anyhow::Result<()> {
    use crate::ledger::postgres;
    match command {
        AuditCommand::Partitions(PartitionsCommand::Ensure {
            ahead,
            retention_months,
            database_url,
        }) => {
            let pool = ledger_pool(&database_url)?;
            let created = postgres::ensure_partitions(&pool, ahead).await?;
            let dropped = postgres::apply_retention(&pool, retention_months).await?;
            if created.is_empty() {
                println!("partitions: all present");
            }
            for p in created {
                println!("created {p}");
            }
            for p in dropped {
                println!("dropped {p}");
            }
        }
        AuditCommand::Import {
            files,
            database_url,
            quarantine,
        } => {
            let pool = ledger_pool(&database_url)?;
            let mut problems = Vec::new();
            for file in &files {
                let q_path = quarantine.clone().unwrap_or_else(|| {
                    // `x.jsonl.gz` → `x.quarantine.jsonl`, as for `x.jsonl`.
                    let plain = if file.extension().is_some_and(|e| e == "gz") {
                        file.with_extension("")
                    } else {
                        file.clone()
                    };
                    crate::ledger::quarantine::path_for(&plain)
                });
                let mut q = crate::ledger::quarantine::Quarantine::new(q_path.clone(), true);
                let done = postgres::import(&pool, file, &mut q).await?;
                // PostgreSQL's own counts: what this import added, and what was there already.
                let mut summary = format!(
                    "{}: {} read: {} inserted, {} already present",
                    file.display(),
                    rows(done.read),
                    done.inserted,
                    done.already_present()
                );
                if done.quarantined > 0 {
                    summary.push_str(&format!(", {} refused", done.quarantined));
                }
                println!("{summary}");
                if done.quarantined > 0 {
                    problems.push(format!(
                        "{}: {} refused by PostgreSQL for their data (not imported): written to \
                         {} with PostgreSQL's error",
                        file.display(),
                        rows(done.quarantined),
                        q_path.display()
                    ));
                }
                if done.corrupt > 0 {
                    problems.push(format!(
                        "{}: {} unreadable lines skipped",
                        file.display(),
                        done.corrupt
                    ));
                }
            }
            if !problems.is_empty() {
                bail!("{}", problems.join("; "));
            }
        }
        AuditCommand::Usage {
            key,
            since,
            by,
            database_url,
        } => {
            let hash = key.read()?.hash_hex();
            let by = match by {
                None => postgres::UsageBy::Total,
                Some(UsageGroup::Endpoint) => postgres::UsageBy::Endpoint,
                Some(UsageGroup::Hour) => postgres::UsageBy::Hour,
            };
            let pool = ledger_pool(&database_url)?;
            let lines = postgres::usage(&pool, &hash, since, by).await?;
            let label = match by {
                postgres::UsageBy::Total => "",
                postgres::UsageBy::Endpoint => "endpoint",
                postgres::UsageBy::Hour => "hour (UTC)",
            };
            // "tokens charged" is what the checks charged (a reservation's estimate), "tokens
            // settled" the same once settles charged the true costs; "paid by grants" is the
            // part of the charges wallet grants paid, "grants expired" what they forfeited;
            // "reservations" counts the checks that waited for a settle, "unsettled" those of
            // them that expired without one (keeping their estimates).
            println!(
                "{label:<32} {:>10} {:>10} {:>10} {:>14} {:>14} {:>14} {:>14} {:>14} {:>12} {:>10}",
                "decisions",
                "allowed",
                "refunds",
                "tokens charged",
                "tokens granted",
                "tokens settled",
                "paid by grants",
                "grants expired",
                "reservations",
                "unsettled"
            );
            for u in lines {
                println!(
                    "{:<32} {:>10} {:>10} {:>10} {:>14.3} {:>14.3} {:>14.3} {:>14.3} {:>14.3} {:>12} {:>10}",
                    u.group,
                    u.decisions,
                    u.allowed,
                    u.refunds,
                    u.cost,
                    u.granted,
                    u.settled,
                    u.from_grants,
                    u.expired,
                    u.reservations,
                    u.reservations_expired
                );
            }
        }
        AuditCommand::Calibrate(args) => calibrate(args).await?,
        AuditCommand::Export {
            since,
            format,
            database_url,
        } => {
            use std::io::Write as _;
            let pool = ledger_pool(&database_url)?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            if matches!(format, ExportFormat::Csv) {
                writeln!(out, "{}", postgres::EXPORT_COLUMNS.join(","))?;
            }
            let n = postgres::export(&pool, since, |values| match format {
                ExportFormat::Csv => {
                    let fields: Vec<String> = values
                        .iter()
                        .map(|v| csv_field(v.as_deref().unwrap_or("")))
                        .collect();
                    writeln!(out, "{}", fields.join(","))
                }
                ExportFormat::Jsonl => {
                    let object: serde_json::Map<String, serde_json::Value> =
                        postgres::EXPORT_COLUMNS
                            .iter()
                            .zip(values)
                            .map(|(k, v)| ((*k).to_owned(), json_value(k, v.as_deref())))
                            .collect();
                    writeln!(out, "{}", serde_json::Value::Object(object))
                }
            })
            .await?;
            out.flush()?;
            eprintln!("{n} rows");
        }
        AuditCommand::ShadowReport(args) => shadow_report::run(args).await?,
    }
    Ok(())
}

/// An exported value as JSON: numbers and booleans typed, the rest strings.
fn json_value(column: &str, v: Option<&str>) -> serde_json::Value {
    use serde_json::Value;
    let Some(v) = v else { return Value::Null };
    match column {
        "units" | "cost" | "multiplier" | "remaining" | "true_cost" | "candidate_cost" => v
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or_else(|| Value::String(v.to_owned()), Value::Number),
        "allowed" | "candidate_allowed" => Value::Bool(v == "true"),
        _ => Value::String(v.to_owned()),
    }
}

/// A CSV field, quoted when it has to be (RFC 4180).
fn csv_field(v: &str) -> String {
    if v.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_owned()
    }
}

/// `90s`, `10m`, `2h`, `1d`, `500ms`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?}: give a unit (ms, s, m, h, d)"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: not a number followed by a unit"))?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m, h, d)")),
    };
    Ok(Duration::from_secs(secs))
}

impl RunArgs {
    /// The config's source: the file and the overrides of this command line, applied at start
    /// and again at every reload (SIGHUP, `enforcer reload`).
    pub fn source(&self) -> ConfigSource {
        ConfigSource {
            path: self.config.clone(),
            overrides: Overrides {
                listen: self.listen,
                grpc_listen: self.grpc_listen.clone(),
                admin_socket: self.admin_socket.clone(),
                redis_url: self.redis_url.clone(),
                redis_cluster: self.redis_cluster.clone(),
                interfaces: self.interfaces.clone(),
                protect_ports: self.protect_ports.clone(),
                pin_dir: self.pin_dir.clone(),
                database_url: self.database_url.clone(),
                migrate: self.migrate,
                ledger_file: self.ledger_file.clone(),
                otlp_endpoint: self.otlp_endpoint.clone(),
            },
        }
    }
}

fn run(args: RunArgs, mut traces: Option<Traces>) -> anyhow::Result<()> {
    let source = args.source();
    // Every error of the file and the overrides, before a runtime starts.
    let config = source.load()?;
    if traces.is_some() {
        let t = &config.telemetry;
        tracing::info!(
            endpoint = %t.otlp_endpoint,
            sample_ratio = t.sample_ratio,
            service = %t.service_name,
            "traces: exporting over OTLP/HTTP"
        );
    }
    // The daemon runs as a spawned task: a future driven by `block_on` itself would run on the
    // main thread, beside the worker threads, instead of on them.
    runtime_with(args.workers)?.block_on(async {
        tokio::spawn(async move {
            if let Some(traces) = &mut traces {
                traces.start();
            }
            // Before anything is bound and "listening" is logged: see `shutdown_signal`.
            let shutdown = shutdown_signal().context("cannot handle SIGTERM/SIGINT")?;
            let server = Server::bind_from(source).await?;
            let config = server.config();
            let addr = server.local_addr()?;
            let backend = if !config.store.redis_cluster.is_empty() {
                "redis cluster"
            } else if config.store.redis_url.is_empty() {
                "embedded in-process store"
            } else {
                "redis"
            };
            let grpc = server
                .grpc_addr()
                .map_or_else(|| "off".to_owned(), |a| a.to_string());
            tracing::info!(%addr, %grpc, store = backend, "enforcer listening");
            let served = server.run(shutdown).await;
            // After the workers stopped (the last spans are theirs); bounded, whatever the
            // receiver does.
            if let Some(traces) = traces {
                traces.shutdown().await;
            }
            served?;
            Ok::<_, anyhow::Error>(())
        })
        .await
        .context("the daemon task panicked")?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("5y").is_err());
    }
}
