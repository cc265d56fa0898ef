//! Kernel rejection rollups: the gate's per-key rejection counters (`KEY_REJECTS`, running
//! totals) turned into the audit ledger's `kernel_rejections` rows of what changed since the
//! last read.
use crate::ledger::KernelRejections;
use enforcer_common::KeyRejects;
use std::collections::HashMap;
use std::time::Duration;

/// How often the kernel's per-key rejection counts are read into the ledger's rollups.
pub const ROLLUP_EVERY: Duration = Duration::from_secs(10);

/// Turns the kernel's running per-key totals into rollup rows of what changed since the last
/// read. The first read (a daemon start, adopting pinned maps) is only a baseline: counts from
/// before it were (mostly) recorded by the previous daemon. What is lost: the rejections of at
/// most one interval before a crash, and those while no daemon ran (bounded by
/// `max_staleness`: with the daemon gone, the gate stops rejecting).
#[derive(Debug, Default)]
pub struct Rollup {
    last: HashMap<u64, KeyRejects>,
    started: bool,
}

impl Rollup {
    /// The rows for the totals read now (`minute_us`: the minute they are attributed to).
    pub fn rows(
        &mut self,
        totals: Vec<(u64, KeyRejects)>,
        node: &str,
        minute_us: i64,
    ) -> Vec<KernelRejections> {
        let mut rows = Vec::new();
        let mut now = HashMap::with_capacity(totals.len());
        for (key_id, t) in totals {
            if self.started {
                let before = self.last.get(&key_id).copied().unwrap_or_default();
                for (reason, after, before) in [
                    ("l7", t.l7, before.l7),
                    ("l4", t.l4, before.l4),
                    ("blocked", t.blocked, before.blocked),
                ] {
                    // Lower than before: the LRU map evicted and re-created the entry.
                    let delta = if after >= before {
                        after - before
                    } else {
                        after
                    };
                    if delta > 0 {
                        rows.push(KernelRejections {
                            id: uuid::Uuid::now_v7(),
                            minute_us,
                            node: node.to_owned(),
                            key_id: key_id as i64,
                            reason: reason.to_owned(),
                            count: i64::try_from(delta).unwrap_or(i64::MAX),
                        });
                    }
                }
            }
            now.insert(key_id, t);
        }
        self.last = now;
        self.started = true;
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollups_are_deltas_after_a_baseline() {
        let t = |l7, l4, blocked| KeyRejects { l7, l4, blocked };
        let mut r = Rollup::default();
        assert!(r.rows(vec![(1, t(5, 0, 0))], "n", 0).is_empty(), "baseline");
        let rows = r.rows(vec![(1, t(7, 1, 0)), (2, t(3, 0, 0))], "n", 60);
        let got: Vec<(i64, &str, i64)> = rows
            .iter()
            .map(|k| (k.key_id, k.reason.as_str(), k.count))
            .collect();
        assert_eq!(got, vec![(1, "l7", 2), (1, "l4", 1), (2, "l7", 3)]);
        assert!(
            r.rows(vec![(1, t(7, 1, 0))], "n", 120).is_empty(),
            "no change"
        );
        // Evicted and re-created: the new total is the delta.
        let rows = r.rows(vec![(1, t(2, 1, 0))], "n", 180);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].count, 2);
    }
}
