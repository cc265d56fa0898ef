//! One contract, four token stores: every case runs against the Redis store on one Redis (with
//! the `enforcer-redis` module's `ENFORCER.DEBIT`, and with `lua/debit.lua`), on a Redis
//! Cluster (real servers, the module on every node) and the in-process store, and all must
//! answer the same.
use enforcer::budget::{BucketParams, BudgetPolicy};
use enforcer::clock::ManualClock;
use enforcer::config::Config;
use enforcer::key::{ApiKey, RequestId};
use enforcer::store::{
    BucketKind, CandidateOutcome, Debit, DebitOutcome, DeniedBy, Fingerprint, GrantOutcome,
    GrantTerms, MemoryStore, QuotaPeriods, RedisStore, RedisStoreConfig, RefundOutcome,
    SettleOutcome, SettleTerms, Settled, TokenStore, TrueCost,
};
use enforcer::wallet::GrantMove;
use enforcer_tests::cluster::redis_cluster_seeds;
use enforcer_tests::{redis_url, unique};
use std::sync::Arc;
use std::time::Duration;

/// The example config's tiers, with unknown keys refused.
fn policy() -> BudgetPolicy {
    let mut config = enforcer_tests::example_config("");
    config.budget.unknown_keys = enforcer::config::UnknownKeyPolicy::Reject;
    // Balances of this tier move only by debits and refunds, whatever the clock does, so the
    // tests that use it compare exactly on a slow machine.
    config.tiers.insert(
        "norefill".into(),
        enforcer::config::TierConfig {
            max_tokens: 1000.0,
            refill_per_sec: 0.0,
            idle_cap: 0.8,
            initial_tokens: Some(800.0),
            shadow: false,
            grant_ceiling: None,
            low_balance: Vec::new(),
            quota: None,
        },
    );
    // Refill, and grants allowed far above capacity.
    config.tiers.insert(
        "topup".into(),
        enforcer::config::TierConfig {
            max_tokens: 1000.0,
            refill_per_sec: 10.0,
            idle_cap: 0.8,
            initial_tokens: Some(800.0),
            shadow: false,
            grant_ceiling: Some(10_000.0),
            low_balance: Vec::new(),
            quota: None,
        },
    );
    // No refill (exact balances), and a monthly quota of 500 beside the bucket of 1000.
    config.tiers.insert(
        "quota".into(),
        enforcer::config::TierConfig {
            max_tokens: 1000.0,
            refill_per_sec: 0.0,
            idle_cap: 0.8,
            initial_tokens: Some(800.0),
            shadow: false,
            grant_ceiling: None,
            low_balance: Vec::new(),
            quota: Some(enforcer::quota::QuotaConfig {
                amount: 500.0,
                period: enforcer::quota::Period::Month,
                anchor_day: Some(1),
                timezone: Some("Europe/Berlin".into()),
            }),
        },
    );
    let mut big = config.tiers["quota"].clone();
    big.quota = Some(enforcer::quota::QuotaConfig {
        amount: 5000.0,
        period: enforcer::quota::Period::Day,
        anchor_day: None,
        timezone: Some("Asia/Kolkata".into()),
    });
    config.tiers.insert("quota_big".into(), big);
    assert!(config.validate().is_empty());
    config.budget_policy()
}

fn stores() -> Vec<Box<dyn TokenStore>> {
    timed_stores().into_iter().map(|t| t.store).collect()
}

/// A store and how time passes for it: Redis keeps real time (`TIME`), the in-process store
/// the test's clock.
struct Timed {
    store: Box<dyn TokenStore>,
    clock: Option<Arc<ManualClock>>,
}

impl Timed {
    /// Lets `secs` pass for the store.
    async fn pass(&self, secs: f64) {
        match &self.clock {
            Some(clock) => clock.advance(secs),
            None => tokio::time::sleep(Duration::from_secs_f64(secs)).await,
        }
    }
}

fn timed_stores() -> Vec<Timed> {
    timed_stores_with(&policy())
}

/// The four stores under `policy`.
fn timed_stores_with(policy: &BudgetPolicy) -> Vec<Timed> {
    // The Redis `cargo xtask test` started has the module loaded: debits go to ENFORCER.DEBIT
    // with `module`, to `lua/debit.lua` without, in a database of their own (cases use the
    // same key names in every store).
    let single = |module: bool| {
        let url = if module {
            redis_url()
        } else {
            format!("{}/1", redis_url().trim_end_matches('/'))
        };
        RedisStore::new(
            &RedisStoreConfig {
                url,
                connections: 1,
                connect_timeout: Duration::from_secs(2),
                response_timeout: Duration::from_secs(2),
                module,
                ..RedisStoreConfig::default()
            },
            policy,
        )
        .expect("redis store")
    };
    // The cluster `cargo xtask test` started: every call routed by its key's slot.
    let cluster = RedisStore::new(
        &RedisStoreConfig {
            cluster: redis_cluster_seeds(),
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(2),
            module: true,
            ..RedisStoreConfig::default()
        },
        policy,
    )
    .expect("redis cluster store");
    assert_eq!(cluster.backend(), "redis-cluster");
    let clock = Arc::new(ManualClock::at(1_000_000.0));
    let memory = MemoryStore::new(policy.clone(), clock.clone());
    vec![
        Timed {
            store: Box::new(single(true)),
            clock: None,
        },
        Timed {
            store: Box::new(single(false)),
            clock: None,
        },
        Timed {
            store: Box::new(cluster),
            clock: None,
        },
        Timed {
            store: Box::new(memory),
            clock: Some(clock),
        },
    ]
}

fn debit(key: &ApiKey, bucket: BucketKind, cost: f64) -> Debit {
    Debit {
        key: key.hash(),
        bucket,
        cost,
        request_id: RequestId::generate(),
        fingerprint: Fingerprint::of(bucket, Some("POST"), "/generate-report", 1.0),
        force: false,
        terms: enforcer::store::SettleTerms::default(),
        candidate: None,
    }
}

async fn settle(store: &dyn TokenStore, d: &Debit) -> Settled {
    match store.debit(d).await.expect("debit") {
        DebitOutcome::Settled(s) => s,
        other => panic!("{}: unexpected {other:?}", store.backend()),
    }
}

/// Balances agree within the refill a real clock adds while a test runs (10 tokens/s).
fn near(a: f64, b: f64) -> bool {
    (a - b).abs() < 2.0
}

#[tokio::test]
async fn unknown_keys_are_refused_when_configured() {
    for store in stores() {
        let key = ApiKey::parse(&unique("unknown")).expect("key");
        let out = store
            .debit(&debit(&key, BucketKind::Main, 1.0))
            .await
            .expect("debit");
        assert_eq!(out, DebitOutcome::UnknownKey, "{}", store.backend());
    }
}

#[tokio::test]
async fn assigned_tier_decides_capacity_and_denials_say_when() {
    for store in stores() {
        let b = store.backend();
        let key = ApiKey::parse(&unique("free")).expect("key");
        store
            .assign_tier(&key.hash(), Some("free"))
            .await
            .expect("assign");
        let first = settle(&*store, &debit(&key, BucketKind::Main, 120.0)).await;
        assert!(first.allowed, "{b}");
        assert_eq!(first.tier, "free", "{b}");
        assert!(
            near(first.remaining, 680.0),
            "{b}: new free key starts at 800: {}",
            first.remaining
        );
        // Drain: 5 more of 120 leave 80.
        for _ in 0..5 {
            assert!(
                settle(&*store, &debit(&key, BucketKind::Main, 120.0))
                    .await
                    .allowed,
                "{b}"
            );
        }
        let denied = settle(&*store, &debit(&key, BucketKind::Main, 120.0)).await;
        assert!(!denied.allowed, "{b}");
        assert!(
            near(denied.remaining, 80.0),
            "{b}: nothing charged on denial: {}",
            denied.remaining
        );
        let retry = denied.retry_after_ms.expect("refill covers it");
        assert!(
            (3_800..=4_000).contains(&retry),
            "{b}: (120-80)/10 s ≈ 4000 ms, got {retry}"
        );
        // A cost above capacity can never be paid by refill.
        let never = settle(&*store, &debit(&key, BucketKind::Main, 5000.0)).await;
        assert_eq!(never.retry_after_ms, None, "{b}");

        let pro = ApiKey::parse(&unique("pro")).expect("key");
        store
            .assign_tier(&pro.hash(), Some("pro"))
            .await
            .expect("assign");
        let s = settle(&*store, &debit(&pro, BucketKind::Main, 120.0)).await;
        assert_eq!(s.tier, "pro", "{b}");
        assert!(near(s.remaining, 7880.0), "{b}: {}", s.remaining);
    }
}

#[tokio::test]
async fn prepaid_keys_start_empty_and_never_refill() {
    for store in stores() {
        let b = store.backend();
        let key = ApiKey::parse(&unique("prepaid")).expect("key");
        store
            .assign_tier(&key.hash(), Some("prepaid"))
            .await
            .expect("assign");
        let s = settle(&*store, &debit(&key, BucketKind::Main, 1.0)).await;
        assert!(!s.allowed, "{b}");
        assert_eq!(s.remaining, 0.0, "{b}");
        assert_eq!(s.retry_after_ms, None, "{b}: no refill, no retry time");
    }
}

#[tokio::test]
async fn operational_requests_have_their_own_bucket() {
    for store in stores() {
        let b = store.backend();
        let key = ApiKey::parse(&unique("ops")).expect("key");
        store
            .assign_tier(&key.hash(), Some("free"))
            .await
            .expect("assign");
        // The operational bucket holds 10: the 11th health check in a burst is refused…
        let mut allowed = 0;
        for _ in 0..11 {
            if settle(&*store, &debit(&key, BucketKind::Operational, 1.0))
                .await
                .allowed
            {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 10, "{b}");
        // …and none of it touched the main budget.
        let main = settle(&*store, &debit(&key, BucketKind::Main, 1.0)).await;
        assert!(
            near(main.remaining, 799.0),
            "{b}: main budget untouched: {}",
            main.remaining
        );
    }
}

#[tokio::test]
async fn idempotent_replay_and_refund_once() {
    for store in stores() {
        let b = store.backend();
        let key = ApiKey::parse(&unique("refund")).expect("key");
        store
            .assign_tier(&key.hash(), Some("free"))
            .await
            .expect("assign");
        let d = debit(&key, BucketKind::Main, 120.0);
        let first = settle(&*store, &d).await;
        let replay = settle(&*store, &d).await;
        assert!(replay.replayed && !first.replayed, "{b}");
        assert_eq!(replay.cost, 120.0, "{b}");

        let out = store
            .refund(&key.hash(), &d.request_id)
            .await
            .expect("refund");
        let RefundOutcome::Refunded {
            credited,
            balance,
            tier,
            as_of,
            now,
        } = out
        else {
            panic!("{b}: {out:?}");
        };
        assert!(
            near(credited, 120.0) && near(balance, 800.0),
            "{b}: {credited} {balance}"
        );
        // The store's clock: the debit's time, the replay has none (its balance is the first
        // decision's), and the refund's balance is as of the bucket's clock, which it keeps.
        let at = first.at.expect("a debit's store time");
        assert_eq!(replay.at, None, "{b}");
        assert_eq!(as_of, Some(at), "{b}: the refund keeps the bucket's clock");
        assert!(now >= at, "{b}: {now} {at}");
        assert_eq!(tier, "free", "{b}");
        let again = store
            .refund(&key.hash(), &d.request_id)
            .await
            .expect("refund");
        assert_eq!(again, RefundOutcome::AlreadyRefunded, "{b}");
        let unknown = store
            .refund(&key.hash(), &RequestId::generate())
            .await
            .expect("refund");
        assert_eq!(unknown, RefundOutcome::UnknownRequest, "{b}");
        // Another key cannot refund this key's request.
        let other = ApiKey::parse(&unique("other")).expect("key");
        let stolen = store
            .refund(&other.hash(), &d.request_id)
            .await
            .expect("refund");
        assert_eq!(stolen, RefundOutcome::UnknownRequest, "{b}");

        let ops = debit(&key, BucketKind::Operational, 1.0);
        settle(&*store, &ops).await;
        let out = store
            .refund(&key.hash(), &ops.request_id)
            .await
            .expect("refund");
        assert_eq!(out, RefundOutcome::NotRefundable, "{b}");
    }
}

/// Payment-API idempotency keys: the same id for another request is refused and charges
/// nothing; the first request's retries still replay; the record stays bound.
#[tokio::test]
async fn a_request_id_reused_for_another_request_is_a_conflict_and_charges_nothing() {
    for store in stores() {
        let b = store.backend();
        let key = ApiKey::parse(&unique("conflict")).expect("key");
        store
            .assign_tier(&key.hash(), Some("norefill"))
            .await
            .expect("assign");
        let id = RequestId::parse("r-1").expect("id");
        let cheap = Debit {
            key: key.hash(),
            bucket: BucketKind::Main,
            cost: 1.0,
            request_id: id.clone(),
            fingerprint: Fingerprint::of(BucketKind::Main, Some("GET"), "/cheap", 1.0),
            force: false,
            terms: enforcer::store::SettleTerms::default(),
            candidate: None,
        };
        let first = settle(&*store, &cheap).await;
        assert!(first.allowed && !first.replayed, "{b}");
        assert_eq!(first.remaining, 799.0, "{b}");
        // The expensive call under the same id: refused, 20 times over, nothing charged.
        let expensive = Debit {
            cost: 120.0,
            fingerprint: Fingerprint::of(BucketKind::Main, Some("POST"), "/generate-report", 1.0),
            ..cheap.clone()
        };
        for _ in 0..20 {
            let out = store.debit(&expensive).await.expect("debit");
            assert_eq!(out, DebitOutcome::Conflict, "{b}");
        }
        // Every parameter is bound: method, endpoint, units and bucket.
        for other in [
            Fingerprint::of(BucketKind::Main, Some("POST"), "/cheap", 1.0),
            Fingerprint::of(BucketKind::Main, Some("GET"), "/cheap2", 1.0),
            Fingerprint::of(BucketKind::Main, Some("GET"), "/cheap", 2.0),
            Fingerprint::of(BucketKind::Main, None, "/cheap", 1.0),
        ] {
            let d = Debit {
                fingerprint: other,
                ..cheap.clone()
            };
            assert_eq!(
                store.debit(&d).await.expect("debit"),
                DebitOutcome::Conflict,
                "{b}"
            );
        }
        let ops = Debit {
            bucket: BucketKind::Operational,
            fingerprint: Fingerprint::of(BucketKind::Operational, Some("GET"), "/cheap", 1.0),
            ..cheap.clone()
        };
        assert_eq!(
            store.debit(&ops).await.expect("debit"),
            DebitOutcome::Conflict,
            "{b}"
        );
        // The genuine retry still replays, and the balance shows one charge of 1.
        let retry = settle(&*store, &cheap).await;
        assert!(retry.replayed && retry.allowed, "{b}");
        let probe = settle(&*store, &debit(&key, BucketKind::Main, 1.0)).await;
        assert_eq!(
            probe.remaining, 798.0,
            "{b}: only the cheap call and the probe were charged"
        );
        // Another key may use the same id: records are per key.
        let other = ApiKey::parse(&unique("conflict-other")).expect("key");
        store
            .assign_tier(&other.hash(), Some("norefill"))
            .await
            .expect("assign");
        let theirs = Debit {
            key: other.hash(),
            ..expensive.clone()
        };
        let s = settle(&*store, &theirs).await;
        assert!(s.allowed && !s.replayed, "{b}");
    }
}

/// A refund closes the request: the same request sent again is a new attempt, charged again
/// (and refundable again), not a free replay.
#[tokio::test]
async fn a_retry_after_its_refund_is_charged_again() {
    for store in stores() {
        let b = store.backend();
        let key = ApiKey::parse(&unique("refund-retry")).expect("key");
        store
            .assign_tier(&key.hash(), Some("norefill"))
            .await
            .expect("assign");
        let d = debit(&key, BucketKind::Main, 120.0);
        let first = settle(&*store, &d).await;
        assert_eq!(first.remaining, 680.0, "{b}");
        let out = store
            .refund(&key.hash(), &d.request_id)
            .await
            .expect("refund");
        assert!(
            matches!(out, RefundOutcome::Refunded { .. }),
            "{b}: {out:?}"
        );
        let again = settle(&*store, &d).await;
        assert!(
            again.allowed && !again.replayed,
            "{b}: charged as a new attempt"
        );
        assert_eq!(again.remaining, 680.0, "{b}");
        let replay = settle(&*store, &d).await;
        assert!(replay.replayed, "{b}: its retries replay again");
        let out = store
            .refund(&key.hash(), &d.request_id)
            .await
            .expect("refund");
        assert!(
            matches!(out, RefundOutcome::Refunded { .. }),
            "{b}: the new attempt is refundable: {out:?}"
        );
        // A different request under the refunded id is still a conflict.
        let other = Debit {
            fingerprint: Fingerprint::of(BucketKind::Main, Some("GET"), "/cheap", 1.0),
            cost: 1.0,
            ..d.clone()
        };
        assert_eq!(
            store.debit(&other).await.expect("debit"),
            DebitOutcome::Conflict,
            "{b}"
        );
    }
}

/// A forced debit (local fail-soft spending debited back) is charged even when the balance
/// cannot pay, so the balance goes below zero and the key waits; a retry under its id is a
/// free replay; it is not refundable; the debt is not forgiven by forgetting the bucket.
#[tokio::test]
async fn a_forced_debit_goes_below_zero_and_its_replay_is_free() {
    for store in stores() {
        let b = store.backend();
        let key = ApiKey::parse(&unique("forced")).expect("key");
        store
            .assign_tier(&key.hash(), Some("norefill"))
            .await
            .expect("assign");
        settle(&*store, &debit(&key, BucketKind::Main, 700.0)).await;
        let back = enforcer::decision::local::debit_back(
            key.hash(),
            BucketKind::Main,
            RequestId::parse(&unique("lb")).expect("id"),
            250.0,
        );
        assert!(back.force);
        let s = settle(&*store, &back).await;
        assert!(s.allowed && !s.replayed, "{b}");
        assert_eq!(s.remaining, -150.0, "{b}: 800 - 700 - 250");
        assert_eq!(s.tier, "norefill", "{b}");
        // The same debit-back again (its answer was lost): a replay, nothing charged.
        for _ in 0..3 {
            let again = settle(&*store, &back).await;
            assert!(again.replayed, "{b}");
            assert_eq!(again.cost, 250.0, "{b}");
        }
        // Not refundable: the spending happened.
        let out = store
            .refund(&key.hash(), &back.request_id)
            .await
            .expect("refund");
        assert_eq!(out, RefundOutcome::NotRefundable, "{b}");
        // An ordinary debit is denied, and says refill will never cover it (no refill).
        let probe = settle(&*store, &debit(&key, BucketKind::Main, 1.0)).await;
        assert!(!probe.allowed, "{b}");
        assert_eq!(probe.remaining, -150.0, "{b}: charged once");
        // The same id for another amount is a conflict, not a second charge.
        let other = enforcer::decision::local::debit_back(
            key.hash(),
            BucketKind::Main,
            back.request_id.clone(),
            1.0,
        );
        assert_eq!(
            store.debit(&other).await.expect("debit"),
            DebitOutcome::Conflict,
            "{b}"
        );
        // The operational bucket takes forced debits too.
        let ops = enforcer::decision::local::debit_back(
            key.hash(),
            BucketKind::Operational,
            RequestId::parse(&unique("lb")).expect("id"),
            25.0,
        );
        let s = settle(&*store, &ops).await;
        assert!(s.allowed, "{b}");
        assert!(s.remaining < 0.0, "{b}: {} below zero", s.remaining);
    }
}

/// The heartbeat counts daemons: the Redis store by a set of live node ids that expire, the
/// in-process store (one process) as 1.
#[tokio::test]
async fn the_heartbeat_counts_live_daemons() {
    let redis = RedisStore::new(
        &RedisStoreConfig {
            url: redis_url(),
            connections: 1,
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(2),
            ..RedisStoreConfig::default()
        },
        &policy(),
    )
    .expect("redis store");
    let a = unique("node-a");
    let b = unique("node-b");
    let ttl = Duration::from_secs(60);
    // Other tests (or a daemon) may beat on the shared Redis too: compare with a baseline.
    let base = redis.heartbeat(&a, ttl).await.expect("heartbeat");
    assert!(base >= 1);
    assert_eq!(redis.heartbeat(&b, ttl).await.expect("heartbeat"), base + 1);
    assert_eq!(
        redis.heartbeat(&a, ttl).await.expect("heartbeat"),
        base + 1,
        "a node beating again is counted once"
    );
    // A short heartbeat expires, and is no longer counted.
    let c = unique("node-c");
    let n = redis
        .heartbeat(&c, Duration::from_millis(200))
        .await
        .expect("heartbeat");
    assert!(n >= base + 2, "{n}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let after = redis.heartbeat(&a, ttl).await.expect("heartbeat");
    assert!(after < n, "the expired node is dropped: {after} < {n}");
    let memory = MemoryStore::new(policy(), Arc::new(ManualClock::at(0.0)));
    assert_eq!(memory.heartbeat("x", ttl).await.expect("heartbeat"), 1);
}

#[tokio::test]
async fn denied_requests_are_not_remembered_so_a_later_retry_can_pass() {
    for store in stores() {
        let b = store.backend();
        let key = ApiKey::parse(&unique("retry")).expect("key");
        store
            .assign_tier(&key.hash(), Some("free"))
            .await
            .expect("assign");
        settle(&*store, &debit(&key, BucketKind::Main, 790.0)).await;
        let d = debit(&key, BucketKind::Main, 100.0);
        assert!(!settle(&*store, &d).await.allowed, "{b}");
        let out = store
            .refund(&key.hash(), &d.request_id)
            .await
            .expect("refund");
        assert_eq!(
            out,
            RefundOutcome::UnknownRequest,
            "{b}: a denial charged nothing to refund"
        );
    }
}

#[tokio::test]
async fn memory_store_refills_by_its_clock_like_the_script() {
    let clock = ManualClock::at(1_000.0);
    let store = MemoryStore::new(Config::default().budget_policy(), Arc::new(clock.clone()));
    let key = ApiKey::parse("clock-key").expect("key");
    let s = settle(&store, &debit(&key, BucketKind::Main, 800.0)).await;
    assert_eq!(s.remaining, 0.0);
    clock.advance(10.0);
    let s = settle(&store, &debit(&key, BucketKind::Main, 50.0)).await;
    assert_eq!(s.remaining, 50.0, "10 s × 10/s refilled, 50 spent");
    clock.advance(600.0);
    let s = settle(&store, &debit(&key, BucketKind::Main, 1.0)).await;
    assert_eq!(s.remaining, 799.0, "idle: capped at 800");
    // After the forget time the bucket is gone: memory stays bounded.
    clock.advance(10_000.0);
    for i in 0..2048 {
        let k = ApiKey::parse(&format!("filler-{i}")).expect("key");
        settle(&store, &debit(&k, BucketKind::Main, 1.0)).await;
        clock.advance(1.0);
    }
    assert!(
        store.bucket_count() < 2049,
        "expired buckets are swept: {}",
        store.bucket_count()
    );
}

fn granted(out: GrantOutcome, b: &str) -> (f64, bool) {
    match out {
        GrantOutcome::Granted {
            balance, replayed, ..
        } => (balance, replayed),
        other => panic!("{b}: grant not applied: {other:?}"),
    }
}

#[tokio::test]
async fn a_grant_adds_whole_up_to_the_ceiling_once_per_id_and_is_spent() {
    for store in stores() {
        let b = store.backend();
        let key = ApiKey::parse(&unique("grant")).expect("key");
        let h = key.hash();
        // Unknown keys (refused by this policy) have no budget to grant to.
        assert_eq!(
            store
                .grant(&h, 10.0, &RequestId::generate())
                .await
                .expect("grant"),
            GrantOutcome::UnknownKey,
            "{b}"
        );
        store
            .assign_tier(&h, Some("norefill"))
            .await
            .expect("assign");
        // A fresh key: nothing stored, what a first request would start at.
        let fresh = store.inspect(&h).await.expect("inspect");
        assert_eq!(fresh.tier.as_deref(), Some("norefill"), "{b}");
        assert_eq!(fresh.assigned.as_deref(), Some("norefill"), "{b}");
        assert_eq!(fresh.balance, Some(800.0), "{b}");
        assert!(!fresh.stored, "{b}");
        assert_eq!(fresh.operational, 10.0, "{b}");
        let first = RequestId::generate();
        assert_eq!(
            granted(store.grant(&h, 150.0, &first).await.expect("grant"), b),
            (950.0, false),
            "{b}: on top of the initial 800"
        );
        // Past the ceiling (max_tokens 1000 by default): refused whole, nothing changed.
        match store
            .grant(&h, 100.0, &RequestId::generate())
            .await
            .expect("grant")
        {
            GrantOutcome::OverCeiling {
                balance,
                ceiling,
                tier,
            } => {
                assert_eq!(
                    (balance, ceiling, tier.as_str()),
                    (950.0, 1000.0, "norefill"),
                    "{b}"
                );
            }
            other => panic!("{b}: {other:?}"),
        }
        let now = store.inspect(&h).await.expect("inspect");
        assert_eq!(now.balance, Some(950.0), "{b}");
        assert!(now.stored, "{b}");
        // The grant is spendable: 950 pays 950, then nothing is left.
        let spent = settle(&*store, &debit(&key, BucketKind::Main, 950.0)).await;
        assert!(spent.allowed, "{b}");
        assert_eq!(spent.remaining, 0.0, "{b}");
        // The same grant id again is a replay: nothing added.
        let (_, replayed) = granted(store.grant(&h, 150.0, &first).await.expect("grant"), b);
        assert!(replayed, "{b}");
        assert_eq!(
            store.inspect(&h).await.expect("inspect").balance,
            Some(0.0),
            "{b}"
        );
        // Bad amounts are refused by the store too, nothing written.
        for bad in [0.0, -5.0, f64::NAN, f64::INFINITY, 1e16] {
            assert!(
                store.grant(&h, bad, &RequestId::generate()).await.is_err(),
                "{b}: {bad}"
            );
        }
        assert_eq!(
            store.inspect(&h).await.expect("inspect").balance,
            Some(0.0),
            "{b}"
        );
    }
}

#[tokio::test]
async fn a_prepaid_key_topped_up_by_a_grant_can_spend_it() {
    for store in stores() {
        let b = store.backend();
        let key = ApiKey::parse(&unique("prepaid-grant")).expect("key");
        let h = key.hash();
        store
            .assign_tier(&h, Some("prepaid"))
            .await
            .expect("assign");
        assert!(
            !settle(&*store, &debit(&key, BucketKind::Main, 1.0))
                .await
                .allowed,
            "{b}"
        );
        assert_eq!(
            granted(
                store
                    .grant(&h, 300.0, &RequestId::generate())
                    .await
                    .expect("grant"),
                b
            )
            .0,
            300.0,
            "{b}"
        );
        let s = settle(&*store, &debit(&key, BucketKind::Main, 120.0)).await;
        assert!(s.allowed, "{b}");
        assert_eq!(s.remaining, 180.0, "{b}");
    }
}

#[tokio::test]
async fn credits_granted_above_what_refill_reaches_are_never_forgotten_or_capped() {
    let url = redis_url();
    for store in stores() {
        let b = store.backend();
        let key = ApiKey::parse(&unique("topup")).expect("key");
        let h = key.hash();
        store.assign_tier(&h, Some("topup")).await.expect("assign");
        let (balance, _) = granted(
            store
                .grant(&h, 4000.0, &RequestId::generate())
                .await
                .expect("grant"),
            b,
        );
        assert!(near(balance, 4800.0), "{b}: {balance}");
        // Refill does not cap a balance above capacity: a debit takes only its cost.
        let s = settle(&*store, &debit(&key, BucketKind::Main, 100.0)).await;
        assert!(s.allowed && near(s.remaining, 4700.0), "{b}: {s:?}");
        if b == "redis" {
            // Forgetting an idle bucket restarts it at initial_tokens: one holding granted
            // credits must not expire.
            // (The module's store in database 0, the script's in database 1.)
            use redis::AsyncCommands as _;
            let mut ttls = Vec::new();
            for db in [url.clone(), format!("{}/1", url.trim_end_matches('/'))] {
                let mut conn = enforcer_tests::redis_conn(&db).await;
                let ttl: i64 = conn
                    .pttl(format!("ptb:{{{}}}:b", h.to_hex()))
                    .await
                    .expect("pttl");
                ttls.push(ttl);
            }
            ttls.sort_unstable();
            assert_eq!(
                ttls,
                [-2, -1],
                "a bucket above what refill reaches has no expiry (and lives in one database)"
            );
        }
    }
}

/// A reservation of `estimate` tokens for `units` units on a key of the `norefill` tier (its
/// balance moves only by what the test does, so every number is exact).
async fn reserve(
    store: &dyn TokenStore,
    key: &ApiKey,
    estimate: f64,
    units: f64,
    max_cost: Option<f64>,
) -> Debit {
    let d = Debit {
        terms: SettleTerms {
            units,
            max_cost,
            reserve: true,
        },
        ..debit(key, BucketKind::Main, estimate)
    };
    let s = settle(store, &d).await;
    assert!(s.allowed && !s.replayed, "{}: {s:?}", store.backend());
    d
}

async fn norefill_key(store: &dyn TokenStore, name: &str) -> ApiKey {
    let key = ApiKey::parse(&unique(name)).expect("key");
    store
        .assign_tier(&key.hash(), Some("norefill"))
        .await
        .expect("assign");
    key
}

async fn balance(store: &dyn TokenStore, key: &ApiKey) -> f64 {
    store
        .inspect(&key.hash())
        .await
        .expect("inspect")
        .balance
        .expect("a known key")
}

/// `(cost, estimate, charged, capped, balance, replayed)` of a settle that must succeed.
async fn settled(
    store: &dyn TokenStore,
    key: &ApiKey,
    d: &Debit,
    cost: TrueCost,
) -> (f64, f64, f64, bool, f64, bool) {
    match store
        .settle(&key.hash(), &d.request_id, cost)
        .await
        .expect("settle")
    {
        SettleOutcome::Settled {
            cost,
            estimate,
            charged,
            capped,
            balance,
            tier,
            at,
            replayed,
        } => {
            assert_eq!(tier, "norefill", "{}", store.backend());
            assert_eq!(at.is_none(), replayed, "{}", store.backend());
            (cost, estimate, charged, capped, balance, replayed)
        }
        other => panic!("{}: unexpected {other:?}", store.backend()),
    }
}

#[tokio::test]
async fn a_settle_charges_the_difference_once_and_a_second_true_cost_is_a_conflict() {
    for store in stores() {
        let (b, store) = (store.backend(), &*store);
        let key = norefill_key(store, "settle-up").await;
        // 800 - 500 reserved.
        let d = reserve(store, &key, 500.0, 500.0, None).await;
        assert_eq!(
            settled(store, &key, &d, TrueCost::Tokens(650.0)).await,
            (650.0, 500.0, 150.0, false, 150.0, false),
            "{b}"
        );
        assert_eq!(balance(store, &key).await, 150.0, "{b}");
        // The same true cost again (in units: 1 token per unit): a replay, nothing charged.
        assert_eq!(
            settled(store, &key, &d, TrueCost::Units(650.0)).await,
            (650.0, 500.0, 150.0, false, 150.0, true),
            "{b}"
        );
        assert_eq!(balance(store, &key).await, 150.0, "{b}");
        // Another true cost: refused, nothing changed.
        let out = store
            .settle(&key.hash(), &d.request_id, TrueCost::Tokens(700.0))
            .await
            .expect("settle");
        assert_eq!(out, SettleOutcome::Conflict { cost: 650.0 }, "{b}");
        assert_eq!(balance(store, &key).await, 150.0, "{b}");
        // A retry of the check answers with the true cost, charges nothing.
        let retry = settle(store, &d).await;
        assert!(retry.replayed && retry.cost == 650.0, "{b}: {retry:?}");
        assert_eq!(balance(store, &key).await, 150.0, "{b}");
        // A refund afterwards gives back what was really charged.
        let out = store
            .refund(&key.hash(), &d.request_id)
            .await
            .expect("refund");
        assert!(
            matches!(out, RefundOutcome::Refunded { credited, balance, .. } if credited == 650.0 && balance == 800.0),
            "{b}: {out:?}"
        );
        let out = store
            .settle(&key.hash(), &d.request_id, TrueCost::Tokens(650.0))
            .await
            .expect("settle");
        assert_eq!(out, SettleOutcome::AlreadyRefunded, "{b}");
    }
}

#[tokio::test]
async fn a_settle_below_the_estimate_credits_back_capped_at_capacity() {
    for store in stores() {
        let (b, store) = (store.backend(), &*store);
        let key = norefill_key(store, "settle-down").await;
        let d = reserve(store, &key, 500.0, 500.0, None).await;
        // In units, at the price the request was charged at (1 token per unit).
        assert_eq!(
            settled(store, &key, &d, TrueCost::Units(120.0)).await,
            (120.0, 500.0, -380.0, false, 680.0, false),
            "{b}"
        );
        // Settling to 0 is a refund: all of it back, capped at capacity (1000).
        let key = norefill_key(store, "settle-zero").await;
        let d = reserve(store, &key, 300.0, 3.0, None).await;
        let grant = store
            .grant(&key.hash(), 400.0, &RequestId::generate())
            .await
            .expect("grant");
        assert!(
            matches!(grant, GrantOutcome::Granted { balance, .. } if balance == 900.0),
            "{b}"
        );
        assert_eq!(
            settled(store, &key, &d, TrueCost::Tokens(0.0)).await,
            (0.0, 300.0, -100.0, false, 1000.0, false),
            "{b}: 900 + 300 credited up to 1000"
        );
    }
}

#[tokio::test]
async fn units_given_back_settle_at_the_checked_units_less_them_floored_at_zero() {
    for store in stores() {
        let (b, store) = (store.backend(), &*store);
        let key = norefill_key(store, "settle-back").await;
        // 10 units at 50 tokens each: 800 - 500 reserved.
        let d = reserve(store, &key, 500.0, 10.0, None).await;
        // 4 units given back (Envoy's is_negative_hits): settled at 6 units, 200 credited.
        assert_eq!(
            settled(store, &key, &d, TrueCost::UnitsReturned(4.0)).await,
            (300.0, 500.0, -200.0, false, 500.0, false),
            "{b}"
        );
        // The same again, or the same true units said directly: a replay.
        for again in [TrueCost::UnitsReturned(4.0), TrueCost::Units(6.0)] {
            assert_eq!(
                settled(store, &key, &d, again).await,
                (300.0, 500.0, -200.0, false, 500.0, true),
                "{b}"
            );
        }
        // More given back than were checked: floored at 0, all of it back (a refund).
        let d = reserve(store, &key, 100.0, 2.0, None).await;
        assert_eq!(
            settled(store, &key, &d, TrueCost::UnitsReturned(7.0)).await,
            (0.0, 100.0, -100.0, false, 500.0, false),
            "{b}"
        );
        // A bad amount changes nothing.
        let d = reserve(store, &key, 100.0, 2.0, None).await;
        for bad in [-1.0, f64::NAN, 2e15] {
            assert!(
                store
                    .settle(&key.hash(), &d.request_id, TrueCost::UnitsReturned(bad))
                    .await
                    .is_err(),
                "{b}: {bad}"
            );
        }
        assert_eq!(balance(store, &key).await, 400.0, "{b}");
    }
}

#[tokio::test]
async fn a_settle_may_leave_the_bucket_below_zero_and_the_key_then_waits() {
    for store in stores() {
        let (b, store) = (store.backend(), &*store);
        let key = norefill_key(store, "settle-debt").await;
        let d = reserve(store, &key, 500.0, 10.0, None).await;
        // 10 units at 50 tokens each were reserved; 30 were used.
        assert_eq!(
            settled(store, &key, &d, TrueCost::Units(30.0)).await,
            (1500.0, 500.0, 1000.0, false, -700.0, false),
            "{b}"
        );
        let next = settle(store, &debit(&key, BucketKind::Main, 1.0)).await;
        assert!(!next.allowed, "{b}: a key in debt is refused");
        assert_eq!(next.remaining, -700.0, "{b}");
    }
}

#[tokio::test]
async fn a_settle_above_max_cost_is_charged_max_cost_and_says_so() {
    for store in stores() {
        let (b, store) = (store.backend(), &*store);
        let key = norefill_key(store, "settle-cap").await;
        let d = reserve(store, &key, 200.0, 1.0, Some(600.0)).await;
        assert_eq!(
            settled(store, &key, &d, TrueCost::Tokens(5000.0)).await,
            (600.0, 200.0, 400.0, true, 200.0, false),
            "{b}"
        );
        // The same asked-for cost is the replay (the cap applied again), not a conflict.
        assert_eq!(
            settled(store, &key, &d, TrueCost::Tokens(5000.0)).await,
            (600.0, 200.0, 400.0, true, 200.0, true),
            "{b}"
        );
        let out = store
            .settle(&key.hash(), &d.request_id, TrueCost::Tokens(600.0))
            .await
            .expect("settle");
        assert_eq!(out, SettleOutcome::Conflict { cost: 600.0 }, "{b}");
    }
}

#[tokio::test]
async fn what_cannot_be_settled_is_refused_and_bad_amounts_change_nothing() {
    for store in stores() {
        let (b, store) = (store.backend(), &*store);
        let key = norefill_key(store, "settle-refused").await;
        let unknown = store
            .settle(&key.hash(), &RequestId::generate(), TrueCost::Tokens(1.0))
            .await
            .expect("settle");
        assert_eq!(unknown, SettleOutcome::UnknownRequest, "{b}");
        let ops = debit(&key, BucketKind::Operational, 1.0);
        settle(store, &ops).await;
        let out = store
            .settle(&key.hash(), &ops.request_id, TrueCost::Tokens(2.0))
            .await
            .expect("settle");
        assert_eq!(out, SettleOutcome::NotSettleable, "{b}");
        let forced = Debit {
            force: true,
            ..debit(&key, BucketKind::Main, 10.0)
        };
        settle(store, &forced).await;
        let out = store
            .settle(&key.hash(), &forced.request_id, TrueCost::Tokens(2.0))
            .await
            .expect("settle");
        assert_eq!(out, SettleOutcome::NotSettleable, "{b}");
        // Another key cannot settle this key's request.
        let d = reserve(store, &key, 100.0, 1.0, None).await;
        let other = norefill_key(store, "settle-thief").await;
        let stolen = store
            .settle(&other.hash(), &d.request_id, TrueCost::Tokens(0.0))
            .await
            .expect("settle");
        assert_eq!(stolen, SettleOutcome::UnknownRequest, "{b}");
        let before = balance(store, &key).await;
        for bad in [
            TrueCost::Tokens(-1.0),
            TrueCost::Tokens(f64::NAN),
            TrueCost::Tokens(f64::INFINITY),
            TrueCost::Units(-0.5),
            TrueCost::Tokens(2e15),
        ] {
            assert!(
                store.settle(&key.hash(), &d.request_id, bad).await.is_err(),
                "{b}: {bad:?}"
            );
        }
        assert_eq!(balance(store, &key).await, before, "{b}");
        assert_eq!(
            settled(store, &key, &d, TrueCost::Tokens(100.0)).await.2,
            0.0,
            "{b}: still settleable after the refusals"
        );
    }
}

/// Settles racing debits on one key never lose or double a token: every allowed debit and
/// every settle's difference add up to the balance exactly (a tier without refill).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn settles_racing_debits_never_lose_or_double_a_token() {
    for store in stores() {
        let store: Arc<dyn TokenStore> = Arc::from(store);
        let b = store.backend();
        let key = norefill_key(&*store, "settle-race").await;
        let mut reservations = Vec::new();
        for _ in 0..20 {
            reservations.push(reserve(&*store, &key, 10.0, 1.0, None).await);
        }
        assert_eq!(balance(&*store, &key).await, 600.0, "{b}");
        let mut tasks = Vec::new();
        for (i, d) in reservations.into_iter().enumerate() {
            let (store, key) = (store.clone(), key.clone());
            // Half settle above the estimate, half below.
            let true_cost = if i % 2 == 0 { 17.0 } else { 4.0 };
            tasks.push(tokio::spawn(async move {
                match store
                    .settle(&key.hash(), &d.request_id, TrueCost::Tokens(true_cost))
                    .await
                    .expect("settle")
                {
                    SettleOutcome::Settled { charged, .. } => (charged, 0.0),
                    other => panic!("{other:?}"),
                }
            }));
        }
        for _ in 0..70 {
            let (store, key) = (store.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                match store
                    .debit(&debit(&key, BucketKind::Main, 10.0))
                    .await
                    .expect("debit")
                {
                    DebitOutcome::Settled(s) => (0.0, if s.allowed { 10.0 } else { 0.0 }),
                    other => panic!("{other:?}"),
                }
            }));
        }
        let (mut settled_sum, mut debited) = (0.0, 0.0);
        for t in tasks {
            let (s, d) = t.await.expect("task");
            settled_sum += s;
            debited += d;
        }
        assert_eq!(
            settled_sum,
            10.0 * 7.0 - 10.0 * 6.0,
            "{b}: +7 ten times, -6 ten times"
        );
        assert_eq!(
            balance(&*store, &key).await,
            600.0 - settled_sum - debited,
            "{b}: {debited} debited"
        );
        assert!(debited >= 550.0, "{b}: the balance was spent: {debited}");
    }
}

// ---- Wallet grants: grants that expire or have a priority (enforcer/src/wallet.rs) ----

fn expiring(secs: f64, priority: Option<i64>) -> GrantTerms {
    GrantTerms {
        expires_in: Some(secs),
        priority,
    }
}

fn moves(list: &[(&str, f64)]) -> Vec<GrantMove> {
    list.iter()
        .map(|(id, tokens)| GrantMove {
            grant_id: (*id).to_owned(),
            tokens: *tokens,
        })
        .collect()
}

async fn grant_with(
    store: &dyn TokenStore,
    key: &ApiKey,
    tokens: f64,
    id: &str,
    terms: GrantTerms,
) {
    let id = RequestId::parse(id).expect("grant id");
    let out = store
        .grant_with(&key.hash(), tokens, &id, terms)
        .await
        .expect("grant");
    assert!(
        matches!(
            out,
            GrantOutcome::Granted {
                replayed: false,
                ..
            }
        ),
        "{}: {out:?}",
        store.backend()
    );
}

#[tokio::test]
async fn wallet_grants_are_spent_first_by_priority_then_expiry_and_a_denial_takes_nothing() {
    for store in stores() {
        let store = &*store;
        let b = store.backend();
        // A norefill key: its bucket holds 800, and only what the test does moves it.
        let key = norefill_key(store, "wallet-order").await;
        grant_with(store, &key, 100.0, "late", expiring(7200.0, None)).await;
        grant_with(store, &key, 50.0, "soon", expiring(3600.0, None)).await;
        grant_with(
            store,
            &key,
            30.0,
            "vip",
            GrantTerms {
                expires_in: None,
                priority: Some(5),
            },
        )
        .await;
        // No terms: tops up the bucket (spent last). The ceiling (1000) counts it all.
        let id = RequestId::generate();
        let (total, _) = granted(store.grant(&key.hash(), 20.0, &id).await.expect("grant"), b);
        assert_eq!(total, 1000.0, "{b}: 800 + 100 + 50 + 30 + 20");
        match store
            .grant_with(
                &key.hash(),
                1.0,
                &RequestId::generate(),
                expiring(60.0, None),
            )
            .await
            .expect("grant")
        {
            GrantOutcome::OverCeiling { balance, .. } => assert_eq!(balance, 1000.0, "{b}"),
            other => panic!("{b}: {other:?}"),
        }
        let shown = store.inspect(&key.hash()).await.expect("inspect");
        let order: Vec<_> = shown.grants.iter().map(|g| g.id.as_str()).collect();
        assert_eq!(order, ["vip", "soon", "late"], "{b}");
        assert_eq!(shown.balance, Some(820.0), "{b}: the bucket alone");

        // 100: vip's 30, then 70 of "soon"'s 50? No: soon has 50, so 30 + 50 + 20 of late.
        let s = settle(store, &debit(&key, BucketKind::Main, 100.0)).await;
        assert!(s.allowed, "{b}");
        assert_eq!(s.remaining, 900.0, "{b}: remaining counts the grants left");
        assert_eq!(
            s.grants.spent,
            moves(&[("vip", 30.0), ("soon", 50.0), ("late", 20.0)]),
            "{b}"
        );
        assert!(s.grants.expired.is_empty(), "{b}");
        // More than everything: denied, nothing taken anywhere.
        let s = settle(store, &debit(&key, BucketKind::Main, 901.0)).await;
        assert!(!s.allowed, "{b}");
        assert_eq!(s.retry_after_ms, None, "{b}: no refill ever pays it");
        assert!(s.grants.is_empty(), "{b}");
        let shown = store.inspect(&key.hash()).await.expect("inspect");
        assert_eq!(shown.grants.len(), 1, "{b}");
        assert_eq!(shown.grants[0].left, 80.0, "{b}");
        assert_eq!(shown.balance, Some(820.0), "{b}");
        // The rest of "late", then the bucket.
        let s = settle(store, &debit(&key, BucketKind::Main, 100.0)).await;
        assert_eq!(s.grants.spent, moves(&[("late", 80.0)]), "{b}");
        assert_eq!(s.remaining, 800.0, "{b}");
        let shown = store.inspect(&key.hash()).await.expect("inspect");
        assert!(shown.grants.is_empty(), "{b}: emptied grants are gone");
        assert_eq!(shown.balance, Some(800.0), "{b}");
        // The operational bucket never touches the wallet.
        grant_with(store, &key, 5.0, "ops-proof", expiring(3600.0, None)).await;
        let s = settle(store, &debit(&key, BucketKind::Operational, 1.0)).await;
        assert!(s.grants.is_empty(), "{b}");
        assert_eq!(
            store.inspect(&key.hash()).await.expect("inspect").grants[0].left,
            5.0,
            "{b}"
        );
    }
}

#[tokio::test]
async fn an_expired_grant_vanishes_with_its_tokens_and_touches_nothing_else() {
    for t in timed_stores() {
        let store = &*t.store;
        let b = store.backend();
        let key = norefill_key(store, "wallet-expiry").await;
        grant_with(store, &key, 100.0, "short", expiring(1.0, Some(9))).await;
        grant_with(
            store,
            &key,
            50.0,
            "keeps",
            GrantTerms {
                expires_in: None,
                priority: Some(1),
            },
        )
        .await;
        t.pass(1.5).await;
        let shown = store.inspect(&key.hash()).await.expect("inspect");
        assert_eq!(shown.grants.len(), 1, "{b}: expired grants are not shown");
        let s = settle(store, &debit(&key, BucketKind::Main, 10.0)).await;
        assert!(s.allowed, "{b}");
        assert_eq!(
            s.grants.expired,
            moves(&[("short", 100.0)]),
            "{b}: forfeited whole"
        );
        assert_eq!(s.grants.spent, moves(&[("keeps", 10.0)]), "{b}");
        assert_eq!(s.remaining, 840.0, "{b}: 800 in the bucket + 40");
        // Reported once: the next debit finds nothing expired.
        let s = settle(store, &debit(&key, BucketKind::Main, 10.0)).await;
        assert!(s.grants.expired.is_empty(), "{b}");
        assert_eq!(s.remaining, 830.0, "{b}");
        // A grant finds expired ones too, and says so.
        grant_with(store, &key, 10.0, "short2", expiring(1.0, None)).await;
        t.pass(1.5).await;
        match store
            .grant_with(
                &key.hash(),
                5.0,
                &RequestId::generate(),
                expiring(60.0, None),
            )
            .await
            .expect("grant")
        {
            GrantOutcome::Granted {
                expired, balance, ..
            } => {
                assert_eq!(expired, moves(&[("short2", 10.0)]), "{b}");
                assert_eq!(balance, 835.0, "{b}");
            }
            other => panic!("{b}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn wallet_grants_are_bounded_replayed_by_id_and_bad_terms_change_nothing() {
    for store in stores() {
        let store = &*store;
        let b = store.backend();
        let key = norefill_key(store, "wallet-bounds").await;
        for i in 0..enforcer::wallet::MAX_GRANTS {
            grant_with(store, &key, 1.0, &format!("g{i}"), expiring(3600.0, None)).await;
        }
        assert_eq!(
            store
                .grant_with(
                    &key.hash(),
                    1.0,
                    &RequestId::generate(),
                    expiring(3600.0, None)
                )
                .await
                .expect("grant"),
            GrantOutcome::TooManyGrants,
            "{b}"
        );
        // A retried grant id is a replay: nothing added.
        let again = store
            .grant_with(
                &key.hash(),
                1.0,
                &RequestId::parse("g0").expect("id"),
                expiring(3600.0, None),
            )
            .await
            .expect("grant");
        assert!(
            matches!(again, GrantOutcome::Granted { replayed: true, .. }),
            "{b}: {again:?}"
        );
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e10] {
            assert!(
                store
                    .grant_with(
                        &key.hash(),
                        1.0,
                        &RequestId::generate(),
                        expiring(bad, None)
                    )
                    .await
                    .is_err(),
                "{b}: expiry {bad}"
            );
        }
        let shown = store.inspect(&key.hash()).await.expect("inspect");
        assert_eq!(shown.grants.len(), enforcer::wallet::MAX_GRANTS, "{b}");
        assert_eq!(shown.balance, Some(800.0), "{b}");
    }
}

#[tokio::test]
async fn grants_expiring_mid_burst_never_admit_more_than_the_grants_plus_the_bucket() {
    for t in timed_stores() {
        let b = t.store.backend();
        let store: Arc<dyn TokenStore> = Arc::from(t.store);
        let clock = t.clock.clone();
        // Prepaid: the bucket is empty and never refills; only the grants pay.
        let key = ApiKey::parse(&unique("wallet-burst")).expect("key");
        store
            .assign_tier(&key.hash(), Some("prepaid"))
            .await
            .expect("assign");
        // The lasting grant is spent first; the expiring one is being spent when it expires.
        grant_with(&*store, &key, 350.0, "expiring", expiring(1.0, Some(0))).await;
        grant_with(
            &*store,
            &key,
            150.0,
            "lasting",
            GrantTerms {
                expires_in: None,
                priority: Some(1),
            },
        )
        .await;
        let started = std::time::Instant::now();
        let mut tasks = Vec::new();
        // Debits of 5, two at a time every 50 ms of store time, for 2 s: about 200 tokens
        // are asked for before the expiry, 150 of them from "lasting".
        for _ in 0..40 {
            for _ in 0..2 {
                let (store, key) = (store.clone(), key.clone());
                tasks.push(tokio::spawn(async move {
                    match store
                        .debit(&debit(&key, BucketKind::Main, 5.0))
                        .await
                        .expect("debit")
                    {
                        DebitOutcome::Settled(s) => s,
                        other => panic!("{other:?}"),
                    }
                }));
            }
            match &clock {
                Some(clock) => {
                    tokio::task::yield_now().await;
                    clock.advance(0.05);
                }
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let (mut admitted, mut from_grants, mut forfeited) = (0.0, 0.0, 0.0);
        for task in tasks {
            let s = task.await.expect("task");
            if s.allowed {
                admitted += s.cost;
            }
            from_grants += s.grants.spent.iter().map(|m| m.tokens).sum::<f64>();
            forfeited += s.grants.expired.iter().map(|m| m.tokens).sum::<f64>();
        }
        assert!(
            clock.is_some() || started.elapsed() > Duration::from_secs(1),
            "{b}: the burst outlived the grant"
        );
        assert_eq!(admitted, from_grants, "{b}: the empty bucket paid nothing");
        assert_eq!(
            admitted + forfeited,
            500.0,
            "{b}: every granted token was spent or forfeited, once"
        );
        assert!(
            forfeited > 0.0 && admitted < 500.0,
            "{b}: the grant expired with tokens left, mid-burst ({admitted} admitted)"
        );
        let shown = store.inspect(&key.hash()).await.expect("inspect");
        assert!(shown.grants.is_empty(), "{b}: {:?}", shown.grants);
        assert_eq!(shown.balance, Some(0.0), "{b}");
    }
}

// ---- Calendar quotas (enforcer/src/quota.rs, the QUOTA blocks of lua/debit.lua, refund.lua,
// settle.lua): the bucket and the quota both must allow; a denial charges neither.

async fn quota_key(store: &dyn TokenStore, prefix: &str) -> ApiKey {
    let key = ApiKey::parse(&unique(prefix)).expect("key");
    store
        .assign_tier(&key.hash(), Some("quota"))
        .await
        .expect("assign");
    key
}

async fn quota_used(store: &dyn TokenStore, key: &ApiKey) -> f64 {
    let state = store.inspect(&key.hash()).await.expect("inspect");
    state.quota.expect("the quota tier has a quota").used
}

#[tokio::test]
async fn a_quota_that_denies_charges_neither_and_says_when_it_resets() {
    for store in stores() {
        let b = store.backend();
        let key = quota_key(&*store, "qdeny").await;
        let first = settle(&*store, &debit(&key, BucketKind::Main, 300.0)).await;
        assert!(first.allowed, "{b}");
        let q = first.quota.expect("quota answered");
        assert_eq!((q.used, q.amount), (300.0, 500.0), "{b}");
        // The bucket holds 500 and could pay 300 more; the quota has 200 left: denied.
        let denied = settle(&*store, &debit(&key, BucketKind::Main, 300.0)).await;
        assert!(!denied.allowed, "{b}");
        assert_eq!(denied.denied_by, Some(DeniedBy::Quota), "{b}");
        assert_eq!(denied.remaining, 500.0, "{b}: the bucket was not charged");
        let q = denied.quota.expect("quota answered");
        assert_eq!(q.used, 300.0, "{b}: the quota was not charged");
        assert_eq!(
            denied.retry_after_ms,
            Some(q.resets_in_ms),
            "{b}: retry at the reset"
        );
        assert!(
            q.resets_in_ms > 0 && q.resets_in_ms <= 31 * 86_400_000,
            "{b}: a monthly period ends within 31 days: {}",
            q.resets_in_ms
        );
        // What both can pay still goes through, and fills the quota exactly.
        let last = settle(&*store, &debit(&key, BucketKind::Main, 200.0)).await;
        assert!(last.allowed, "{b}");
        assert_eq!(last.remaining, 300.0, "{b}");
        assert_eq!(quota_used(&*store, &key).await, 500.0, "{b}");
        // A cost above the whole allowance never fits: no retry time.
        let never = settle(&*store, &debit(&key, BucketKind::Main, 501.0)).await;
        assert_eq!(never.denied_by, Some(DeniedBy::Both), "{b}");
        assert_eq!(never.retry_after_ms, None, "{b}");
        // Operational requests are outside the token economy and its quota.
        assert!(
            settle(&*store, &debit(&key, BucketKind::Operational, 1.0))
                .await
                .quota
                .is_none(),
            "{b}"
        );
        assert_eq!(quota_used(&*store, &key).await, 500.0, "{b}");
    }
}

#[tokio::test]
async fn a_bucket_that_denies_charges_no_quota_and_forced_debits_count() {
    for store in stores() {
        let b = store.backend();
        // Bucket 800 (no refill), daily quota 5000: the bucket is the tighter one.
        let key = ApiKey::parse(&unique("qbucket")).expect("key");
        store
            .assign_tier(&key.hash(), Some("quota_big"))
            .await
            .expect("assign");
        assert!(
            settle(&*store, &debit(&key, BucketKind::Main, 700.0))
                .await
                .allowed,
            "{b}"
        );
        let denied = settle(&*store, &debit(&key, BucketKind::Main, 200.0)).await;
        assert!(!denied.allowed, "{b}");
        assert_eq!(denied.denied_by, Some(DeniedBy::Bucket), "{b}");
        assert_eq!(denied.remaining, 100.0, "{b}");
        assert_eq!(
            denied.quota.map(|q| q.used),
            Some(700.0),
            "{b}: the quota was not charged"
        );
        assert_eq!(
            denied.retry_after_ms, None,
            "{b}: no refill, no quota reset helps"
        );
        // A forced debit is charged to both, whatever either holds.
        let mut forced = debit(&key, BucketKind::Main, 300.0);
        forced.force = true;
        let f = settle(&*store, &forced).await;
        assert!(f.allowed, "{b}");
        assert_eq!(f.remaining, -200.0, "{b}");
        assert_eq!(f.quota.map(|q| q.used), Some(1000.0), "{b}");
        let state = store.inspect(&key.hash()).await.expect("inspect");
        let q = state.quota.expect("quota");
        assert_eq!((q.used, q.left, q.amount), (1000.0, 4000.0, 5000.0), "{b}");
        assert!(
            q.period_start <= state.at && state.at < q.resets_at,
            "{b}: {q:?}"
        );
        assert!(
            q.resets_at - q.period_start <= 25.0 * 3600.0,
            "{b}: a day: {q:?}"
        );
    }
}

#[tokio::test]
async fn refunds_and_settles_move_the_quota_of_the_period_charged() {
    for store in stores() {
        let b = store.backend();
        let key = quota_key(&*store, "qrefund").await;
        let first = debit(&key, BucketKind::Main, 400.0);
        assert!(settle(&*store, &first).await.allowed, "{b}");
        assert!(
            !settle(&*store, &debit(&key, BucketKind::Main, 200.0))
                .await
                .allowed,
            "{b}: 100 left"
        );
        assert!(matches!(
            store
                .refund(&key.hash(), &first.request_id)
                .await
                .expect("refund"),
            RefundOutcome::Refunded { .. }
        ));
        assert_eq!(
            quota_used(&*store, &key).await,
            0.0,
            "{b}: the quota got it back"
        );
        // A reservation of 100 settled at 250 charges the quota 150 more; at 50, 200 back.
        let mut reserve = debit(&key, BucketKind::Main, 100.0);
        reserve.terms = SettleTerms {
            reserve: true,
            ..SettleTerms::default()
        };
        assert!(settle(&*store, &reserve).await.allowed, "{b}");
        assert_eq!(quota_used(&*store, &key).await, 100.0, "{b}");
        let out = store
            .settle(&key.hash(), &reserve.request_id, TrueCost::Tokens(250.0))
            .await
            .expect("settle");
        assert!(matches!(out, SettleOutcome::Settled { .. }), "{b}: {out:?}");
        assert_eq!(quota_used(&*store, &key).await, 250.0, "{b}");
        // The refund after a settle gives back the true cost charged.
        store
            .refund(&key.hash(), &reserve.request_id)
            .await
            .expect("refund");
        assert_eq!(quota_used(&*store, &key).await, 0.0, "{b}");
    }
}

/// Periods as a daemon would pass them, relative to the store's clock `now`: the current one
/// starting `since` seconds ago.
fn periods_at(now: f64, since: f64) -> QuotaPeriods {
    let start = now - since;
    QuotaPeriods {
        tiers: vec![(
            "quota".to_owned(),
            500.0,
            [start - 5000.0, start, now + 3600.0, now + 7200.0],
        )],
    }
}

async fn debit_in(store: &dyn TokenStore, d: &Debit, p: &QuotaPeriods) -> Settled {
    match store.debit_in_periods(d, p).await.expect("debit") {
        DebitOutcome::Settled(s) => s,
        other => panic!("{}: unexpected {other:?}", store.backend()),
    }
}

#[tokio::test]
async fn usage_resets_at_the_period_boundary_and_old_refunds_stay_in_their_period() {
    for store in stores() {
        let b = store.backend();
        let key = quota_key(&*store, "qreset").await;
        let now = store.inspect(&key.hash()).await.expect("inspect").at;
        // A period that started an hour ago: use 450 of 500.
        let old = periods_at(now, 3600.0);
        let first = debit(&key, BucketKind::Main, 450.0);
        assert!(debit_in(&*store, &first, &old).await.allowed, "{b}");
        assert!(
            !debit_in(&*store, &debit(&key, BucketKind::Main, 100.0), &old)
                .await
                .allowed,
            "{b}"
        );
        // The boundary passed: the period containing the store's clock starts 10 s ago.
        let new = periods_at(now, 10.0);
        let second = debit_in(&*store, &debit(&key, BucketKind::Main, 300.0), &new).await;
        assert!(second.allowed, "{b}: a new period starts at 0");
        assert_eq!(second.quota.map(|q| q.used), Some(300.0), "{b}");
        // Refunding the request of the old period gives the bucket back, not the new
        // period's quota.
        store
            .refund(&key.hash(), &first.request_id)
            .await
            .expect("refund");
        let after = debit_in(&*store, &debit(&key, BucketKind::Main, 250.0), &new).await;
        assert_eq!(
            after.denied_by,
            Some(DeniedBy::Quota),
            "{b}: 300 + 250 > 500"
        );
        assert_eq!(after.quota.map(|q| q.used), Some(300.0), "{b}");
    }
}

#[tokio::test]
async fn a_store_clock_outside_the_periods_passed_is_an_error_and_writes_nothing() {
    for store in stores() {
        let b = store.backend();
        let key = quota_key(&*store, "qskew").await;
        assert!(
            settle(&*store, &debit(&key, BucketKind::Main, 100.0))
                .await
                .allowed
        );
        let before = store.inspect(&key.hash()).await.expect("inspect");
        // All periods ended a day before the store's clock: the daemon's clock is far off.
        let now = before.at;
        let stale = QuotaPeriods {
            tiers: vec![(
                "quota".to_owned(),
                500.0,
                [
                    now - 4.0 * 86_400.0,
                    now - 3.0 * 86_400.0,
                    now - 2.0 * 86_400.0,
                    now - 86_400.0,
                ],
            )],
        };
        let err = store
            .debit_in_periods(&debit(&key, BucketKind::Main, 100.0), &stale)
            .await
            .expect_err("refused");
        assert!(
            matches!(err, enforcer::store::StoreError::Rejected(_)),
            "{b}: {err}"
        );
        assert!(
            err.to_string().contains("outside the quota periods"),
            "{b}: {err}"
        );
        let after = store.inspect(&key.hash()).await.expect("inspect");
        assert_eq!(after.balance, before.balance, "{b}: nothing charged");
        assert_eq!(after.quota.map(|q| q.used), Some(100.0), "{b}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_debits_and_refunds_never_pass_the_quota() {
    for store in stores() {
        let store: Arc<dyn TokenStore> = Arc::from(store);
        let b = store.backend();
        let key = quota_key(&*store, "qrace").await;
        // 40 debits of 30 race 10 refunds of debits already made: the bucket (800) could pay
        // 26 of them, the quota (500) no more than its 500 plus what the refunds give back.
        let mut first = Vec::new();
        for _ in 0..10 {
            let d = debit(&key, BucketKind::Main, 10.0);
            assert!(settle(&*store, &d).await.allowed, "{b}");
            first.push(d);
        }
        let mut tasks = Vec::new();
        for _ in 0..40 {
            let (store, key) = (store.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                let d = debit(&key, BucketKind::Main, 30.0);
                match store.debit(&d).await.expect("debit") {
                    DebitOutcome::Settled(s) => (s.allowed, s.denied_by),
                    other => panic!("{other:?}"),
                }
            }));
        }
        let mut refunds = Vec::new();
        for d in first {
            let (store, key) = (store.clone(), key.clone());
            refunds.push(tokio::spawn(async move {
                store
                    .refund(&key.hash(), &d.request_id)
                    .await
                    .expect("refund")
            }));
        }
        let mut allowed = 0;
        for t in tasks {
            let (ok, denied_by) = t.await.expect("task");
            if ok {
                allowed += 1;
            } else {
                assert_eq!(
                    denied_by,
                    Some(DeniedBy::Quota),
                    "{b}: the bucket had enough"
                );
            }
        }
        for r in refunds {
            assert!(matches!(
                r.await.expect("task"),
                RefundOutcome::Refunded { .. }
            ));
        }
        // Usage is exactly what was charged and kept: never above the allowance.
        let used = quota_used(&*store, &key).await;
        assert_eq!(used, 30.0 * f64::from(allowed), "{b}: {allowed} allowed");
        assert!(used <= 500.0, "{b}: {used}");
        // The 100 of the first debits were all given back, so at least 13 fitted: 400/30.
        assert!(allowed >= 13, "{b}: {allowed}");
        let balance = store
            .inspect(&key.hash())
            .await
            .expect("inspect")
            .balance
            .expect("known");
        assert_eq!(
            balance,
            800.0 - used,
            "{b}: the bucket was charged what the quota was"
        );
    }
}

#[tokio::test]
async fn a_quota_denial_takes_nothing_from_the_wallet_grants_either() {
    for store in stores() {
        let store = &*store;
        let b = store.backend();
        // Bucket 800 (no refill), quota 500 a month.
        let key = quota_key(store, "quota-wallet").await;
        assert!(
            settle(store, &debit(&key, BucketKind::Main, 490.0))
                .await
                .allowed,
            "{b}"
        );
        grant_with(store, &key, 50.0, "promo", expiring(3600.0, None)).await;
        // The grant and the bucket could pay 20; the quota cannot.
        let s = settle(store, &debit(&key, BucketKind::Main, 20.0)).await;
        assert!(!s.allowed, "{b}");
        assert_eq!(s.denied_by, Some(DeniedBy::Quota), "{b}");
        assert!(s.grants.spent.is_empty(), "{b}: {:?}", s.grants);
        let shown = store.inspect(&key.hash()).await.expect("inspect");
        assert_eq!(shown.grants.len(), 1, "{b}");
        assert_eq!(shown.grants[0].left, 50.0, "{b}");
        assert_eq!(shown.balance, Some(310.0), "{b}");
        // Within the quota, the grant pays first.
        let s = settle(store, &debit(&key, BucketKind::Main, 10.0)).await;
        assert!(s.allowed, "{b}");
        assert_eq!(s.grants.spent, moves(&[("promo", 10.0)]), "{b}");
        assert_eq!(
            s.remaining, 350.0,
            "{b}: 310 in the bucket + 40 in the grant"
        );
        assert_eq!(quota_used(store, &key).await, 500.0, "{b}");
    }
}

// ---- Shared budgets: several keys charged against one budget (enforcer/src/budget.rs) ----

/// Two member keys of one fresh shared budget on the `norefill` tier (800 to start, no
/// refill), each with a key limit of `limit` tokens (refilling 1/s) when given, and the
/// policy that says so.
fn shared_policy(limit: Option<f64>) -> (BudgetPolicy, String, ApiKey, ApiKey) {
    let a = ApiKey::parse(&unique("member-a")).expect("key");
    let b = ApiKey::parse(&unique("member-b")).expect("key");
    let name = unique("acme");
    let mut config = enforcer_tests::example_config("");
    config.budget.unknown_keys = enforcer::config::UnknownKeyPolicy::Reject;
    config.tiers.insert(
        "norefill".into(),
        enforcer::config::TierConfig {
            max_tokens: 1000.0,
            refill_per_sec: 0.0,
            idle_cap: 0.8,
            initial_tokens: Some(800.0),
            shadow: false,
            grant_ceiling: Some(5000.0),
            low_balance: Vec::new(),
            quota: None,
        },
    );
    config.shared_budgets.insert(
        name.clone(),
        enforcer::config::SharedBudgetConfig {
            tier: "norefill".into(),
            keys: vec![a.hash().to_hex(), b.hash().to_hex()],
            key_limit: limit.map(|max_tokens| enforcer::config::KeyLimitConfig {
                max_tokens,
                refill_per_sec: 1.0,
            }),
        },
    );
    assert!(config.validate().is_empty(), "{:?}", config.validate());
    (config.budget_policy(), name, a, b)
}

#[tokio::test]
async fn members_of_a_shared_budget_spend_one_balance_with_their_own_request_ids() {
    let (policy, name, a, b) = shared_policy(None);
    for t in timed_stores_with(&policy) {
        let store = &*t.store;
        let bk = store.backend();
        // Unknown keys are refused by this policy, but members need no tier assignment: the
        // budget's tier applies.
        let first = settle(store, &debit(&a, BucketKind::Main, 300.0)).await;
        assert!(first.allowed, "{bk}");
        assert_eq!(
            (first.tier.as_str(), first.remaining),
            ("norefill", 500.0),
            "{bk}"
        );
        let second = settle(store, &debit(&b, BucketKind::Main, 200.0)).await;
        assert_eq!(second.remaining, 300.0, "{bk}: b spends what a left");
        // The same request id on each key: two requests, not a replay of the other's.
        let mut da = debit(&a, BucketKind::Main, 100.0);
        let mut db = debit(&b, BucketKind::Main, 100.0);
        let shared_id = RequestId::generate();
        da.request_id = shared_id.clone();
        db.request_id = shared_id.clone();
        assert!(!settle(store, &da).await.replayed, "{bk}");
        let s = settle(store, &db).await;
        assert!(!s.replayed && s.allowed, "{bk}: {s:?}");
        assert_eq!(s.remaining, 100.0, "{bk}");
        // A retry of a's is a replay, free.
        assert!(settle(store, &da).await.replayed, "{bk}");
        // Refunds are per key and go back to the budget.
        match store.refund(&b.hash(), &shared_id).await.expect("refund") {
            RefundOutcome::Refunded {
                credited, balance, ..
            } => {
                assert_eq!((credited, balance), (100.0, 200.0), "{bk}");
            }
            other => panic!("{bk}: {other:?}"),
        }
        assert_eq!(
            store.refund(&b.hash(), &shared_id).await.expect("refund"),
            RefundOutcome::AlreadyRefunded,
            "{bk}"
        );
        // A request id of one member cannot be refunded through the other.
        let only_a = debit(&a, BucketKind::Main, 10.0);
        settle(store, &only_a).await;
        assert_eq!(
            store
                .refund(&b.hash(), &only_a.request_id)
                .await
                .expect("refund"),
            RefundOutcome::UnknownRequest,
            "{bk}"
        );
        // A settle is per key too, and charges the budget: 30 for a's 10.
        match store
            .settle(&a.hash(), &only_a.request_id, TrueCost::Tokens(30.0))
            .await
            .expect("settle")
        {
            SettleOutcome::Settled {
                charged, balance, ..
            } => assert_eq!((charged, balance), (20.0, 170.0), "{bk}"),
            other => panic!("{bk}: {other:?}"),
        }
        assert_eq!(
            store
                .settle(&b.hash(), &only_a.request_id, TrueCost::Tokens(30.0))
                .await
                .expect("settle"),
            SettleOutcome::UnknownRequest,
            "{bk}"
        );
        // A grant through either member tops up the budget; both see it.
        let (after, _) = granted(
            store
                .grant(&a.hash(), 400.0, &RequestId::generate())
                .await
                .expect("grant"),
            bk,
        );
        assert_eq!(after, 570.0, "{bk}");
        let shown = store.inspect(&b.hash()).await.expect("inspect");
        assert_eq!(shown.balance, Some(570.0), "{bk}");
        assert_eq!(shown.shared_budget.as_deref(), Some(name.as_str()), "{bk}");
        // Operational buckets stay per key.
        let ops = settle(store, &debit(&a, BucketKind::Operational, 1.0)).await;
        assert_eq!(ops.remaining, 9.0, "{bk}");
        assert_eq!(
            store.inspect(&b.hash()).await.expect("inspect").operational,
            10.0,
            "{bk}"
        );
        // More than the budget holds: denied for either member.
        let s = settle(store, &debit(&b, BucketKind::Main, 600.0)).await;
        assert!(!s.allowed, "{bk}");
        assert_eq!(s.denied_by, Some(DeniedBy::Bucket), "{bk}");
    }
}

#[tokio::test]
async fn a_member_key_limit_refuses_that_key_alone_and_charges_nothing() {
    let (policy, _, a, b) = shared_policy(Some(100.0));
    for t in timed_stores_with(&policy) {
        let store = &*t.store;
        let bk = store.backend();
        let s = settle(store, &debit(&a, BucketKind::Main, 80.0)).await;
        assert!(s.allowed, "{bk}");
        // 80 of a's 100 used: 30 more is over a's own limit, though the budget has 720.
        let s = settle(store, &debit(&a, BucketKind::Main, 30.0)).await;
        assert!(!s.allowed, "{bk}");
        assert_eq!(s.denied_by, Some(DeniedBy::KeyLimit), "{bk}");
        // It refills at 1/s: about 10 s (less the time the test took).
        let retry = s.retry_after_ms.expect("a key limit refills");
        assert!((1..=10_000).contains(&retry), "{bk}: {retry}");
        assert_eq!(s.remaining, 720.0, "{bk}: nothing charged");
        // b has its own limit.
        let s = settle(store, &debit(&b, BucketKind::Main, 100.0)).await;
        assert!(s.allowed, "{bk}");
        assert_eq!(s.remaining, 620.0, "{bk}");
        // Above the limit itself: never.
        let s = settle(store, &debit(&b, BucketKind::Main, 101.0)).await;
        assert!(!s.allowed, "{bk}");
        assert_eq!(s.retry_after_ms, None, "{bk}");
        // The in-process store's clock moves on demand: 15 s later a may spend 30 again.
        if let Some(clock) = &t.clock {
            clock.advance(15.0);
            assert!(
                settle(store, &debit(&a, BucketKind::Main, 30.0))
                    .await
                    .allowed,
                "{bk}"
            );
        }
    }
}

/// The contract's policy with a shadow candidate: `norefill` (1000, starting at 800, no refill)
/// has a candidate bucket of 500 starting at 300 (no refill: exact balances); the other tiers
/// keep their numbers.
fn candidate_policy() -> BudgetPolicy {
    add_candidate(policy())
}

/// `p` with the candidate of [`candidate_policy`].
fn add_candidate(mut p: BudgetPolicy) -> BudgetPolicy {
    p.candidate = Some(
        p.tiers
            .iter()
            .map(|t| {
                if t.name == "norefill" {
                    BucketParams {
                        max_tokens: 500.0,
                        refill_per_sec: 0.0,
                        idle_cap: 0.8,
                        initial_tokens: 300.0,
                    }
                } else {
                    t.bucket
                }
            })
            .collect(),
    );
    p
}

fn with_candidate(d: Debit, cost: f64) -> Debit {
    Debit {
        candidate: Some(cost),
        ..d
    }
}

#[tokio::test]
async fn the_shadow_candidate_is_debited_beside_the_real_bucket_and_never_changes_it() {
    for t in timed_stores_with(&candidate_policy()) {
        let store = &*t.store;
        let b = store.backend();
        let key = ApiKey::parse(&unique("candidate")).expect("key");
        store
            .assign_tier(&key.hash(), Some("norefill"))
            .await
            .expect("assign");
        let first = with_candidate(debit(&key, BucketKind::Main, 100.0), 100.0);
        let s = settle(store, &first).await;
        assert!(s.allowed && s.remaining == 700.0, "{b}: {s:?}");
        assert_eq!(
            s.candidate,
            Some(CandidateOutcome {
                allowed: true,
                remaining: 200.0
            }),
            "{b}"
        );
        // A replay answers the first decision and debits neither bucket.
        let again = settle(store, &first).await;
        assert!(
            again.replayed && again.candidate.is_none(),
            "{b}: {again:?}"
        );
        // The candidate cannot pay 250: it denies, the real bucket allows.
        let s = settle(
            store,
            &with_candidate(debit(&key, BucketKind::Main, 100.0), 250.0),
        )
        .await;
        assert!(s.allowed && s.remaining == 600.0, "{b}: {s:?}");
        assert_eq!(
            s.candidate,
            Some(CandidateOutcome {
                allowed: false,
                remaining: 200.0
            }),
            "{b}"
        );
        // 200 left, not 100: the replay did not debit the candidate.
        let s = settle(
            store,
            &with_candidate(debit(&key, BucketKind::Main, 100.0), 150.0),
        )
        .await;
        assert!(s.allowed && s.remaining == 500.0, "{b}: {s:?}");
        assert_eq!(
            s.candidate,
            Some(CandidateOutcome {
                allowed: true,
                remaining: 50.0
            }),
            "{b}"
        );
        // A real denial by budget is still a candidate decision (here a cheaper candidate
        // would allow it), and the real bucket keeps its balance.
        let s = settle(
            store,
            &with_candidate(debit(&key, BucketKind::Main, 900.0), 50.0),
        )
        .await;
        assert!(!s.allowed && s.remaining == 500.0, "{b}: {s:?}");
        assert_eq!(s.denied_by, Some(DeniedBy::Bucket), "{b}");
        assert_eq!(
            s.candidate,
            Some(CandidateOutcome {
                allowed: true,
                remaining: 0.0
            }),
            "{b}"
        );
        // Not evaluated: without a candidate cost, for the operational bucket, for a forced
        // debit (spending that already happened), for an unknown key.
        let plain = settle(store, &debit(&key, BucketKind::Main, 1.0)).await;
        assert!(plain.allowed && plain.candidate.is_none(), "{b}: {plain:?}");
        let ops = settle(
            store,
            &with_candidate(debit(&key, BucketKind::Operational, 1.0), 1.0),
        )
        .await;
        assert!(ops.allowed && ops.candidate.is_none(), "{b}: {ops:?}");
        let forced = Debit {
            force: true,
            ..with_candidate(debit(&key, BucketKind::Main, 1.0), 1.0)
        };
        let forced = settle(store, &forced).await;
        assert!(forced.candidate.is_none(), "{b}: {forced:?}");
        let stranger = ApiKey::parse(&unique("candidate-unknown")).expect("key");
        assert_eq!(
            store
                .debit(&with_candidate(
                    debit(&stranger, BucketKind::Main, 1.0),
                    1.0
                ))
                .await
                .expect("debit"),
            DebitOutcome::UnknownKey,
            "{b}"
        );
        // The real balance is what it is without a candidate: 800 − 3 × 100 − 2 × 1.
        let state = store.inspect(&key.hash()).await.expect("inspect");
        assert_eq!(state.balance, Some(498.0), "{b}");
        // Another tier keeps its enforced numbers for the candidate (free: 1000, refill 10).
        let free = ApiKey::parse(&unique("candidate-free")).expect("key");
        store
            .assign_tier(&free.hash(), Some("free"))
            .await
            .expect("assign");
        let s = settle(
            store,
            &with_candidate(debit(&free, BucketKind::Main, 10.0), 20.0),
        )
        .await;
        let c = s.candidate.expect("a candidate decision");
        assert!(c.allowed && near(c.remaining, 780.0), "{b}: {s:?}");
    }
}

#[tokio::test]
async fn a_store_without_a_candidate_ignores_a_candidate_cost() {
    for store in stores() {
        let b = store.backend();
        let key = ApiKey::parse(&unique("no-candidate")).expect("key");
        store
            .assign_tier(&key.hash(), Some("norefill"))
            .await
            .expect("assign");
        let s = settle(
            &*store,
            &with_candidate(debit(&key, BucketKind::Main, 100.0), 100.0),
        )
        .await;
        assert!(s.allowed && s.candidate.is_none(), "{b}: {s:?}");
    }
}

#[tokio::test]
async fn a_shared_budgets_members_share_its_candidate_bucket_which_ignores_key_limits() {
    let (policy, _, a, b) = shared_policy(Some(150.0));
    for t in timed_stores_with(&add_candidate(policy)) {
        let store = &*t.store;
        let bk = store.backend();
        // The candidate bucket is the budget's (norefill's candidate: 500, starting at 300),
        // in the budget's slot: one call on a cluster.
        let s = settle(
            store,
            &with_candidate(debit(&a, BucketKind::Main, 100.0), 100.0),
        )
        .await;
        assert!(s.allowed && s.remaining == 700.0, "{bk}: {s:?}");
        assert_eq!(
            s.candidate,
            Some(CandidateOutcome {
                allowed: true,
                remaining: 200.0
            }),
            "{bk}"
        );
        let s = settle(
            store,
            &with_candidate(debit(&b, BucketKind::Main, 100.0), 150.0),
        )
        .await;
        assert!(s.allowed && s.remaining == 600.0, "{bk}: {s:?}");
        assert_eq!(
            s.candidate,
            Some(CandidateOutcome {
                allowed: true,
                remaining: 50.0
            }),
            "{bk}: b spends the candidate bucket a left"
        );
        // a's own key limit (150, 100 spent) refuses; the candidate has none and allows.
        let s = settle(
            store,
            &with_candidate(debit(&a, BucketKind::Main, 100.0), 10.0),
        )
        .await;
        assert_eq!(
            (s.allowed, s.denied_by),
            (false, Some(DeniedBy::KeyLimit)),
            "{bk}"
        );
        assert_eq!(
            s.candidate,
            Some(CandidateOutcome {
                allowed: true,
                remaining: 40.0
            }),
            "{bk}"
        );
    }
}

#[tokio::test]
async fn the_memory_stores_request_records_are_capped_and_evictions_counted() {
    // 64 records in all: one per shard. One key's records all live in its account's shard.
    let store = MemoryStore::new(
        Config::default().budget_policy(),
        Arc::new(ManualClock::at(1_000.0)),
    )
    .with_max_records(64);
    let key = ApiKey::parse("capped-records").expect("key");
    let debits: Vec<Debit> = (0..200)
        .map(|_| debit(&key, BucketKind::Main, 1.0))
        .collect();
    for d in &debits {
        assert!(settle(&store, d).await.allowed);
    }
    assert!(store.record_count() <= 64, "{}", store.record_count());
    assert_eq!(
        store.records_evicted(),
        199,
        "each new record of a full shard drops one"
    );
    // The newest request is still known: its retry is a free replay.
    let last = settle(&store, &debits[199]).await;
    assert!(last.replayed, "{last:?}");
    // The oldest was dropped: its retry is charged again (what the metric warns about).
    let first = settle(&store, &debits[0]).await;
    assert!(!first.replayed && first.allowed, "{first:?}");
    // Without a cap worth the name, nothing is dropped.
    let roomy = MemoryStore::new(
        Config::default().budget_policy(),
        Arc::new(ManualClock::at(1_000.0)),
    );
    for _ in 0..200 {
        settle(&roomy, &debit(&key, BucketKind::Main, 1.0)).await;
    }
    assert_eq!(roomy.records_evicted(), 0);
    assert_eq!(roomy.record_count(), 200);
}

/// `store.remember_generated_ids = false`: a request that came without an id (the daemon
/// generated one) leaves no request record, so it cannot be refunded, and the same generated id
/// sent again is charged again (no client can do that: it never sent the id). A client's own
/// id is remembered as always, and so is a reservation, whose settle needs its record.
#[tokio::test]
async fn generated_ids_leave_no_record_when_not_remembered_and_client_ids_always_do() {
    let mut policy = policy();
    policy.remember_generated_ids = false;
    let mut direct = redis::Client::open(redis_url())
        .expect("redis url")
        .get_connection()
        .expect("redis");
    for timed in timed_stores_with(&policy) {
        let (b, store) = (timed.store.backend(), &*timed.store);
        let key = norefill_key(store, "unremembered").await;
        let generated = debit(&key, BucketKind::Main, 100.0);
        assert!(generated.request_id.is_generated());
        let first = settle(store, &generated).await;
        assert!(first.allowed && !first.replayed, "{b}: {first:?}");
        let refund = store
            .refund(&key.hash(), &generated.request_id)
            .await
            .expect("refund");
        assert_eq!(refund, RefundOutcome::UnknownRequest, "{b}");
        let again = settle(store, &generated).await;
        assert!(again.allowed && !again.replayed, "{b}: {again:?}");
        assert_eq!(
            balance(store, &key).await,
            600.0,
            "{b}: charged twice, refunded never"
        );
        if b == "redis" {
            let records: Vec<String> = redis::cmd("KEYS")
                .arg(format!("ptb:{{{}}}:r:*", key.hash().to_hex()))
                .query(&mut direct)
                .expect("KEYS");
            assert!(records.is_empty(), "{b}: {records:?}");
        }

        let client = Debit {
            request_id: RequestId::parse(&unique("client")).expect("id"),
            ..debit(&key, BucketKind::Main, 50.0)
        };
        assert!(!settle(store, &client).await.replayed, "{b}");
        assert!(
            settle(store, &client).await.replayed,
            "{b}: a client's retry is free"
        );
        assert_eq!(balance(store, &key).await, 550.0, "{b}");
        let refund = store
            .refund(&key.hash(), &client.request_id)
            .await
            .expect("refund");
        assert!(
            matches!(refund, RefundOutcome::Refunded { credited, .. } if credited == 50.0),
            "{b}: {refund:?}"
        );

        // A reservation under a generated id is remembered for its settle.
        let reservation = reserve(store, &key, 200.0, 1.0, None).await;
        assert!(reservation.request_id.is_generated());
        let (cost, estimate, charged, _, left, replayed) =
            settled(store, &key, &reservation, TrueCost::Tokens(150.0)).await;
        assert_eq!(
            (cost, estimate, charged, left, replayed),
            (150.0, 200.0, -50.0, 450.0, false),
            "{b}"
        );
    }
}
