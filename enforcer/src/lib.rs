//! enforcer: cost-weighted API token budgets.
//!
//! Where a request goes, module by module:
//!
//! - [`api`]: the HTTP decision API (`/v1/check`, `/v1/auth`, `/v1/refund`, probes, metrics);
//!   the client address a decision carries comes only from trusted proxies ([`client_addr`]).
//!   [`rls`]: Envoy's rate-limit service API (gRPC) onto the same decisions; [`headers`]: the
//!   `RateLimit` fields both answer with.
//! - [`decision`]: validates a check, puts its path in normal form ([`endpoint`]), **prices**
//!   it ([`price`]), **debits** it through the [`store`] behind the circuit [`breaker`],
//!   applies shadow mode and the failure policy (with `on_store_failure = "local"`, the local
//!   buckets and debit-back of `decision::local`); publishes every decision and refund as one
//!   event (`decision::event`) to its subscribers: the [`ledger`] (**records** it) and the
//!   [`kernel`] gate's sync.
//! - [`debit`]: the PTB-CWD bucket arithmetic, the reference that `lua/debit.lua` mirrors;
//!   [`wallet`]: grants that expire or have a priority, spent before the bucket.
//! - [`budget`]: tiers and the budget policy taken from the config; [`shadow`]: a candidate
//!   policy evaluated beside it, deciding nothing (`enforcer audit shadow-report`).
//! - [`store`]: the token store boundary (trait) with the Redis and in-process backends.
//! - [`kernel`]: the TC eBPF `gate` that **rejects** in the kernel: its loader, what it
//!   enforces (`plan`), the subscriber and task that keep its maps in step with the decisions
//!   (`sync`) and its rejection rollups.
//! - [`lifecycle`]: the background workers (kernel sync, pricing engine, SIGHUP) and their
//!   one shutdown signal; [`reload`]: what a config reload changes while serving, and how.
//! - [`trace`]: OpenTelemetry spans of decisions and pricing rounds, exported over OTLP/HTTP
//!   without ever holding up a decision.
//! - [`metrics`], [`config`], [`key`] (API-key hashing), [`clock`], [`server`] (wiring),
//!   [`listener`] (accepting connections, their timeouts and cap), [`cli`] (the `enforcer`
//!   command line), [`http_client`] (every outbound HTTP request: Prometheus, the admin
//!   socket, OTLP).
// Denied, not forbidden: one module may opt out with a reason, `kernel::attachment`'s `sys`
// (the bpf(2) link commands aya does not wrap), each block with a `// SAFETY:` note.
#![deny(unsafe_code)]

pub mod admin;
pub mod alerts;
pub mod api;
pub mod breaker;
pub mod budget;
pub mod cli;
pub mod client_addr;
pub mod clock;
pub mod config;
pub mod debit;
pub mod decision;
pub mod endpoint;
pub mod headers;
pub mod http_client;
pub mod json;
pub mod kernel;
pub mod key;
pub mod ledger;
pub mod lifecycle;
pub mod listener;
pub mod metrics;
pub mod price;
pub mod pricing;
pub mod quota;
pub mod reload;
pub mod rls;
pub mod server;
pub mod shadow;
pub mod store;
pub mod trace;
pub mod wallet;
