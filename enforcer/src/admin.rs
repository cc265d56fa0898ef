//! The admin API: what an operator does to a running daemon, on a Unix socket only.
//!
//! `[server] admin_socket` (default `/run/enforcer/admin.sock`) is created mode 0600 in a
//! directory the daemon makes 0700, and every connection's peer is checked again with
//! `SO_PEERCRED`: only root and the daemon's own user are served. Nothing here is reachable over
//! TCP. The `enforcer` CLI is the client (`status`, `keys show|set-tier|grant|block|unblock`,
//! `shadow on|off`, `reload`; [`crate::cli::admin`]).
//!
//! Raw API keys may come in a request body (the CLI reads them from stdin or a file, never from
//! its argv); they are used for the key's SHA-256 and kernel id and never logged or answered.
//! Every action is counted (`enforcer_admin_actions_total{action,result}`) and logged on the
//! `enforcer::admin` target with the operator's uid; a grant is also an audit row (`kind =
//! grant`, with the note and the uid) and reaches the kernel gate at once, through the
//! decider's event stream, as a tier change does.
use crate::api::App;
use crate::decision::event::{self, Event, Granted, TierChanged};
use crate::kernel::Gate;
use crate::key::{ApiKey, KeyHash, RequestId};
use crate::store::{GrantOutcome, GrantTerms, StoreError};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use std::os::unix::fs::{
    DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{UnixListener, UnixStream};

/// Longest operator note (bytes).
pub const MAX_NOTE_LEN: usize = 500;
/// How long an admin call waits for the store.
const STORE_WAIT: Duration = Duration::from_secs(5);
/// Longest an admin connection may stay open.
const CONNECTION_LIMIT: Duration = Duration::from_secs(120);
/// Largest admin request body.
const MAX_BODY: usize = 16 * 1024;

/// Errors while setting up the admin socket.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The socket's directory or file could not be prepared.
    #[error("admin socket {path}: {message}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// What the admin handlers need beside the decision API's state.
#[derive(Debug)]
pub struct Admin {
    /// The daemon.
    pub app: Arc<App>,
    /// Where the kernel gate's maps are pinned, when the daemon runs the gate.
    pub pin_dir: Option<PathBuf>,
    /// When the daemon started.
    pub started: Instant,
}

/// The peer of an admin connection, from the kernel (`SO_PEERCRED`), not from the caller.
#[derive(Debug, Clone, Copy)]
struct Operator {
    uid: u32,
    pid: Option<i32>,
}

impl Operator {
    fn name(self) -> String {
        format!("uid:{}", self.uid)
    }
}

/// Creates the socket: its directory made (or kept) 0700 and owned by this user, a stale
/// socket of an earlier daemon removed, the socket made 0600. A socket another daemon still
/// serves, or a path that is not a socket, is an error, never removed.
pub async fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    let fail = |message: String| AdminError::Socket {
        path: path.to_owned(),
        message,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| fail("has no directory".into()))?;
    let me = rustix::process::geteuid().as_raw();
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| fail(format!("creating {}: {e}", dir.display())))?;
    }
    let meta =
        std::fs::metadata(dir).map_err(|e| fail(format!("reading {}: {e}", dir.display())))?;
    if meta.uid() != me {
        return Err(fail(format!(
            "its directory {} belongs to uid {}, not to this daemon's uid {me}: give the socket \
             a directory of its own",
            dir.display(),
            meta.uid()
        )));
    }
    // A directory others may enter would let them reach the socket before its mode is set.
    if meta.mode() & 0o077 != 0 {
        if meta.mode() & 0o1000 != 0 {
            return Err(fail(format!(
                "its directory {} is shared (sticky, like /tmp): give the socket a directory \
                 of its own",
                dir.display()
            )));
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| fail(format!("making {} 0700: {e}", dir.display())))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(existing) if existing.file_type().is_socket() => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(fail(
                    "another daemon is serving it (stop it, or give this one another \
                     admin_socket)"
                        .into(),
                ));
            }
            std::fs::remove_file(path).map_err(|e| fail(format!("removing a stale one: {e}")))?;
        }
        Ok(_) => return Err(fail("exists and is not a socket: not touching it".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e.to_string())),
    }
    let listener = UnixListener::bind(path).map_err(|e| fail(format!("binding: {e}")))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| fail(format!("making it 0600: {e}")))?;
    Ok(listener)
}

/// Serves the admin API on `listener` until `shutdown`; the socket file is removed then.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    admin: Arc<Admin>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let router = router(admin.clone());
    let me = rustix::process::geteuid().as_raw();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket: accepting failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(cred) = stream.peer_cred() else {
            continue;
        };
        // The file mode already keeps others out; this holds even if the mode was changed.
        if cred.uid() != 0 && cred.uid() != me {
            tracing::warn!(target: "enforcer::admin", uid = cred.uid(), "admin socket: refused a peer that is neither root nor the daemon's user");
            admin
                .app
                .metrics
                .admin_actions
                .with_label_values(&["connect", "refused"])
                .inc();
            continue;
        }
        let operator = Operator {
            uid: cred.uid(),
            pid: cred.pid(),
        };
        let service = router.clone().layer(Extension(operator));
        tokio::spawn(async move {
            let service = hyper_util::service::TowerToHyperService::new(service);
            // A client that hangs (a stuck script) does not hold a task forever.
            let _ = tokio::time::timeout(
                CONNECTION_LIMIT,
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            )
            .await;
        });
    }
    let _ = std::fs::remove_file(&path);
}

fn router(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/keys/show", post(show))
        .route("/v1/keys/tier", post(set_tier))
        .route("/v1/keys/grant", post(grant))
        .route("/v1/keys/block", post(block))
        .route("/v1/keys/unblock", post(unblock))
        .route("/v1/shadow", post(shadow))
        .route("/v1/reload", post(reload))
        .fallback(|| async { refuse(StatusCode::NOT_FOUND, "not_found", "no such admin route") })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(admin)
}

/// An error answer.
fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({ "error": { "code": code, "message": message } })),
    )
        .into_response()
}

/// Counts and logs an action, and answers it.
fn done(
    admin: &Admin,
    operator: Operator,
    action: &str,
    key: Option<&KeyHash>,
    answer: Result<Value, Response>,
) -> Response {
    let (result, response) = match answer {
        Ok(body) => ("ok", Json(body).into_response()),
        Err(response) => {
            let result = if response.status().is_server_error() {
                "error"
            } else {
                "refused"
            };
            (result, response)
        }
    };
    admin
        .app
        .metrics
        .admin_actions
        .with_label_values(&[action, result])
        .inc();
    // Reads are not worth a log line each; every change is.
    if !matches!(action, "status" | "show") || result != "ok" {
        tracing::info!(
            target: "enforcer::admin",
            action,
            result,
            uid = operator.uid,
            pid = operator.pid,
            key = key.map(|k| k.to_hex()[..16].to_owned()),
            "admin action"
        );
    }
    response
}

/// A request body as JSON; a clear 400 otherwise.
#[expect(
    clippy::result_large_err,
    reason = "the error is the finished response, built once per bad request"
)]
fn body<T>(payload: Result<Json<T>, JsonRejection>) -> Result<T, Response> {
    payload
        .map(|Json(t)| t)
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, "bad_body", &e.body_text()))
}

/// The key a request names: the key itself, or its SHA-256 (exactly one of them).
#[expect(
    clippy::result_large_err,
    reason = "the error is the finished response, built once per bad request"
)]
fn named_key(
    key: Option<String>,
    key_hash: Option<String>,
) -> Result<(Option<ApiKey>, KeyHash), Response> {
    let bad = |message: &str| refuse(StatusCode::BAD_REQUEST, "bad_key", message);
    match (key, key_hash) {
        (Some(k), None) => {
            let key = ApiKey::parse(&k).map_err(|e| bad(&e.to_string()))?;
            let hash = key.hash();
            Ok((Some(key), hash))
        }
        (None, Some(h)) => Ok((
            None,
            parse_hash(&h).ok_or_else(|| {
                bad("key_hash must be the key's SHA-256: 64 hex digits (enforcer keys hash)")
            })?,
        )),
        _ => Err(bad("give either key or key_hash")),
    }
}

/// A SHA-256 in hex.
pub fn parse_hash(hex_digits: &str) -> Option<KeyHash> {
    KeyHash::from_hex(hex_digits.trim())
}

fn store_failed(e: &StoreError) -> Response {
    refuse(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        &e.to_string(),
    )
}

async fn store_call<T>(
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(STORE_WAIT, call)
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "no answer within {} s",
                STORE_WAIT.as_secs()
            )))
        })
}

/// `GET /v1/status`: version, config generation, store, breakers, kernel gate, ledger.
async fn status(State(admin): State<Arc<Admin>>, Extension(op): Extension<Operator>) -> Response {
    let app = &admin.app;
    let store = app.decider.store();
    let ping = store_call(store.ping()).await;
    let described = tokio::time::timeout(Duration::from_millis(500), store.describe())
        .await
        .ok()
        .flatten();
    let (worst, open) = app.decider.breaker_summary();
    let ledger = &app.metrics.ledger;
    let body = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "generation": app.reloader.generation(),
        "uptime_secs": admin.started.elapsed().as_secs(),
        "store": {
            "backend": store.backend(),
            "reachable": ping.is_ok(),
            "error": ping.err().map(|e| e.to_string()),
            "state": described,
            "breakers": store.shards().max(1),
            "breakers_open": open,
            "breaker_worst": format!("{worst:?}").to_lowercase(),
        },
        "kernel": app.kernel.get(),
        "ledger": {
            "queue_depth": ledger.queue_depth.get(),
            "backlog_bytes": ledger.backlog_bytes.get(),
            "spilled_total": ledger.spilled.get(),
            "quarantined_total": ledger.quarantined.get(),
            "dropped_total": ledger.dropped.get(),
        },
    });
    done(&admin, op, "status", None, Ok(body))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyRequest {
    key: Option<String>,
    key_hash: Option<String>,
}

/// `POST /v1/keys/show`: the key's tier, balances now, and this node's kernel entries.
async fn show(
    State(admin): State<Arc<Admin>>,
    Extension(op): Extension<Operator>,
    payload: Result<Json<KeyRequest>, JsonRejection>,
) -> Response {
    let mut hash = None;
    let answer = async {
        let r = body(payload)?;
        let (key, key_hash) = named_key(r.key, r.key_hash)?;
        hash = Some(key_hash);
        let state = store_call(admin.app.decider.store().inspect(&key_hash))
            .await
            .map_err(|e| store_failed(&e))?;
        let kernel = match (&admin.pin_dir, &key) {
            (None, _) => json!({ "gate": "not running on this daemon" }),
            (Some(_), None) => json!({
                "gate": "the kernel identifies keys by the raw key: give the key (stdin or \
                         --key-file) to see its entries"
            }),
            (Some(dir), Some(key)) => kernel_entries(dir.clone(), key.kernel_id()).await,
        };
        Ok(json!({
            "key_hash": key_hash.to_hex(),
            "assigned": state.assigned,
            "tier": state.tier,
            "balance": state.balance,
            "stored": state.stored,
            "operational": state.operational,
            "grants": state.grants,
            "shared_budget": state.shared_budget,
            "quota": state.quota,
            "at": state.at,
            "store": admin.app.decider.store().backend(),
            "kernel": kernel,
        }))
    }
    .await;
    done(&admin, op, "show", hash.as_ref(), answer)
}

/// A key's snapshot and block in the pinned maps.
async fn kernel_entries(pin_dir: PathBuf, key_id: u64) -> Value {
    tokio::task::spawn_blocking(move || {
        let gate = match Gate::load(Some(&pin_dir)) {
            Ok(g) => g,
            Err(e) => return json!({ "gate": format!("cannot open the pinned maps: {e}") }),
        };
        let now = crate::kernel::monotonic_ns();
        let config = gate.config().ok().flatten();
        let snapshot = gate.budget(key_id).ok().flatten().map(|b| {
            let current = config.is_some_and(|c| c.generation == b.generation);
            json!({
                "balance": b.balance_milli as f64 / 1000.0,
                "refill_per_sec": b.refill_milli_per_sec as f64 / 1000.0,
                "age_ms": now.saturating_sub(b.synced_ns) / 1_000_000,
                "current_generation": current,
            })
        });
        let blocked_ms = gate
            .blocked_until(key_id)
            .ok()
            .flatten()
            .filter(|until| *until > now)
            .map(|until| (until - now) / 1_000_000);
        json!({ "gate": "running", "snapshot": snapshot, "blocked_for_ms": blocked_ms })
    })
    .await
    .unwrap_or_else(|e| json!({ "gate": format!("reading the maps failed: {e}") }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TierRequest {
    key: Option<String>,
    key_hash: Option<String>,
    /// The tier; `null` removes the assignment.
    tier: Option<String>,
}

/// `POST /v1/keys/tier`: assigns a key to a tier of the config now serving, or removes its
/// assignment; the kernel gate drops what it held for the key.
async fn set_tier(
    State(admin): State<Arc<Admin>>,
    Extension(op): Extension<Operator>,
    payload: Result<Json<TierRequest>, JsonRejection>,
) -> Response {
    let mut hash = None;
    let answer = async {
        let r = body(payload)?;
        let (key, key_hash) = named_key(r.key, r.key_hash)?;
        hash = Some(key_hash);
        let tiers = admin.app.decider.tier_names();
        if let Some(name) = &r.tier
            && !tiers.contains(name)
        {
            return Err(refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_tier",
                &format!(
                    "unknown tier {name:?}; the config now serving has: {}",
                    tiers.join(", ")
                ),
            ));
        }
        store_call(
            admin
                .app
                .decider
                .store()
                .assign_tier(&key_hash, r.tier.as_deref()),
        )
        .await
        .map_err(|e| store_failed(&e))?;
        admin
            .app
            .decider
            .events()
            .publish(&Event::TierChanged(TierChanged {
                key: key.as_ref(),
                key_hash: &key_hash,
                tier: r.tier.as_deref(),
            }));
        Ok(json!({
            "key_hash": key_hash.to_hex(),
            "tier": r.tier,
            "kernel": kernel_follow(&admin, key.is_some()),
        }))
    }
    .await;
    done(&admin, op, "set_tier", hash.as_ref(), answer)
}

/// What the kernel gate does after a change of a key's budget.
fn kernel_follow(admin: &Admin, have_key: bool) -> &'static str {
    match (admin.pin_dir.is_some(), have_key) {
        (false, _) => "no kernel gate on this daemon",
        (true, true) => "this node's kernel gate follows at once",
        (true, false) => {
            "this node's kernel gate lifts the key (known only by its hash: entries it cannot \
             attribute are lifted too) until its next decision"
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantRequest {
    key: Option<String>,
    key_hash: Option<String>,
    tokens: f64,
    note: String,
    /// Makes a retried grant a replay; generated when absent.
    grant_id: Option<String>,
    /// Seconds until the grant expires (a wallet grant, spent before the bucket).
    expires_in_secs: Option<f64>,
    /// Spend priority, higher first (a wallet grant).
    priority: Option<i64>,
}

/// `POST /v1/keys/grant`: adds tokens to a key's main bucket, atomically, up to its tier's
/// `grant_ceiling`; an audit row with the note and the operator; the kernel follows.
async fn grant(
    State(admin): State<Arc<Admin>>,
    Extension(op): Extension<Operator>,
    payload: Result<Json<GrantRequest>, JsonRejection>,
) -> Response {
    let mut hash = None;
    let answer = async {
        let r = body(payload)?;
        let (key, key_hash) = named_key(r.key, r.key_hash)?;
        hash = Some(key_hash);
        let bad = |code: &str, message: &str| refuse(StatusCode::BAD_REQUEST, code, message);
        if !(r.tokens.is_finite() && r.tokens > 0.0 && r.tokens <= crate::decision::MAX_COST) {
            return Err(bad(
                "bad_tokens",
                "tokens must be a finite number > 0 and <= 1e15",
            ));
        }
        let note = r.note.trim();
        if note.is_empty() || note.len() > MAX_NOTE_LEN || note.chars().any(char::is_control) {
            return Err(bad(
                "bad_note",
                &format!(
                    "note must be 1-{MAX_NOTE_LEN} bytes of text without control characters \
                     (it is the audit row's reason)"
                ),
            ));
        }
        let grant_id = match &r.grant_id {
            Some(id) => RequestId::parse(id).map_err(|e| bad("bad_grant_id", &e.to_string()))?,
            None => RequestId::generate(),
        };
        let terms = GrantTerms {
            expires_in: r.expires_in_secs,
            priority: r.priority,
        };
        terms
            .check()
            .map_err(|e| bad("bad_expiry", &e.to_string()))?;
        if r.priority.is_some_and(|p| p.unsigned_abs() > 1_000_000) {
            return Err(bad(
                "bad_priority",
                "priority must be between -1000000 and 1000000",
            ));
        }
        let store = admin.app.decider.store();
        let sent = Instant::now();
        let outcome = store_call(store.grant_with(&key_hash, r.tokens, &grant_id, terms))
            .await
            .map_err(|e| {
                refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    &format!(
                        "{e}; whether the grant was applied is not known: retry with grant id \
                         {} (a replay never grants twice)",
                        grant_id.as_str()
                    ),
                )
            })?;
        match outcome {
            GrantOutcome::UnknownKey => Err(refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_key",
                "the key has no tier and unknown keys are refused: assign it a tier first",
            )),
            GrantOutcome::OverCeiling {
                balance,
                ceiling,
                tier,
            } => Err(refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                "over_ceiling",
                &format!(
                    "the balance would pass tier {tier}'s grant_ceiling {ceiling}: it is \
                     {balance} now, so at most {} can be granted; nothing was granted",
                    (ceiling - balance).max(0.0)
                ),
            )),
            GrantOutcome::TooManyGrants => Err(refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                "too_many_grants",
                &format!(
                    "the key holds {} expiring or prioritised grants already (the most a \
                     debit reads); nothing was granted: let one run out, or grant without \
                     --expires and --priority",
                    crate::wallet::MAX_GRANTS
                ),
            )),
            GrantOutcome::Granted {
                balance,
                tier,
                at,
                replayed,
                expires_at,
                expired,
            } => {
                let operator = op.name();
                if !replayed {
                    admin.app.decider.events().publish(&Event::Grant(Granted {
                        key: key.as_ref(),
                        key_hash: &key_hash,
                        grant_id: &grant_id,
                        tokens: r.tokens,
                        balance,
                        tier: &tier,
                        settled: event::Settled { at, now: at, sent },
                        note,
                        operator: &operator,
                        expires_at,
                        priority: terms.in_wallet().then(|| terms.priority.unwrap_or(0)),
                        expired: &expired,
                        id: uuid::Uuid::now_v7(),
                        store: store.backend(),
                    }));
                }
                Ok(json!({
                    "key_hash": key_hash.to_hex(),
                    "granted": r.tokens,
                    "balance": balance,
                    "tier": tier,
                    "grant_id": grant_id.as_str(),
                    "replayed": replayed,
                    "expires_at": expires_at.map(crate::wallet::rfc3339),
                    "priority": terms.in_wallet().then(|| terms.priority.unwrap_or(0)),
                    "kernel": kernel_follow(&admin, key.is_some()),
                }))
            }
        }
    }
    .await;
    done(&admin, op, "grant", hash.as_ref(), answer)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockRequest {
    key: Option<String>,
    key_hash: Option<String>,
    /// How long, milliseconds (block only).
    duration_ms: Option<u64>,
}

/// The pinned gate and the key's kernel id, or why the action cannot be done.
#[expect(
    clippy::result_large_err,
    reason = "the error is the finished response, built once per bad request"
)]
fn gate_key(admin: &Admin, r: BlockRequest) -> Result<(PathBuf, ApiKey, BlockRequest), Response> {
    let Some(dir) = admin.pin_dir.clone() else {
        return Err(refuse(
            StatusCode::CONFLICT,
            "no_kernel_gate",
            "this daemon runs no kernel gate ([kernel] interfaces)",
        ));
    };
    let (key, _) = named_key(r.key.clone(), r.key_hash.clone())?;
    let Some(key) = key else {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "key_required",
            "the kernel identifies keys by the raw key: give the key (stdin or --key-file), \
             not its hash",
        ));
    };
    Ok((dir, key, r))
}

/// Runs `f` on the pinned gate, off the runtime's threads (map syscalls block); a failure is
/// the finished 500 answer.
async fn on_pinned_gate<T: Send + 'static>(
    dir: PathBuf,
    f: impl FnOnce(&mut Gate) -> Result<T, crate::kernel::KernelError> + Send + 'static,
) -> Result<T, Response> {
    let fail = |e: &dyn std::fmt::Display| {
        refuse(StatusCode::INTERNAL_SERVER_ERROR, "kernel", &e.to_string())
    };
    tokio::task::spawn_blocking(move || f(&mut Gate::load(Some(&dir))?))
        .await
        .map_err(|e| fail(&e))?
        .map_err(|e| fail(&e))
}

/// `POST /v1/keys/block`: blocks a key in this node's kernel gate for a while.
async fn block(
    State(admin): State<Arc<Admin>>,
    Extension(op): Extension<Operator>,
    payload: Result<Json<BlockRequest>, JsonRejection>,
) -> Response {
    let mut hash = None;
    let answer = async {
        let (dir, key, r) = gate_key(&admin, body(payload)?)?;
        hash = Some(key.hash());
        let Some(ms) = r.duration_ms.filter(|ms| *ms > 0) else {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "bad_duration",
                "duration_ms must be > 0",
            ));
        };
        let key_id = key.kernel_id();
        on_pinned_gate(dir, move |gate| {
            gate.block(key_id, Duration::from_millis(ms))
        })
        .await?;
        Ok(json!({ "key_hash": key.hash().to_hex(), "blocked_for_ms": ms }))
    }
    .await;
    done(&admin, op, "block", hash.as_ref(), answer)
}

/// `POST /v1/keys/unblock`: lifts a key's block in this node's kernel gate.
async fn unblock(
    State(admin): State<Arc<Admin>>,
    Extension(op): Extension<Operator>,
    payload: Result<Json<BlockRequest>, JsonRejection>,
) -> Response {
    let mut hash = None;
    let answer = async {
        let (dir, key, _) = gate_key(&admin, body(payload)?)?;
        hash = Some(key.hash());
        let key_id = key.kernel_id();
        let was = on_pinned_gate(dir, move |gate| gate.unblock(key_id)).await?;
        Ok(json!({ "key_hash": key.hash().to_hex(), "was_blocked": was }))
    }
    .await;
    done(&admin, op, "unblock", hash.as_ref(), answer)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShadowRequest {
    on: bool,
    /// One tier's shadow mode; absent: global.
    tier: Option<String>,
}

/// `POST /v1/shadow`: shadow mode on or off, global or one tier's, until the next reload.
async fn shadow(
    State(admin): State<Arc<Admin>>,
    Extension(op): Extension<Operator>,
    payload: Result<Json<ShadowRequest>, JsonRejection>,
) -> Response {
    let answer = async {
        let r = body(payload)?;
        let report = admin
            .app
            .reloader
            .set_shadow(r.tier.as_deref(), r.on)
            .await
            .map_err(|e| {
                refuse(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "shadow_refused",
                    &e.to_string(),
                )
            })?;
        tracing::info!(target: "enforcer::admin", on = r.on, tier = r.tier.as_deref(), generation = report.generation, "shadow switch");
        serde_json::to_value(&report)
            .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e.to_string()))
    }
    .await;
    done(&admin, op, "shadow", None, answer)
}

/// `POST /v1/reload`: as SIGHUP; the errors of a refused file come back whole.
async fn reload(State(admin): State<Arc<Admin>>, Extension(op): Extension<Operator>) -> Response {
    let answer = async {
        let report = admin.app.reloader.reload().await.map_err(|e| {
            refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                "reload_refused",
                &format!("the config was not applied (the old one keeps serving): {e}"),
            )
        })?;
        serde_json::to_value(&report).map_err(|e| {
            refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                &e.to_string(),
            )
        })
    }
    .await;
    done(&admin, op, "reload", None, answer)
}
