//! The CLI side of the admin API ([`crate::admin`]): requests over the daemon's Unix socket
//! (reqwest, [`crate::http_client::unix`]), where API keys come from (stdin or a file, never argv), and how answers are
//! printed.
use crate::key::{ApiKey, MAX_KEY_LEN};
use anyhow::{Context as _, bail};
use clap::Args;
use serde_json::Value;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the daemon's admin socket is.
#[derive(Debug, Args)]
pub struct SocketArg {
    /// The daemon's admin socket (its `[server] admin_socket`).
    #[arg(
        long = "socket",
        env = "ENFORCER_ADMIN_SOCKET",
        default_value = crate::config::DEFAULT_ADMIN_SOCKET,
        value_name = "PATH"
    )]
    pub socket: PathBuf,
}

/// Which key: read from a file or stdin (never from the command line, where shell history and
/// `ps` would keep it), or named by its SHA-256.
#[derive(Debug, Args)]
pub struct KeyArg {
    /// Read the API key from this file (its one line); without --key-file or --key-hash the
    /// key is read from stdin.
    #[arg(long, value_name = "FILE", conflicts_with = "key_hash")]
    pub key_file: Option<PathBuf>,
    /// The key's SHA-256 (64 hex digits, from `enforcer keys hash` or an audit row) instead of
    /// the key.
    #[arg(long, value_name = "HEX")]
    pub key_hash: Option<String>,
}

/// A key as the admin API takes it.
#[derive(Debug)]
pub enum NamedKey {
    /// The key itself.
    Key(ApiKey),
    /// Its SHA-256, lower-case hex.
    Hash(String),
}

impl NamedKey {
    /// The JSON fields naming it (`key` or `key_hash`).
    pub fn fields(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        match self {
            NamedKey::Key(k) => m.insert("key".into(), Value::String(k.expose().to_owned())),
            NamedKey::Hash(h) => m.insert("key_hash".into(), Value::String(h.clone())),
        };
        m
    }

    /// The key's SHA-256 in hex.
    pub fn hash_hex(&self) -> String {
        match self {
            NamedKey::Key(k) => k.hash().to_hex(),
            NamedKey::Hash(h) => h.clone(),
        }
    }
}

impl KeyArg {
    /// The key, from the file, the hash, or stdin.
    pub fn read(&self) -> anyhow::Result<NamedKey> {
        if let Some(h) = &self.key_hash {
            if crate::admin::parse_hash(h).is_none() {
                bail!("--key-hash must be the key's SHA-256: 64 hex digits (enforcer keys hash)");
            }
            return Ok(NamedKey::Hash(h.trim().to_ascii_lowercase()));
        }
        let (text, from) = match &self.key_file {
            Some(path) if path.as_os_str() != "-" => (
                read_bounded(
                    std::fs::File::open(path)
                        .with_context(|| format!("reading the key from {}", path.display()))?,
                )?,
                path.display().to_string(),
            ),
            _ => {
                if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                    eprintln!("reading the API key from stdin (one line, then Enter and Ctrl-D)");
                }
                (read_bounded(std::io::stdin().lock())?, "stdin".to_owned())
            }
        };
        Ok(NamedKey::Key(
            parse_key_text(&text).with_context(|| format!("the API key from {from}"))?,
        ))
    }
}

/// At most a key's length and a line end, so a wrong file (a log, a binary) is refused quickly.
fn read_bounded(r: impl std::io::Read) -> anyhow::Result<String> {
    let mut buf = Vec::new();
    r.take(MAX_KEY_LEN as u64 + 3).read_to_end(&mut buf)?;
    if buf.len() > MAX_KEY_LEN + 2 {
        bail!("longer than an API key may be ({MAX_KEY_LEN} bytes)");
    }
    String::from_utf8(buf).context("not UTF-8 text")
}

/// One line holding the key; its line end is not part of it.
pub fn parse_key_text(text: &str) -> anyhow::Result<ApiKey> {
    let line = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(text);
    if line.contains('\n') {
        bail!("more than one line: give one key");
    }
    if line.is_empty() {
        bail!("empty: no key given");
    }
    Ok(ApiKey::parse(line)?)
}

/// Why the daemon could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket (no daemon, or it runs without the admin API).
    #[error(
        "no daemon answers on {path} ({source}); is it running, with [server] admin_socket \
         there (--socket / ENFORCER_ADMIN_SOCKET)?"
    )]
    NotRunning {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The daemon answered with an error.
    #[error("{message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The error code.
        code: String,
        /// The message.
        message: String,
    },
    /// Anything else.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// One call: `method path` with an optional JSON body; the JSON answer.
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, ClientError> {
    if socket.as_os_str().is_empty() {
        return Err(ClientError::NotRunning {
            path: socket.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no admin socket given: --socket, or ENFORCER_ADMIN_SOCKET, is empty",
            ),
        });
    }
    let (status, body) = crate::http_client::block_on(exchange(socket, method, path, body))
        .map_err(|e| ClientError::Other(anyhow::anyhow!("talking to the daemon: {e}")))??;
    let value: Value = serde_json::from_str(&body)
        .map_err(|e| anyhow::anyhow!("the daemon's answer is not JSON ({e}): {body}"))?;
    if status == 200 {
        return Ok(value);
    }
    Err(ClientError::Refused {
        status,
        code: value["error"]["code"]
            .as_str()
            .unwrap_or("error")
            .to_owned(),
        message: value["error"]["message"]
            .as_str()
            .map_or_else(|| body.clone(), str::to_owned),
    })
}

/// One HTTP exchange over the admin socket (reqwest's Unix-socket client): status and body.
async fn exchange(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, String), ClientError> {
    let other = |e: &dyn std::fmt::Display| {
        ClientError::Other(anyhow::anyhow!("talking to the daemon: {e}"))
    };
    let client =
        crate::http_client::unix(socket, Duration::from_secs(30)).map_err(|e| other(&e))?;
    let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| other(&e))?;
    {
        let mut request = client
            .request(method, format!("http://enforcer{path}"))
            .header("content-type", "application/json");
        if let Some(body) = body {
            request = request.body(body.to_string());
        }
        let response = request.send().await.map_err(|e| {
            if e.is_connect() {
                ClientError::NotRunning {
                    path: socket.to_owned(),
                    source: std::io::Error::other(connect_cause(&e)),
                }
            } else {
                other(&e)
            }
        })?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|e| other(&e))?;
        Ok((status, text))
    }
}

/// The innermost cause of a connection failure ("No such file or directory", "Connection
/// refused"): what tells an operator why no daemon answered.
fn connect_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// A JSON number or `-`.
pub fn num(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".to_owned(), |n| format!("{n:.3}"))
}

/// A JSON string or `-`.
pub fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

/// An answer's errors as the CLI reports them: the daemon's message; a refusal is exit code 1
/// like any error.
fn answer(result: Result<Value, ClientError>) -> anyhow::Result<Value> {
    result.map_err(|e| match e {
        ClientError::Refused { code, message, .. } => anyhow::anyhow!("{message} ({code})"),
        other => anyhow::Error::from(other),
    })
}

/// `enforcer status`.
pub fn status(socket: &Path, json: bool) -> anyhow::Result<std::process::ExitCode> {
    let v = answer(call(socket, "GET", "/v1/status", None))?;
    if json {
        println!("{v}");
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let store = &v["store"];
    println!("version:     {}", text(&v["version"]));
    if let Some(g) = v["generation"].as_u64() {
        println!("config:      generation {g}");
    }
    println!("uptime:      {} s", v["uptime_secs"]);
    println!(
        "store:       {} ({})",
        text(&store["backend"]),
        if store["reachable"].as_bool() == Some(true) {
            "reachable".to_owned()
        } else {
            format!("UNREACHABLE: {}", text(&store["error"]))
        }
    );
    if let Some(state) = store["state"].as_object() {
        println!("             {}", Value::Object(state.clone()));
    }
    println!(
        "breakers:    {} open of {} (worst: {})",
        store["breakers_open"],
        store["breakers"],
        text(&store["breaker_worst"])
    );
    let kernel = &v["kernel"];
    println!(
        "kernel gate: {} ({})",
        if kernel["attached"].as_bool() == Some(true) {
            "attached"
        } else {
            "not attached"
        },
        text(&kernel["detail"])
    );
    let l = &v["ledger"];
    println!(
        "ledger:      {} rows queued, {} bytes of spill backlog; spilled {}, quarantined {}, dropped {}",
        l["queue_depth"],
        l["backlog_bytes"],
        l["spilled_total"],
        l["quarantined_total"],
        l["dropped_total"]
    );
    Ok(std::process::ExitCode::SUCCESS)
}

/// `enforcer shadow on|off [--tier T]`.
pub fn shadow(
    socket: &Path,
    on: bool,
    tier: Option<&str>,
) -> anyhow::Result<std::process::ExitCode> {
    let v = answer(call(
        socket,
        "POST",
        "/v1/shadow",
        Some(&serde_json::json!({ "on": on, "tier": tier })),
    ))?;
    let scope = tier.map_or_else(
        || "global shadow mode".to_owned(),
        |t| format!("shadow mode of tier {t}"),
    );
    println!(
        "{scope} is {} (config generation {}); a reload or restart reads the file again",
        if on { "on" } else { "off" },
        v["generation"]
    );
    Ok(std::process::ExitCode::SUCCESS)
}

/// `enforcer reload`.
pub fn reload(socket: &Path) -> anyhow::Result<std::process::ExitCode> {
    let v = answer(call(socket, "POST", "/v1/reload", None))?;
    println!("reloaded: config generation {}", v["generation"]);
    let list = |field: &str| -> Vec<String> {
        v[field]
            .as_array()
            .map(|a| a.iter().map(|x| text(x).to_owned()).collect())
            .unwrap_or_default()
    };
    let changed = list("changed");
    if changed.is_empty() {
        println!("changed:  nothing");
    } else {
        println!("changed:  {}", changed.join(", "));
    }
    let restart = list("restart_required");
    if !restart.is_empty() {
        println!(
            "NOT applied, needs a restart: {} (the daemon serves the old values)",
            restart.join(", ")
        );
    }
    if let Some(g) = v["kernel_generation"].as_u64() {
        println!("kernel:   generation {g}");
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Whether a failure means no daemon answers (the kernel commands then use the pinned maps).
fn not_running(e: &ClientError) -> bool {
    matches!(e, ClientError::NotRunning { .. })
}

/// `enforcer keys …`.
pub fn keys(command: super::KeysCommand) -> anyhow::Result<std::process::ExitCode> {
    use super::KeysCommand;
    use serde_json::json;
    let ok = std::process::ExitCode::SUCCESS;
    match command {
        KeysCommand::Hash { key_file } => {
            let key = KeyArg {
                key_file,
                key_hash: None,
            }
            .read()?;
            println!("{}", key.hash_hex());
        }
        KeysCommand::Show { key, socket, json } => {
            let key = key.read()?;
            let v = answer(call(
                &socket.socket,
                "POST",
                "/v1/keys/show",
                Some(&Value::Object(key.fields())),
            ))?;
            if json {
                println!("{v}");
                return Ok(ok);
            }
            println!("key:         {}", text(&v["key_hash"]));
            match v["tier"].as_str() {
                Some(t) => println!(
                    "tier:        {t}{}",
                    match v["assigned"].as_str() {
                        Some(a) if a == t => " (assigned)".to_owned(),
                        Some(a) => format!(" (assigned {a:?}, which the config does not have)"),
                        None => " (default for keys without an assignment)".to_owned(),
                    }
                ),
                None => println!("tier:        none: unknown keys are refused"),
            }
            if let Some(b) = v["shared_budget"].as_str() {
                println!(
                    "budget:      shared budget {b} (balance, grants and quota are the budget's)"
                );
            }
            println!(
                "balance:     {}{}",
                num(&v["balance"]),
                if v["stored"].as_bool() == Some(true) {
                    ""
                } else {
                    " (no bucket stored: what a first request starts at)"
                }
            );
            for g in v["grants"].as_array().into_iter().flatten() {
                println!(
                    "grant:       {} left of {}, priority {}, expires {} (spent before the bucket)",
                    num(&g["left"]),
                    text(&g["id"]),
                    g["priority"],
                    g["expires_at"]
                        .as_f64()
                        .map_or_else(|| "never".to_owned(), crate::wallet::rfc3339)
                );
            }
            println!("operational: {}", num(&v["operational"]));
            if let Some(q) = v["quota"].as_object() {
                println!(
                    "quota:       {} used, {} left of {} this period; resets at {}",
                    num(&q["used"]),
                    num(&q["left"]),
                    num(&q["amount"]),
                    q["resets_at"]
                        .as_f64()
                        .and_then(|t| chrono::DateTime::from_timestamp(t as i64, 0))
                        .map_or_else(|| "?".to_owned(), |t| t.to_rfc3339())
                );
            }
            let k = &v["kernel"];
            match k["gate"].as_str() {
                Some("running") => {
                    match k["snapshot"].as_object() {
                        Some(s) => println!(
                            "kernel:      snapshot balance {} (refill {}/s), {} ms old{}",
                            num(&s["balance"]),
                            num(&s["refill_per_sec"]),
                            s["age_ms"],
                            if s["current_generation"].as_bool() == Some(true) {
                                ""
                            } else {
                                ", of another config generation (ignored)"
                            }
                        ),
                        None => println!("kernel:      no snapshot (the gate passes the key)"),
                    }
                    match k["blocked_for_ms"].as_u64() {
                        Some(ms) => println!("block:       {ms} ms left"),
                        None => println!("block:       none"),
                    }
                }
                other => println!("kernel:      {}", other.unwrap_or("-")),
            }
        }
        KeysCommand::SetTier {
            tier,
            clear,
            key,
            socket,
        } => {
            let key = key.read()?;
            let mut body = key.fields();
            let tier = if clear { None } else { tier };
            body.insert("tier".into(), json!(tier));
            let v = answer(call(
                &socket.socket,
                "POST",
                "/v1/keys/tier",
                Some(&Value::Object(body)),
            ))?;
            match &tier {
                Some(t) => println!("key {} is now in tier {t}", text(&v["key_hash"])),
                None => println!("key {} has no tier assignment", text(&v["key_hash"])),
            }
            println!("kernel: {}", text(&v["kernel"]));
        }
        KeysCommand::Grant {
            tokens,
            note,
            expires,
            priority,
            grant_id,
            key,
            socket,
        } => {
            let key = key.read()?;
            let grant_id =
                grant_id.unwrap_or_else(|| crate::key::RequestId::generate().as_str().to_owned());
            let mut body = key.fields();
            body.insert("tokens".into(), json!(tokens));
            body.insert("note".into(), json!(note));
            body.insert("grant_id".into(), json!(grant_id));
            if let Some(e) = expires {
                body.insert("expires_in_secs".into(), json!(e.as_secs_f64()));
            }
            if let Some(p) = priority {
                body.insert("priority".into(), json!(p));
            }
            let v = answer(call(
                &socket.socket,
                "POST",
                "/v1/keys/grant",
                Some(&Value::Object(body)),
            ))
            .with_context(|| format!("grant {grant_id}"))?;
            if v["replayed"].as_bool() == Some(true) {
                println!(
                    "grant {grant_id} was applied before: nothing added now; balance after it {}",
                    num(&v["balance"])
                );
            } else {
                println!(
                    "granted {} tokens to key {} (tier {}): balance now {}; grant id {grant_id}",
                    num(&v["granted"]),
                    text(&v["key_hash"]),
                    text(&v["tier"]),
                    num(&v["balance"])
                );
                if let Some(p) = v["priority"].as_i64() {
                    println!(
                        "held in the key's wallet, spent before its bucket: priority {p}, expires {}",
                        v["expires_at"].as_str().unwrap_or("never")
                    );
                }
            }
            println!("kernel: {}", text(&v["kernel"]));
        }
        KeysCommand::Block {
            duration,
            key_file,
            socket,
            pin_dir,
        } => {
            let key = read_key(key_file)?;
            let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
            if ms == 0 {
                bail!("--for must be at least 1ms");
            }
            let mut body = NamedKey::Key(key.clone()).fields();
            body.insert("duration_ms".into(), json!(ms));
            match call(
                &socket.socket,
                "POST",
                "/v1/keys/block",
                Some(&Value::Object(body)),
            ) {
                Ok(v) => println!(
                    "key {} blocked in this node's kernel gate for {}",
                    text(&v["key_hash"]),
                    super::kernel::human_duration(duration)
                ),
                Err(e) if not_running(&e) => {
                    eprintln!(
                        "{e}\nno daemon: blocking in the pinned maps at {} directly",
                        pin_dir.display()
                    );
                    super::kernel::block(&key, duration, &pin_dir, &mut std::io::stdout().lock())?;
                }
                Err(e) => return answer(Err(e)).map(|_| ok),
            }
        }
        KeysCommand::Unblock {
            key_file,
            socket,
            pin_dir,
        } => {
            let key = read_key(key_file)?;
            let body = NamedKey::Key(key.clone()).fields();
            match call(
                &socket.socket,
                "POST",
                "/v1/keys/unblock",
                Some(&Value::Object(body)),
            ) {
                Ok(v) if v["was_blocked"].as_bool() == Some(true) => {
                    println!("key {} unblocked", text(&v["key_hash"]));
                }
                Ok(v) => println!(
                    "key {} was not blocked in this node's kernel gate",
                    text(&v["key_hash"])
                ),
                Err(e) if not_running(&e) => {
                    eprintln!(
                        "{e}\nno daemon: unblocking in the pinned maps at {} directly",
                        pin_dir.display()
                    );
                    super::kernel::unblock(&key, &pin_dir, &mut std::io::stdout().lock())?;
                }
                Err(e) => return answer(Err(e)).map(|_| ok),
            }
        }
    }
    Ok(ok)
}

/// The raw key (the kernel needs it), from a file or stdin.
fn read_key(key_file: Option<PathBuf>) -> anyhow::Result<ApiKey> {
    match (KeyArg {
        key_file,
        key_hash: None,
    })
    .read()?
    {
        NamedKey::Key(k) => Ok(k),
        NamedKey::Hash(_) => unreachable!("no --key-hash given"),
    }
}
