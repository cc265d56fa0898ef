//! What the kernel gate enforces, derived from the config: the settings for `CONFIG` and
//! `PORTS`, the exact-path prices for `PRICES`, the tiers' refill rates and shadow modes the
//! snapshots follow, and the config generation that fingerprints all of them.
//!
//! The kernel may under-price (and pass), never over-price (and wrongly reject): see [`plan`].
use crate::config::Config;
use crate::endpoint::TrailingSlash;
use crate::kernel::loader::GateSettings;
use std::time::Duration;

/// What the kernel enforces.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelPlan {
    /// Settings for `CONFIG` and `PORTS`.
    pub settings: GateSettings,
    /// `(method, exact path, price)` entries for `PRICES`: all of them (the map is rebuilt to
    /// exactly these at start, so no price of an older config survives).
    pub prices: Vec<(Option<String>, String, f64)>,
    /// The most expensive price in the kernel: a key below it might be unable to pay for
    /// something, so it gets a snapshot.
    pub max_price: f64,
    /// The tiers as snapshots need them, in config order.
    pub tiers: Vec<TierRule>,
    /// Global shadow mode (`budget.shadow`): no key ever gets a snapshot.
    pub shadow: bool,
    /// Decisions of one key that must carry an address before it is bound to the key
    /// (`kernel.bind_after`; [`crate::kernel::binding`]).
    pub bind_after: u32,
    /// Members of shared budgets: never a snapshot. Their balance moves with every other
    /// member's debits, refunds and grants, which a member's snapshot would not see, so it
    /// could be too low: the kernel would reject a key its budget can pay for.
    pub shared_members: std::collections::HashSet<crate::key::KeyHash>,
}

/// What a tier means for the kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct TierRule {
    /// The tier's name.
    pub name: String,
    /// Refill, tokens per second: the kernel projects a snapshot's balance with it.
    pub refill_per_sec: f64,
    /// Capacity: refill never projects past it.
    pub max_tokens: f64,
    /// Shadow mode: never rejected, so never a snapshot.
    pub shadow: bool,
}

impl KernelPlan {
    /// The rule of the tier called `name`, unless its keys must never be rejected (shadow
    /// mode, global or the tier's) or the config has no such tier.
    pub fn enforced_tier(&self, name: &str) -> Option<&TierRule> {
        if self.shadow {
            return None;
        }
        self.tiers.iter().find(|t| t.name == name && !t.shadow)
    }
}

/// Derives what the kernel needs from the config.
///
/// The kernel may under-price (and pass), never over-price (and wrongly reject):
///
/// - Operational endpoints are priced 0 (they never touch the main budget, and a price of 0
///   always passes).
/// - Wildcard prefixes cannot be matched in the kernel, nor configured paths the gate never
///   looks up (`enforcer_common::path_is_ambiguous`: longer than it hashes, or with a `%`,
///   whose raw spellings are either ambiguous or match no entry). Requests to them get the
///   kernel's default price, so that default is the cheapest of the config's default cost and
///   every such price (an operational wildcard makes it 0).
/// - A request path that may not be in normal form (`//`, dot segments, `%`, `\`) could be any
///   endpoint once normalised: the ambiguous price is the cheapest price of all, 0 when there
///   is an operational endpoint.
/// - The trailing-slash rule reaches the gate, which hashes `/a/` as `/a` when it is `strip`.
///
/// The cheapest price (for L4 identities whose request line was not read) is over main-budget
/// endpoints and the default cost.
///
/// The kernel cannot see `units`: it prices a request as one unit, or as `budget.min_units`
/// when checks may ask for less than one.
pub fn plan(config: &Config) -> KernelPlan {
    let mut prices = Vec::new();
    let mut kernel_default = config.pricing.default_cost;
    let mut min_price = config.pricing.default_cost;
    let mut max_price = config.pricing.default_cost;
    let mut ambiguous_price = config.pricing.default_cost;
    for e in &config.pricing.endpoints {
        let method = (e.method != "*").then(|| e.method.clone());
        let price = if e.operational { 0.0 } else { e.base_cost };
        ambiguous_price = ambiguous_price.min(price);
        if !e.operational {
            min_price = min_price.min(price);
            max_price = max_price.max(price);
        }
        if e.path.ends_with('*') || enforcer_common::path_is_ambiguous(e.path.as_bytes()) {
            kernel_default = kernel_default.min(price);
        } else {
            prices.push((method, e.path.clone(), price));
        }
    }
    // With the pricing engine, a price can fall to `floor × base`: the kernel starts from
    // there (the engine then pushes exact-path prices, never above what userspace charges),
    // and its default and cheapest prices stay there. Checks of less than one unit cost less.
    let mut scale = config.budget.min_units.min(1.0);
    if config.pricing.dynamic {
        scale *= config.pricing.floor;
    }
    if scale != 1.0 {
        kernel_default *= scale;
        min_price *= scale;
        ambiguous_price *= scale;
        for p in &mut prices {
            p.2 *= scale;
        }
    }
    max_price *= config.budget.min_units.min(1.0);
    let mut settings = GateSettings {
        ports: config.kernel.protect_ports.clone(),
        key_header: config.kernel_key_header().to_owned(),
        value_prefix: config.kernel.value_prefix.clone(),
        max_staleness: Duration::from_millis(config.kernel.max_staleness_ms),
        default_price: kernel_default,
        min_price,
        ambiguous_price,
        strip_trailing_slash: config.pricing.trailing_slash == TrailingSlash::Strip,
        generation: 0,
        reset: config.kernel.action == "reset",
    };
    let tiers: Vec<TierRule> = config
        .budget_policy()
        .tiers
        .into_iter()
        .map(|t| TierRule {
            name: t.name,
            refill_per_sec: t.bucket.refill_per_sec,
            max_tokens: t.bucket.max_tokens,
            shadow: t.shadow,
        })
        .collect();
    let shadow = config.budget.shadow;
    let shared_members: std::collections::HashSet<crate::key::KeyHash> = config
        .shared_budgets
        .values()
        .flat_map(|b| b.keys.iter())
        .filter_map(|k| crate::key::KeyHash::from_hex(k))
        .collect();
    let mut members: Vec<String> = shared_members.iter().map(|k| k.to_hex()).collect();
    members.sort_unstable();
    // Snapshots carry a tier's refill rate and exist only outside shadow mode: a change of
    // either must invalidate them, like a change of price. So must a change of shared-budget
    // membership: a key's own old snapshot says nothing about the budget it now spends.
    let fingerprint = format!("{settings:?}{prices:?}{tiers:?}{shadow}{members:?}");
    settings.generation = (enforcer_common::fnv(fingerprint.as_bytes()) as u32) | 1;
    KernelPlan {
        settings,
        prices,
        max_price,
        tiers,
        shadow,
        bind_after: config.kernel.bind_after,
        shared_members,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_never_over_prices() {
        let config = Config::parse(
            r#"
            [pricing]
            default_cost = 2
            [[pricing.endpoints]]
            method = "POST"
            path = "/generate-report"
            base_cost = 120
            [[pricing.endpoints]]
            path = "/cheap/*"
            base_cost = 0.5
            [[pricing.endpoints]]
            method = "GET"
            path = "/health"
            operational = true
            "#,
        )
        .expect("valid");
        let p = plan(&config);
        assert_eq!(
            p.settings.default_price, 0.5,
            "wildcards fall back to the cheapest default"
        );
        assert_eq!(p.settings.min_price, 0.5);
        assert_eq!(p.max_price, 120.0);
        assert!(
            p.prices
                .contains(&(Some("GET".into()), "/health".into(), 0.0))
        );
        assert!(
            p.prices
                .contains(&(Some("POST".into()), "/generate-report".into(), 120.0))
        );
        assert_ne!(p.settings.generation, 0);
    }

    #[test]
    fn ambiguous_paths_are_priced_at_the_cheapest_price_of_all() {
        let text = |trailing: &str, health: bool| {
            let mut t = format!(
                r#"
                [pricing]
                default_cost = 2
                trailing_slash = "{trailing}"
                [[pricing.endpoints]]
                method = "POST"
                path = "/generate-report"
                base_cost = 120
                [[pricing.endpoints]]
                path = "/cheap"
                base_cost = 0.5
                [[pricing.endpoints]]
                path = "/a%7Bb"
                base_cost = 0.25
                [[pricing.endpoints]]
                path = "/.well-known/x"
                base_cost = 3
                "#
            );
            if health {
                t.push_str("[[pricing.endpoints]]\npath = \"/health\"\noperational = true\n");
            }
            Config::parse(&t).expect("valid")
        };
        let p = plan(&text("strip", false));
        assert_eq!(p.settings.ambiguous_price, 0.25, "the cheapest of all");
        assert_eq!(
            p.settings.default_price, 0.25,
            "a path with % is never looked up: its raw spellings get the default"
        );
        assert_eq!(p.settings.min_price, 0.25);
        assert!(p.settings.strip_trailing_slash);
        let paths: Vec<&str> = p.prices.iter().map(|(_, path, _)| path.as_str()).collect();
        assert_eq!(
            paths,
            ["/generate-report", "/cheap"],
            "only paths the gate looks up"
        );
        assert_eq!(
            plan(&text("strip", true)).settings.ambiguous_price,
            0.0,
            "an ambiguous path may be an operational endpoint"
        );
        let keep = plan(&text("keep", false));
        assert!(!keep.settings.strip_trailing_slash);
        assert_ne!(keep.settings.generation, p.settings.generation);
    }

    #[test]
    fn unmatchable_paths_lower_the_kernel_default() {
        let long = format!("/{}", "a".repeat(enforcer_common::MAX_PATH_LEN));
        let config = Config::parse(&format!(
            r#"
            [pricing]
            default_cost = 2
            [[pricing.endpoints]]
            path = "{long}"
            base_cost = 1.5
            "#
        ))
        .expect("valid");
        let p = plan(&config);
        assert_eq!(
            p.settings.default_price, 1.5,
            "a path the kernel cannot hash"
        );
        assert!(p.prices.is_empty());
        let config = Config::parse(
            r#"
            [[pricing.endpoints]]
            path = "/health/*"
            operational = true
            "#,
        )
        .expect("valid");
        assert_eq!(
            plan(&config).settings.default_price,
            0.0,
            "an operational wildcard: unknown paths may be operational, so they pass"
        );
    }

    #[test]
    fn with_the_pricing_engine_the_kernel_starts_at_the_floor() {
        let config = Config::parse(
            r#"
            [pricing]
            default_cost = 2
            dynamic = true
            floor = 0.5
            [[pricing.endpoints]]
            method = "POST"
            path = "/generate-report"
            base_cost = 120
            "#,
        )
        .expect("valid");
        let p = plan(&config);
        assert_eq!(p.settings.default_price, 1.0);
        assert_eq!(p.settings.min_price, 1.0);
        assert!(
            p.prices
                .contains(&(Some("POST".into()), "/generate-report".into(), 60.0))
        );
    }

    #[test]
    fn the_generation_changes_with_the_config_only() {
        let a = plan(&Config::default());
        let b = plan(&Config::default());
        assert_eq!(a.settings.generation, b.settings.generation);
        let mut changed = Config::default();
        changed.pricing.default_cost = 3.0;
        assert_ne!(plan(&changed).settings.generation, a.settings.generation);
    }

    #[test]
    fn tier_refill_and_shadow_are_part_of_the_generation() {
        let base =
            Config::parse("[tiers.free]\nmax_tokens = 100\nrefill_per_sec = 1\n").expect("valid");
        let g = plan(&base).settings.generation;
        let mut faster = base.clone();
        if let Some(t) = faster.tiers.get_mut("free") {
            t.refill_per_sec = 5.0;
        }
        assert_ne!(plan(&faster).settings.generation, g, "refill rate");
        let mut shadowed = base.clone();
        if let Some(t) = shadowed.tiers.get_mut("free") {
            t.shadow = true;
        }
        let p = plan(&shadowed);
        assert_ne!(p.settings.generation, g, "tier shadow mode");
        assert!(
            p.enforced_tier("free").is_none(),
            "a shadowed tier gets no snapshot"
        );
        let mut global = base.clone();
        global.budget.shadow = true;
        let p = plan(&global);
        assert_ne!(p.settings.generation, g, "global shadow mode");
        assert!(p.enforced_tier("free").is_none());
        let p = plan(&base);
        assert_eq!(p.enforced_tier("free").map(|t| t.refill_per_sec), Some(1.0));
        assert!(p.enforced_tier("nope").is_none());
    }

    #[test]
    fn checks_below_one_unit_lower_every_kernel_price() {
        let config = Config::parse(
            r#"
            [budget]
            min_units = 0.25
            [pricing]
            default_cost = 2
            [[pricing.endpoints]]
            method = "POST"
            path = "/generate-report"
            base_cost = 120
            "#,
        )
        .expect("valid");
        let p = plan(&config);
        assert_eq!(p.settings.default_price, 0.5);
        assert_eq!(p.settings.min_price, 0.5);
        assert_eq!(p.max_price, 30.0);
        assert!(
            p.prices
                .contains(&(Some("POST".into()), "/generate-report".into(), 30.0))
        );
        let mut more = config.clone();
        more.budget.min_units = 2.0;
        assert_eq!(
            plan(&more).settings.default_price,
            2.0,
            "at least one unit: the price of one unit is already the least"
        );
    }
}
