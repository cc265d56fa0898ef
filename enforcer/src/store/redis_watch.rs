//! Watches the Redis servers the token store uses for what the seed's outage teaches: one
//! slow Lua script blocks every client of a Redis, for as long as its `busy-reply-threshold`
//! (`lua-time-limit` before Redis 7) lets it run before others even get a BUSY error.
//!
//! Every `store.watch_interval_ms` (and at start), per node (the URL, or each seed of a
//! cluster):
//!
//! - `CONFIG GET busy-reply-threshold` → `enforcer_redis_busy_reply_threshold_seconds`
//!   (+Inf when unlimited, NaN when CONFIG is refused, as managed Redis often does), and a
//!   warning when it is above [`THRESHOLD_WARN`] or unlimited;
//! - `INFO commandstats` → `enforcer_redis_lua_execution_seconds`: the mean server-side time of
//!   one script call (`EVALSHA`, `EVAL` and their `_RO` forms, and the `enforcer-redis` module's
//!   `ENFORCER.DEBIT`, which runs `debit.lua`'s rule in its place) over the last interval, from
//!   the `calls` and `usec` counters: the seed's `redis_lua_execution_time`. It covers every client
//!   of the node, which is the point: a slow script is slow for everyone.
//!
//! The watch has its own connection; a node it cannot reach is skipped until the next tick
//! (the store's own breaker and metrics say it is down).
use crate::lifecycle::Shutdown;
use crate::metrics::Metrics;
use std::collections::HashMap;
use std::time::Duration;

/// A threshold above this is worth a warning: a script may block the node that long.
pub const THRESHOLD_WARN: Duration = Duration::from_millis(500);

/// Script calls in `INFO commandstats`: `(calls, usec)` summed over the script commands and
/// the module's debit command.
pub fn script_stats(info: &str) -> (u64, u64) {
    let mut calls = 0;
    let mut usec = 0;
    for line in info.lines() {
        let Some((name, fields)) = line.trim().split_once(':') else {
            continue;
        };
        if !matches!(
            name,
            "cmdstat_evalsha"
                | "cmdstat_eval"
                | "cmdstat_evalsha_ro"
                | "cmdstat_eval_ro"
                | "cmdstat_enforcer.debit"
        ) {
            continue;
        }
        for field in fields.split(',') {
            match field.split_once('=') {
                Some(("calls", v)) => calls += v.parse::<u64>().unwrap_or(0),
                Some(("usec", v)) => usec += v.parse::<u64>().unwrap_or(0),
                _ => {}
            }
        }
    }
    (calls, usec)
}

/// The threshold of a `CONFIG GET` answer (milliseconds as text): `Some(None)` when unlimited
/// (0 or negative, as Redis reads it), `None` when it is not a number.
pub fn threshold(ms: &str) -> Option<Option<Duration>> {
    let ms: i64 = ms.trim().parse().ok()?;
    Some(
        u64::try_from(ms)
            .ok()
            .filter(|&m| m > 0)
            .map(Duration::from_millis),
    )
}

/// One node's state between ticks.
#[derive(Default)]
struct Node {
    conn: Option<redis::aio::MultiplexedConnection>,
    /// The last `(calls, usec)` seen.
    last: Option<(u64, u64)>,
    /// The last threshold warned about (`Some(None)`: unlimited), so a warning is not
    /// repeated every tick.
    warned: Option<Option<Duration>>,
}

/// Reads `busy-reply-threshold` (or `lua-time-limit`): `Ok(None)` when CONFIG is refused.
async fn read_threshold(
    conn: &mut redis::aio::MultiplexedConnection,
) -> redis::RedisResult<Option<String>> {
    for name in ["busy-reply-threshold", "lua-time-limit"] {
        let answer: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg(name)
            .query_async(conn)
            .await;
        match answer {
            Ok(pair) if pair.len() == 2 => return Ok(pair.into_iter().nth(1)),
            Ok(_) => continue,
            Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() => {
                return Err(e);
            }
            // CONFIG renamed or forbidden (ACL): the server answered, it is not an outage.
            Err(_) => return Ok(None),
        }
    }
    Ok(None)
}

/// The watch: runs until shutdown.
pub async fn watch(
    urls: Vec<String>,
    metrics: Metrics,
    interval: Duration,
    mut shutdown: Shutdown,
) {
    let mut nodes: HashMap<String, Node> =
        urls.iter().map(|u| (u.clone(), Node::default())).collect();
    let mut ticks = tokio::time::interval(interval.max(Duration::from_millis(100)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.requested() => return,
            _ = ticks.tick() => {}
        }
        let mut max_threshold: Option<f64> = None;
        let (mut calls, mut usec) = (0u64, 0u64);
        for (url, node) in &mut nodes {
            if node.conn.is_none() {
                let Ok(client) = redis::Client::open(url.as_str()) else {
                    continue;
                };
                let connect = client.get_multiplexed_async_connection();
                match tokio::time::timeout(Duration::from_secs(2), connect).await {
                    Ok(Ok(c)) => node.conn = Some(c),
                    _ => continue,
                }
            }
            let Some(conn) = node.conn.as_mut() else {
                continue;
            };
            let threshold_ms =
                tokio::time::timeout(Duration::from_secs(2), read_threshold(conn)).await;
            let info = tokio::time::timeout(
                Duration::from_secs(2),
                redis::cmd("INFO")
                    .arg("commandstats")
                    .query_async::<String>(conn),
            )
            .await;
            let (Ok(Ok(threshold_ms)), Ok(Ok(info))) = (threshold_ms, info) else {
                // Reconnect next time.
                node.conn = None;
                continue;
            };
            let parsed = threshold_ms.and_then(|ms| threshold(&ms).map(|t| (ms, t)));
            if let Some((ms, t)) = parsed {
                let seconds = t.map_or(f64::INFINITY, |d| d.as_secs_f64());
                max_threshold = Some(max_threshold.map_or(seconds, |m: f64| m.max(seconds)));
                let risky = t.is_none_or(|d| d > THRESHOLD_WARN);
                if risky && node.warned != Some(t) {
                    tracing::warn!(
                        target: "enforcer::store",
                        node = %redacted(url),
                        busy_reply_threshold_ms = %ms,
                        "Redis lets a slow script block every client for {} before answering BUSY: \
                         set busy-reply-threshold (lua-time-limit) to 500 ms or less",
                        t.map_or("ever".to_owned(), |d| format!("{} ms", d.as_millis()))
                    );
                    node.warned = Some(t);
                }
            }
            let now = script_stats(&info);
            if let Some(last) = node.last
                && now.0 >= last.0
            {
                calls += now.0 - last.0;
                usec += now.1.saturating_sub(last.1);
            }
            node.last = Some(now);
        }
        metrics
            .redis_busy_reply_threshold
            .set(max_threshold.unwrap_or(f64::NAN));
        if calls > 0 {
            metrics
                .redis_lua_execution
                .set(usec as f64 / 1e6 / calls as f64);
        }
    }
}

/// A Redis URL without its password, for logs.
fn redacted(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://…@{}", &url[at + 1..]),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commandstats_and_thresholds_parse() {
        let info = "# Commandstats\r\ncmdstat_evalsha:calls=10,usec=500,usec_per_call=50.00,rejected_calls=0,failed_calls=0\r\ncmdstat_get:calls=99,usec=99,usec_per_call=1.00\r\ncmdstat_eval:calls=2,usec=100,usec_per_call=50.00\r\ncmdstat_enforcer.debit:calls=8,usec=40,usec_per_call=5.00\r\n";
        assert_eq!(script_stats(info), (20, 640));
        assert_eq!(script_stats(""), (0, 0));
        assert_eq!(threshold("5000"), Some(Some(Duration::from_secs(5))));
        assert_eq!(threshold("0"), Some(None), "0: unlimited");
        assert_eq!(threshold("-1"), Some(None));
        assert_eq!(threshold("x"), None, "not a number");
        assert_eq!(redacted("redis://:pw@h:6379/0"), "redis://…@h:6379/0");
        assert_eq!(redacted("redis://h:6379"), "redis://h:6379");
    }
}
