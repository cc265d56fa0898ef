//! The `enforcer-redis` module's `ENFORCER.DEBIT` against `lua/debit.lua`, on the Redis
//! `cargo xtask test` started (the module loaded): the same calls on the same stored state give
//! the same replies, the same stored values and the same expiries (seeded scenarios over every
//! block of the script: tiers and assignments, replays and conflicts, wallets, quotas, key
//! limits, candidates, forced debits and bad arguments). Then what the daemon relies on: a call
//! naming another `debit.lua` is refused and writes nothing, a Redis without the module is
//! debited by the script (and the module is used again once Redis has it), and a replica gets
//! the module's writes as plain `SET`s.
use enforcer::budget::BudgetPolicy;
use enforcer::config::Config;
use enforcer::key::ApiKey;
use enforcer::store::{Debit, DebitOutcome, RedisStore, RedisStoreConfig, TokenStore};
use enforcer_tests::{PrivateRedis, redis_conn, redis_url, unique};
use redis::Value;
use redis::aio::{ConnectionLike as _, MultiplexedConnection};
use std::time::Duration;

/// The SHA-1 of `lua/debit.lua`, loaded into the test Redis.
async fn load_script(conn: &mut MultiplexedConnection) -> String {
    redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(enforcer::store::DEBIT_LUA)
        .query_async(conn)
        .await
        .expect("SCRIPT LOAD")
}

async fn redis_now(conn: &mut MultiplexedConnection) -> f64 {
    let (s, us): (f64, f64) = redis::cmd("TIME").query_async(conn).await.expect("TIME");
    s + us / 1e6
}

/// A reply as text: the fields of an array (integers as digits, nil as "nil"), or the error.
fn reply_text(r: redis::RedisResult<Value>) -> Result<Vec<String>, String> {
    fn one(v: &Value) -> String {
        match v {
            Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            Value::SimpleString(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            Value::Nil => "nil".into(),
            other => format!("{other:?}"),
        }
    }
    match r {
        Ok(Value::Array(items)) => Ok(items.iter().map(one).collect()),
        Ok(other) => Ok(vec![one(&other)]),
        Err(e) => Err(e.to_string()),
    }
}

/// One debit's answer in a call of many: its reply's fields, or its error.
fn element_text(v: Value) -> Result<Vec<String>, String> {
    match v {
        Value::ServerError(e) => Err(redis::RedisError::from(e).to_string()),
        v => reply_text(Ok(v)),
    }
}

/// Whether two texts say the same: token by token (split at spaces, `|` and newlines), equal,
/// or both numbers within `tol` (the two calls run a few milliseconds apart and refill moves
/// with time), or both a Redis TIME stamp (`<seconds>.<6 digits>`).
fn same(a: &str, b: &str, tol: f64) -> bool {
    let split = |s: &str| -> Vec<String> {
        s.split([' ', '|', '\n'])
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let stamp = |t: &str| {
        t.split_once('.').is_some_and(|(s, us)| {
            s.len() == 10
                && us.len() == 6
                && s.bytes().chain(us.bytes()).all(|c| c.is_ascii_digit())
        })
    };
    let (ta, tb) = (split(a), split(b));
    ta.len() == tb.len()
        && ta.iter().zip(&tb).all(|(x, y)| {
            x == y
                || (stamp(x) && stamp(y))
                || matches!((x.parse::<f64>(), y.parse::<f64>()),
                    (Ok(p), Ok(q)) if (p - q).abs() <= tol + 1e-9 * p.abs().max(q.abs()))
        })
}

/// A deterministic stream of choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick<'a, T: ?Sized>(&mut self, from: &[&'a T]) -> &'a T {
        from[(self.next() % from.len() as u64) as usize]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// The tiers every scenario's policy has (ARGV[7]).
const TIERS: &str = "\nfree 0 1000 10 0.8 800\nnorefill 1 1000 0 0.8 800\nprepaid 2 5000 0 0.8 0\nslow 3 100 0.5 0.5 50";

/// One debit on one stored state: the keys' suffixes (`None`: the key is given but holds
/// nothing), what they hold, and the arguments.
#[derive(Debug)]
struct Scenario {
    /// (suffix, stored value, ttl ms) of each key, in KEYS order.
    keys: Vec<(String, Option<String>, Option<u64>)>,
    args: Vec<String>,
}

fn scenario(rng: &mut Rng, now: f64) -> Scenario {
    let kind = rng.pick(&["m", "m", "m", "o", "M", "O"]);
    let main = kind == "m" || kind == "M";
    let cost = if rng.chance(8) {
        rng.pick(&["nan", "-1", "0", "abc", "2e15", "inf", ""])
            .to_owned()
    } else {
        rng.pick(&[
            "1", "5", "50", "300", "799.5", "800", "1000", "5000", "0.001", "33.3",
        ])
        .to_owned()
    };
    let remember = rng.chance(60);
    let fingerprint = if rng.chance(4) { "xyz" } else { "ab12" };
    let window = rng.pick(&["60", "0", "1000000"]);
    let default_tier = rng.pick(&["free", "free", "", "nosuch", "slow"]);
    let mut args: Vec<String> = vec![
        cost,
        if remember { "60000" } else { "0" }.into(),
        fingerprint.into(),
        window.into(),
        default_tier.into(),
        kind.into(),
        if rng.chance(3) {
            "free 0 1 1 1 1"
        } else {
            TIERS
        }
        .into(),
        if rng.chance(3) {
            "0"
        } else {
            rng.pick(&["1", "2.5"])
        }
        .to_owned(),
        if rng.chance(3) {
            "0"
        } else {
            rng.pick(&["-", "-", "900"])
        }
        .to_owned(),
    ];
    let mut keys: Vec<(String, Option<String>, Option<u64>)> = Vec::new();
    let bucket = match rng.next() % 6 {
        0 => Some(format!("123.5 {:.6}", now - 100.0)),
        1 => Some(format!("-50 {:.6}", now - 10.0)),
        2 => Some(format!("5000 {:.6}", now - 1.0)),
        3 => Some("x y".to_owned()),
        _ => None,
    };
    keys.push(("b".into(), bucket, Some(120_000)));
    let assigned = match rng.next() % 6 {
        0 => Some("norefill"),
        1 => Some("prepaid"),
        2 => Some("nosuch"),
        3 => Some("a b"),
        4 => Some("slow"),
        _ => None,
    };
    keys.push(("tier".into(), assigned.map(str::to_owned), None));
    if main {
        let wallet = match rng.next() % 5 {
            0 => Some(format!("0 - 1 30 g1\n1 {:.0} 2 20 g2", now + 100.0)),
            1 => Some(format!("0 {:.0} 1 40 g3\n2 - 3 15 g4", now - 5.0)),
            2 => Some("bad".to_owned()),
            _ => None,
        };
        keys.push(("w".into(), wallet, None));
    }
    if remember {
        let record = match rng.next() % 6 {
            0 => Some("m|1|500|0|free|5|1000|0|ab12|1|-"),
            1 => Some("m|1|500|0|free|5|1000|1|ab12|1|-"),
            2 => Some("m|1|500|0|free|5|1000|0|cd34|1|-"),
            3 => Some("m|1|500|0|free|5|1000|0"),
            _ => None,
        };
        keys.push(("r:1".into(), record.map(str::to_owned), Some(60_000)));
    }
    if main {
        if rng.chance(40) {
            let tier = rng.pick(&["free", "norefill", "slow"]);
            let day = 86_400.0;
            args.push("1".into());
            args.push(tier.into());
            args.push(
                if rng.chance(5) {
                    "nan"
                } else {
                    rng.pick(&["100", "1000"])
                }
                .to_owned(),
            );
            for b in [now - 2.0 * day, now - day, now + day, now + 2.0 * day] {
                args.push(format!("{:.0}", b.floor()));
            }
            let usage = match rng.next() % 3 {
                0 => Some(format!("{:.0} 50", (now - day).floor())),
                1 => Some(format!("{:.0} 99", (now - 2.0 * day).floor())),
                _ => None,
            };
            keys.push(("q".into(), usage, Some(90_000)));
        } else {
            args.push("0".into());
        }
        if rng.chance(30) {
            args.push(
                if rng.chance(10) {
                    rng.pick(&["0", "x"])
                } else {
                    "100"
                }
                .to_owned(),
            );
            args.push(rng.pick(&["0.000000001", "2"]).to_owned());
            let stored = rng.chance(50).then(|| format!("50 {:.6}", now - 1.0));
            keys.push(("k".into(), stored, Some(30_000)));
        } else {
            args.push("-".into());
            args.push("-".into());
        }
    }
    if rng.chance(25) {
        // The candidate: its cost and four numbers for each of the four tiers.
        args.push(
            if rng.chance(5) {
                "0"
            } else {
                rng.pick(&["10", "700"])
            }
            .to_owned(),
        );
        for _ in 0..4 {
            args.extend(["500", "1", "0.8", "400"].map(str::to_owned));
        }
        let stored = rng.chance(50).then(|| format!("100 {:.6}", now - 2.0));
        keys.push(("c".into(), stored, Some(60_000)));
    }
    if rng.chance(3) {
        // A key count the arguments do not call for.
        keys.push(("extra".into(), None, None));
    }
    if rng.chance(5) {
        // One key named twice (a hostile caller): read once each before any write, as MGET.
        let i = 1 + (rng.next() % (keys.len() as u64 - 1)) as usize;
        keys[i] = keys[0].clone();
    }
    Scenario { keys, args }
}

/// Writes the scenario's stored state under `tag`; the key names.
async fn prepare(conn: &mut MultiplexedConnection, s: &Scenario, tag: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (suffix, value, ttl) in &s.keys {
        let name = format!("ptb:{{{tag}}}:{suffix}");
        if let Some(v) = value {
            let mut set = redis::cmd("SET");
            set.arg(&name).arg(v);
            if let Some(ms) = ttl {
                set.arg("PX").arg(ms);
            }
            let () = set.query_async(conn).await.expect("SET");
        }
        names.push(name);
    }
    names
}

/// What the keys hold after the call: (value, ttl ms) each.
async fn stored(conn: &mut MultiplexedConnection, names: &[String]) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for name in names {
        let v: Option<String> = redis::cmd("GET")
            .arg(name)
            .query_async(conn)
            .await
            .expect("GET");
        let ttl: i64 = redis::cmd("PTTL")
            .arg(name)
            .query_async(conn)
            .await
            .expect("PTTL");
        out.push((v.unwrap_or_else(|| "<none>".into()), ttl));
    }
    out
}

#[tokio::test]
async fn the_module_answers_and_stores_what_the_script_does() {
    let mut conn = redis_conn(&redis_url()).await;
    let sha = load_script(&mut conn).await;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut ok, mut refused) = (0, 0);
    for i in 0..400 {
        let now = redis_now(&mut conn).await;
        let s = scenario(&mut rng, now);
        let tag = unique("parity");
        let (lua_tag, mod_tag) = (format!("{tag}-lua"), format!("{tag}-mod"));
        let lua_keys = prepare(&mut conn, &s, &lua_tag).await;
        let mod_keys = prepare(&mut conn, &s, &mod_tag).await;
        // A second copy for the form of many debits (`<sha1>:m`), which debits both copies in
        // one call: each must answer and store as the script on the first did.
        let many = i % 3 == 2;
        let copy_keys = if many {
            prepare(&mut conn, &s, &format!("{tag}-copy")).await
        } else {
            Vec::new()
        };
        let lua = reply_text(
            redis::cmd("EVALSHA")
                .arg(&sha)
                .arg(lua_keys.len())
                .arg(&lua_keys)
                .arg(&s.args)
                .query_async(&mut conn)
                .await,
        );
        // In turn: as the script is called, in the packed form the daemon sends alone
        // (`<sha1>:p`, one argument after the keys), and in the form of many it sends with
        // other debits (`<sha1>:m`), here the scenario on two copies of its keys.
        let mut call = redis::cmd("ENFORCER.DEBIT");
        let packed = enforcer_redis::args::pack(&s.args);
        match i % 3 {
            0 => call
                .arg(&sha)
                .arg(mod_keys.len())
                .arg(&mod_keys)
                .arg(&s.args),
            1 => call
                .arg(format!("{sha}{}", enforcer_redis::args::PACKED))
                .arg(mod_keys.len())
                .arg(&mod_keys)
                .arg(&packed),
            _ => call
                .arg(format!("{sha}{}", enforcer_redis::args::MANY))
                .arg(mod_keys.len() * 2)
                .arg(&mod_keys)
                .arg(&copy_keys)
                .arg(enforcer_redis::args::pack_many(&[
                    (mod_keys.len(), &packed),
                    (copy_keys.len(), &packed),
                ])),
        };
        // The answer as Redis sent it (`query_async` would make a debit's error in a call of
        // many the whole call's).
        let answer = if many {
            conn.req_packed_command(&call).await
        } else {
            call.query_async(&mut conn).await
        };
        let modules = if many {
            match answer {
                Ok(Value::Array(each)) if each.len() == 2 => {
                    each.into_iter().map(element_text).collect()
                }
                other => panic!("#{i} {s:?}\na call of two debits answered {other:?}"),
            }
        } else {
            vec![reply_text(answer)]
        };
        // Refill moves with the milliseconds between the two calls (at most 10 tokens/s here).
        let tol = 0.5;
        for module in modules {
            match (&lua, &module) {
                (Ok(l), Ok(m)) => {
                    ok += 1;
                    assert_eq!(l.len(), m.len(), "#{i} {s:?}\nlua {l:?}\nmodule {m:?}");
                    for (a, b) in l.iter().zip(m) {
                        // retry_after_ms and quota resets are milliseconds of time passing.
                        let tol = if a.contains('.') { tol } else { 100.0 };
                        assert!(same(a, b, tol), "#{i} {s:?}\nlua {l:?}\nmodule {m:?}");
                    }
                }
                (Err(l), Err(m)) => {
                    refused += 1;
                    let why = m
                        .split_once("enforcer: ")
                        .map_or(m.as_str(), |(_, why)| why)
                        .trim();
                    assert!(
                        l.contains(why),
                        "#{i} {s:?}\nthe same refusal: lua {l:?}, module {m:?}"
                    );
                }
                _ => {
                    panic!("#{i} {s:?}\none refused, one answered: lua {lua:?}, module {module:?}")
                }
            }
        }
        let sl = stored(&mut conn, &lua_keys).await;
        for keys in [&mod_keys, &copy_keys] {
            let sm = stored(&mut conn, keys).await;
            for ((lv, lt), (mv, mt)) in sl.iter().zip(&sm) {
                assert!(
                    same(lv, mv, tol),
                    "#{i} {s:?}\nstored: lua {sl:?}\nmodule {sm:?}"
                );
                // Both -1 (no expiry), both -2 (none), or within a second of each other.
                assert!(
                    lt == mt || (*lt >= 0 && *mt >= 0 && (lt - mt).abs() <= 1000),
                    "#{i} {s:?}\nexpiry: lua {sl:?}\nmodule {sm:?}"
                );
            }
        }
    }
    // The scenarios reach both outcomes (a generator that only produced refusals would prove
    // nothing about the rule).
    assert!(ok > 200 && refused > 20, "{ok} answered, {refused} refused");
}

/// A debit of `cost` on `key` in the tier `free` of the default config.
fn debit(key: &ApiKey, cost: f64) -> Debit {
    enforcer_tests::main_debit(key, cost)
}

fn policy() -> BudgetPolicy {
    Config::default().budget_policy()
}

fn store(url: &str) -> RedisStore {
    RedisStore::new(
        &RedisStoreConfig {
            url: url.to_owned(),
            connections: 1,
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(2),
            module: true,
            ..RedisStoreConfig::default()
        },
        &policy(),
    )
    .expect("redis store")
}

/// The tokens left after an allowed debit, rounded (the `free` tier refills 10/s between
/// calls).
async fn remaining(store: &RedisStore, d: &Debit) -> f64 {
    match store.debit(d).await.expect("debit") {
        DebitOutcome::Settled(s) => {
            assert!(s.allowed, "{s:?}");
            s.remaining.round()
        }
        other => panic!("{other:?}"),
    }
}

/// `/readyz`'s `module` object of the store.
async fn module_state(store: &RedisStore) -> serde_json::Value {
    store.describe().await.expect("describe")["module"].clone()
}

#[tokio::test]
async fn the_daemon_debits_with_the_module_where_redis_has_it() {
    let store = store(&redis_url());
    let key = ApiKey::parse(&unique("module-used")).expect("key");
    assert_eq!(remaining(&store, &debit(&key, 100.0)).await, 700.0);
    let state = module_state(&store).await;
    assert_eq!(state["debit"], "module", "{state}");
    assert_eq!(state["module_calls"], 1, "{state}");
    assert_eq!(state["module_fallbacks"], 0, "{state}");
}

/// `ENFORCER.DEBIT` calls Redis has answered (`INFO commandstats`).
async fn module_commands(conn: &mut MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_enforcer.debit:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().expect("a count"))
}

#[tokio::test]
async fn concurrent_debits_go_as_calls_of_many_and_each_gets_its_own_answer() {
    let mut conn = redis_conn(&redis_url()).await;
    let store = store(&redis_url());
    let keys: Vec<ApiKey> = (0..16)
        .map(|i| ApiKey::parse(&unique(&format!("many-{i}"))).expect("key"))
        .collect();
    let before = module_commands(&mut conn).await;
    // Three debits on each key, of a cost of its own (so that an answer handed to another
    // key's debit shows), and among them one the rule refuses (a cost above 1e15), all at
    // once: the batching task sends runs of them as calls of many.
    let cost = |i: usize| 10.0 + 15.0 * i as f64;
    let mut debits: Vec<Debit> = Vec::new();
    for round in 0..3 {
        for (i, key) in keys.iter().enumerate() {
            if round == 1 && i == 7 {
                debits.push(debit(key, 2e15));
            }
            debits.push(debit(key, cost(i)));
        }
    }
    let answers = futures_util::future::join_all(debits.iter().map(|d| store.debit(d))).await;
    let calls = module_commands(&mut conn).await - before;
    // (The test's runtime has one thread: every debit is queued before the batching task
    // runs, so they go as calls of up to 32, two or three commands.)
    assert!(
        calls * 4 <= debits.len() as u64,
        "{} debits went as {calls} commands: few or no calls of many",
        debits.len()
    );
    let mut left: Vec<Vec<f64>> = vec![Vec::new(); keys.len()];
    let mut refused = 0;
    for (d, answer) in debits.iter().zip(answers) {
        let i = keys
            .iter()
            .position(|k| k.hash() == d.key)
            .expect("a key of the test");
        match answer {
            Ok(DebitOutcome::Settled(s)) => {
                assert!(s.allowed, "{s:?}");
                left[i].push(s.remaining);
            }
            Err(e) => {
                assert!(d.cost > 1e15, "only the bad debit fails: {e}");
                assert!(e.to_string().contains("cost must be"), "{e}");
                refused += 1;
            }
            Ok(other) => panic!("{other:?}"),
        }
    }
    assert_eq!(refused, 1);
    // Each key (800 tokens) was debited three times by its cost, each debit after the one
    // before (refill adds a few tokens between them: 10 a second).
    for (i, mut l) in left.into_iter().enumerate() {
        l.sort_by(f64::total_cmp);
        let want = [
            800.0 - 3.0 * cost(i),
            800.0 - 2.0 * cost(i),
            800.0 - cost(i),
        ];
        assert_eq!(l.len(), 3, "key {i}: {l:?}");
        for (got, want) in l.iter().zip(want) {
            assert!((got - want).abs() < 7.0, "key {i}: {l:?}, not {want}");
        }
    }
    let state = module_state(&store).await;
    assert_eq!(state["module_fallbacks"], 0, "{state}");
}

#[tokio::test]
async fn one_request_id_sent_many_times_at_once_is_charged_once() {
    // A client retrying hard: the same request (one id) six times at once. They go as one call
    // of many; the first debit writes the request record, the five after it replay it.
    let store = store(&redis_url());
    let key = ApiKey::parse(&unique("many-replays")).expect("key");
    let d = debit(&key, 100.0);
    let answers = futures_util::future::join_all((0..6).map(|_| store.debit(&d))).await;
    let mut replays = 0;
    for answer in answers {
        match answer.expect("debit") {
            DebitOutcome::Settled(s) => {
                assert!(s.allowed, "{s:?}");
                assert_eq!(s.cost, 100.0, "{s:?}");
                replays += usize::from(s.replayed);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(replays, 5, "one charged, five replayed");
    // Charged once: a new request finds 800 - 100 - 100 (plus a little refill).
    assert_eq!(remaining(&store, &debit(&key, 100.0)).await, 600.0);
}

#[tokio::test]
async fn a_call_of_many_naming_a_key_twice_debits_it_twice_in_order() {
    let mut conn = redis_conn(&redis_url()).await;
    let sha = load_script(&mut conn).await;
    let tag = unique("twice");
    let keys = [format!("ptb:{{{tag}}}:b"), format!("ptb:{{{tag}}}:tier")];
    let args =
        enforcer_redis::args::pack(&["100", "0", "ab12", "60", "free", "o", TIERS, "1", "-"]);
    let mut call = redis::cmd("ENFORCER.DEBIT");
    call.arg(format!("{sha}{}", enforcer_redis::args::MANY))
        .arg(4)
        .arg(&keys)
        .arg(&keys)
        .arg(enforcer_redis::args::pack_many(&[(2, &args), (2, &args)]));
    let answer = conn.req_packed_command(&call).await.expect("answered");
    let Value::Array(each) = answer else {
        panic!("{answer:?}")
    };
    let each: Vec<Vec<String>> = each
        .into_iter()
        .map(|v| element_text(v).expect("each debit answered"))
        .collect();
    // `{"ok", allowed, remaining, …}`: the second debit saw the first's write.
    assert_eq!(each.len(), 2);
    assert_eq!(each[0][..2], ["ok", "1"], "{each:?}");
    assert_eq!(each[1][..2], ["ok", "1"], "{each:?}");
    let left: Vec<f64> = each
        .iter()
        .map(|e| e[2].parse().expect("a number"))
        .collect();
    assert!((left[0] - left[1] - 100.0).abs() < 1.0, "{each:?}");
}

#[tokio::test]
async fn a_call_for_another_debit_lua_is_refused_and_writes_nothing() {
    let mut conn = redis_conn(&redis_url()).await;
    let tag = unique("version");
    let keys = [format!("ptb:{{{tag}}}:b"), format!("ptb:{{{tag}}}:tier")];
    let args = ["5", "0", "ab12", "60", "free", "o", TIERS, "1", "-"];
    let result: redis::RedisResult<Value> = redis::cmd("ENFORCER.DEBIT")
        .arg("0000000000000000000000000000000000000000")
        .arg(2)
        .arg(&keys)
        .arg(&args)
        .query_async(&mut conn)
        .await;
    let err = result
        .expect_err("another script version is refused")
        .to_string();
    assert!(err.contains("built from debit.lua"), "{err}");
    let exists: u32 = redis::cmd("EXISTS")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 0, "nothing written");
    // The same in the packed form: another version, refused before the arguments are read
    // (what a module that predates the packed form answers a daemon that sends it, too).
    let result: redis::RedisResult<Value> = redis::cmd("ENFORCER.DEBIT")
        .arg(format!(
            "0000000000000000000000000000000000000000{}",
            enforcer_redis::args::PACKED
        ))
        .arg(2)
        .arg(&keys)
        .arg(enforcer_redis::args::pack(&args))
        .query_async(&mut conn)
        .await;
    let err = result.expect_err("refused").to_string();
    assert!(err.contains("built from debit.lua"), "{err}");
    // And a call of many: refused as a whole, no debit of it run.
    let packed = enforcer_redis::args::pack(&args);
    let result: redis::RedisResult<Value> = redis::cmd("ENFORCER.DEBIT")
        .arg(format!(
            "0000000000000000000000000000000000000000{}",
            enforcer_redis::args::MANY
        ))
        .arg(4)
        .arg(&keys)
        .arg(&keys)
        .arg(enforcer_redis::args::pack_many(&[
            (2, &packed),
            (2, &packed),
        ]))
        .query_async(&mut conn)
        .await;
    let err = result.expect_err("refused").to_string();
    assert!(err.contains("built from debit.lua"), "{err}");
    let exists: u32 = redis::cmd("EXISTS")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 0, "nothing written");
    // The right SHA on the same keys works (the refusal was the version, not the call).
    let sha = load_script(&mut conn).await;
    let ok: redis::RedisResult<Value> = redis::cmd("ENFORCER.DEBIT")
        .arg(&sha)
        .arg(2)
        .arg(&keys)
        .arg(&args)
        .query_async(&mut conn)
        .await;
    assert!(ok.is_ok(), "{ok:?}");
}

/// The module the test Redis loaded (`cargo xtask test` exports its path).
fn module_path() -> String {
    std::env::var("ENFORCER_TEST_REDIS_MODULE").expect(
        "ENFORCER_TEST_REDIS_MODULE is not set: run the integration tests with `cargo xtask test`",
    )
}

#[tokio::test]
async fn without_the_module_the_script_debits_and_the_module_is_used_once_loaded() {
    // A Redis without the module: the first debit is refused as an unknown command, sent
    // again as the script, and charged once.
    let mut redis = PrivateRedis::start();
    let store = store(&redis.url());
    let key = ApiKey::parse(&unique("no-module")).expect("key");
    assert_eq!(remaining(&store, &debit(&key, 100.0)).await, 700.0);
    assert_eq!(remaining(&store, &debit(&key, 100.0)).await, 600.0);
    let state = module_state(&store).await;
    assert_eq!(state["debit"], "script (module refused)", "{state}");
    assert_eq!(
        state["module_fallbacks"], 1,
        "one refusal, then the script: {state}"
    );
    assert_eq!(state["module_calls"], 0, "{state}");
    // Debits at once on a new store go as a call of many, refused as a whole (an unknown
    // command): each is sent again as the script and charged once.
    let store = self::store(&redis.url());
    let key = ApiKey::parse(&unique("no-module-many")).expect("key");
    let debits: Vec<Debit> = (0..10).map(|_| debit(&key, 50.0)).collect();
    let answers = futures_util::future::join_all(debits.iter().map(|d| store.debit(d))).await;
    let mut left: Vec<f64> = answers
        .into_iter()
        .map(|a| match a.expect("debit") {
            DebitOutcome::Settled(s) if s.allowed => s.remaining,
            other => panic!("{other:?}"),
        })
        .collect();
    left.sort_by(f64::total_cmp);
    assert!((left[0] - 300.0).abs() < 5.0, "charged once each: {left:?}");
    assert_eq!(module_state(&store).await["module_calls"], 0);

    // The same Redis restarted with the module (a rolling restart): a new store uses it at
    // once, on the same bucket.
    redis.restart_with(&["--loadmodule", &module_path()]);
    let store = self::store(&redis.url());
    let key = ApiKey::parse(&unique("module-loaded")).expect("key");
    assert_eq!(remaining(&store, &debit(&key, 100.0)).await, 700.0);
    assert_eq!(module_state(&store).await["debit"], "module");
}

#[tokio::test]
async fn a_replica_gets_the_modules_writes_with_their_expiry() {
    // A primary with the module, and a replica without it: replication carries the writes as
    // SETs with absolute expiry, never the command (which a replica would decide again, by its
    // own clock, or could not run at all).
    let primary = PrivateRedis::start_with(&["--loadmodule", &module_path()]);
    let replica =
        PrivateRedis::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    let mut pconn = redis_conn(&primary.url()).await;
    let mut rconn = redis_conn(&replica.url()).await;
    let store = store(&primary.url());
    let key = ApiKey::parse(&unique("replicated")).expect("key");
    let d = debit(&key, 250.0);
    assert_eq!(remaining(&store, &d).await, 550.0);
    assert_eq!(module_state(&store).await["debit"], "module");
    let bucket = format!("ptb:{{{}}}:b", key.hash().to_hex());
    let started = std::time::Instant::now();
    loop {
        let on_replica: Option<String> = redis::cmd("GET")
            .arg(&bucket)
            .query_async(&mut rconn)
            .await
            .expect("GET on the replica");
        let on_primary: Option<String> = redis::cmd("GET")
            .arg(&bucket)
            .query_async(&mut pconn)
            .await
            .expect("GET");
        if on_replica.is_some() {
            assert_eq!(
                on_replica, on_primary,
                "the replica holds the primary's value"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the replica never got the bucket"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (pttl_p, pttl_r): (i64, i64) = (
        redis::cmd("PTTL")
            .arg(&bucket)
            .query_async(&mut pconn)
            .await
            .expect("PTTL"),
        redis::cmd("PTTL")
            .arg(&bucket)
            .query_async(&mut rconn)
            .await
            .expect("PTTL"),
    );
    assert!(pttl_p > 0 && pttl_r > 0, "both expire: {pttl_p} {pttl_r}");
    assert!(
        (pttl_p - pttl_r).abs() < 2000,
        "the same expiry: {pttl_p} {pttl_r}"
    );
}

#[tokio::test]
async fn an_acl_without_the_command_falls_back_to_the_script() {
    // The module is loaded but the daemon's user may only run scripts (an ACL written before
    // the module): the refusal (NOPERM) wrote nothing, and the script debits.
    let redis = PrivateRedis::start_with(&["--loadmodule", &module_path()]);
    let mut conn = redis_conn(&redis.url()).await;
    let () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg("-enforcer.debit")
        .query_async(&mut conn)
        .await
        .expect("ACL SETUSER");
    let store = store(&redis.url());
    let key = ApiKey::parse(&unique("acl")).expect("key");
    assert_eq!(remaining(&store, &debit(&key, 100.0)).await, 700.0);
    assert_eq!(remaining(&store, &debit(&key, 100.0)).await, 600.0);
    let state = module_state(&store).await;
    assert_eq!(state["debit"], "script (module refused)", "{state}");
    assert_eq!(state["module_fallbacks"], 1, "{state}");
}

#[tokio::test]
async fn malformed_calls_are_errors_and_redis_keeps_serving() {
    let mut conn = redis_conn(&redis_url()).await;
    let sha = load_script(&mut conn).await;
    let tag = unique("malformed");
    let key = format!("ptb:{{{tag}}}:b");
    let long = "9".repeat(100_000);
    let calls: Vec<Vec<&str>> = vec![
        vec![],
        vec![&sha],
        vec![&sha, "1"],
        vec![&sha, "-1", &key],
        vec![&sha, "abc", &key, "1"],
        vec![&sha, "99", &key, "1"],
        vec![&sha, "0", "1"],
        vec![&sha, "1", &key],
        vec![
            &sha, "2", &key, &key, &long, "0", "ab", "1", "", "m", "\n", "1", "-", "0", "-", "-",
        ],
        vec![
            &sha, "2", &key, &key, "1", "0", "ab", "1", "", "m", "\nfree", "1", "-", "0", "-", "-",
        ],
        vec![
            &sha, "2", &key, &key, "1", "0", "ab", "1", "free", "o", &long, "1", "-",
        ],
    ];
    // The packed form: one argument after the keys, and it must be `<length>:<bytes>`s.
    let packed = format!("{sha}{}", enforcer_redis::args::PACKED);
    let good = enforcer_redis::args::pack(&["1", "0", "ab", "1", "free", "o", TIERS, "1", "-"]);
    let good = String::from_utf8(good).expect("utf-8");
    let truncated = &good[..good.len() - 1];
    let trailing = format!("{good}1");
    let calls: Vec<Vec<&str>> = calls
        .into_iter()
        .chain([
            vec![&packed, "2", &key, &key],
            vec![&packed, "2", &key, &key, &good, "1"],
            vec![&packed, "2", &key, &key, truncated],
            vec![&packed, "2", &key, &key, &trailing],
            vec![&packed, "2", &key, &key, "99999999999:"],
            vec![&packed, "2", &key, &key, "x:1"],
            vec![&packed, "2", &key, &key, "1:1"],
            vec![&packed, "2", &key, &key, &long],
        ])
        .collect();
    // The form of many: one argument after the keys, each debit's key count and packed
    // arguments, the counts adding up to the call's keys; anything else refuses the whole call
    // before any debit runs.
    let many = format!("{sha}{}", enforcer_redis::args::MANY);
    let text = |b: Vec<u8>| String::from_utf8(b).expect("utf-8");
    let bad_many = [
        // Counts that do not add up to the keys given.
        text(enforcer_redis::args::pack_many(&[(1, &good)])),
        text(enforcer_redis::args::pack_many(&[(2, &good), (1, &good)])),
        // A debit of no keys.
        text(enforcer_redis::args::pack_many(&[(0, &good), (2, &good)])),
        // A debit whose arguments are not packed, a count that is not a number, an odd field.
        text(enforcer_redis::args::pack(&["2", "x"])),
        text(enforcer_redis::args::pack(&["two", &good])),
        text(enforcer_redis::args::pack(&["2", &good, "1"])),
        // Not packed at all, and the many's form truncated.
        good.clone(),
        text(enforcer_redis::args::pack_many(&[(2, &good)]))[..20].to_owned(),
    ];
    let one_many = text(enforcer_redis::args::pack_many(&[(2, &good)]));
    let calls: Vec<Vec<&str>> = calls
        .into_iter()
        .chain(
            bad_many
                .iter()
                .map(|m| vec![&many, "2", &key, &key, m.as_str()]),
        )
        .chain([
            vec![&many, "2", &key, &key],
            vec![&many, "2", &key, &key, &one_many, &one_many],
        ])
        .collect();
    for call in calls {
        let result: redis::RedisResult<Value> = redis::cmd("ENFORCER.DEBIT")
            .arg(&call)
            .query_async(&mut conn)
            .await;
        let err = result.expect_err("refused").to_string();
        assert!(
            err.contains("enforcer") || err.contains("wrong number of arguments"),
            "{}: {err}",
            call.len()
        );
    }
    let pong: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .expect("PING");
    assert_eq!(pong, "PONG");
    let exists: u32 = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 0, "nothing written");
}

#[tokio::test]
async fn keyspace_events_are_the_scripts() {
    // Whoever listens to keyspace events (`notify-keyspace-events`) hears the module's writes
    // as it hears the script's: `del` of a wallet spent empty, then `set` and `expire` of the
    // bucket and of the request record.
    use futures_util::StreamExt as _;
    let redis = PrivateRedis::start_with(&[
        "--loadmodule",
        &module_path(),
        "--notify-keyspace-events",
        "KEA",
    ]);
    let client = redis::Client::open(redis.url()).expect("url");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .psubscribe("__keyevent@0__:*")
        .await
        .expect("psubscribe");
    let mut events = pubsub.into_on_message();
    let mut conn = redis_conn(&redis.url()).await;
    let sha = load_script(&mut conn).await;
    let mut heard = Vec::new();
    for command in ["EVALSHA", "ENFORCER.DEBIT"] {
        let tag = unique("events");
        let name = |suffix: &str| format!("ptb:{{{tag}}}:{suffix}");
        let () = redis::cmd("SET")
            .arg(name("w"))
            .arg("0 - 1 5 g1")
            .query_async(&mut conn)
            .await
            .expect("SET wallet");
        // The SET above is heard too: skip it.
        let first = events.next().await.expect("the wallet's set");
        assert_eq!(first.get_channel_name(), "__keyevent@0__:set");
        let keys = [name("b"), name("tier"), name("w"), name("r:1")];
        let args = [
            "5", "60000", "ab12", "60", "free", "m", TIERS, "1", "-", "0", "-", "-",
        ];
        let reply: Vec<Value> = redis::cmd(command)
            .arg(&sha)
            .arg(keys.len())
            .arg(&keys)
            .arg(&args)
            .query_async(&mut conn)
            .await
            .expect("debit");
        assert_eq!(reply.len(), 13, "{command}: {reply:?}");
        let mut these = Vec::new();
        for _ in 0..5 {
            let msg = tokio::time::timeout(Duration::from_secs(5), events.next())
                .await
                .unwrap_or_else(|_| panic!("{command}: only {these:?}"))
                .expect("event");
            let key: String = msg.get_payload().expect("payload");
            these.push(format!(
                "{} {}",
                msg.get_channel_name().trim_start_matches("__keyevent@0__:"),
                key.replace(&tag, "T")
            ));
        }
        heard.push(these);
    }
    assert_eq!(
        heard[0],
        [
            "del ptb:{T}:w",
            "set ptb:{T}:b",
            "expire ptb:{T}:b",
            "set ptb:{T}:r:1",
            "expire ptb:{T}:r:1"
        ],
        "the script's events"
    );
    assert_eq!(heard[1], heard[0], "the module's events are the script's");
}
