//! The `enforcer` command line.
use crate::config::Config;
use crate::key::ApiKey;
use crate::server::{Server, shutdown_signal};
use crate::store::{RedisStore, RedisStoreConfig, TokenStore};
use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// enforcer: cost-weighted API token budgets, debited atomically in Redis, enforced down to the
/// kernel.
#[derive(Debug, Parser)]
#[command(name = "enforcer", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: the HTTP decision API, and the kernel gate when interfaces are given.
    Run(RunArgs),
    /// Work with config files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Work with API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
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
    /// Redis URL (overrides store.redis_url); empty or absent: the embedded in-process store.
    #[arg(long, env = "ENFORCER_REDIS_URL")]
    pub redis_url: Option<String>,
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
    /// Print the SHA-256 of a key: its name in Redis (`ptb:{<hash>}:…`) and in audit rows.
    Hash {
        /// The API key.
        key: String,
    },
    /// Assign a key to a tier (in Redis), or remove its assignment with --clear.
    SetTier {
        /// The API key.
        key: String,
        /// Tier name, as in the config's [tiers] (checked when --config is given).
        #[arg(required_unless_present = "clear")]
        tier: Option<String>,
        /// Remove the assignment: the key falls back to budget.unknown_keys.
        #[arg(long, conflicts_with = "tier")]
        clear: bool,
        /// Redis URL.
        #[arg(long, env = "ENFORCER_REDIS_URL")]
        redis_url: String,
        /// Config file to check the tier name against.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
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

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => {
            run(args)?;
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
        Command::Keys(KeysCommand::Hash { key }) => {
            println!("{}", ApiKey::parse(&key)?.hash());
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(KeysCommand::SetTier {
            key,
            tier,
            clear,
            redis_url,
            config,
        }) => {
            let config = match config {
                Some(path) => Config::load(&path)?,
                None => Config::default(),
            };
            let tier = if clear { None } else { tier };
            if let Some(name) = &tier
                && !config.tiers.contains_key(name)
            {
                bail!(
                    "unknown tier {name:?}; the config has: {}",
                    config.tiers.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            }
            let key = ApiKey::parse(&key)?;
            let store = RedisStore::new(
                &RedisStoreConfig {
                    url: redis_url,
                    connections: 1,
                    connect_timeout: Duration::from_secs(2),
                },
                &config.budget_policy(),
            )?;
            runtime()?.block_on(store.assign_tier(&key.hash(), tier.as_deref()))?;
            match tier {
                Some(t) => println!("key {} is now in tier {t}", key.hash()),
                None => println!("key {} has no tier assignment", key.hash()),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => {
            Config::load(path).with_context(|| format!("config {} is not valid", path.display()))?
        }
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(url) = args.redis_url {
        config.store.redis_url = url;
    }
    config.kernel.interfaces.extend(args.interfaces);
    config.kernel.protect_ports.extend(args.protect_ports);
    if let Some(dir) = args.pin_dir {
        config.kernel.pin_dir = dir;
    }
    let errors = config.validate();
    if !errors.is_empty() {
        bail!(
            "invalid settings:\n{}",
            errors
                .iter()
                .map(|e| format!("  {e}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // The daemon runs as a spawned task: a future driven by `block_on` itself would run on the
    // main thread, beside the worker threads, instead of on them.
    runtime_with(args.workers)?.block_on(async {
        tokio::spawn(async move {
            let server = Server::bind(&config).await?;
            let addr = server.local_addr()?;
            let backend = if config.store.redis_url.is_empty() {
                "embedded in-process store"
            } else {
                "redis"
            };
            tracing::info!(%addr, store = backend, "enforcer listening");
            server.run(shutdown_signal()).await?;
            Ok::<_, anyhow::Error>(())
        })
        .await
        .context("the daemon task panicked")?
    })
}
