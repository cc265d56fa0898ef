//! One ledger line, written by hand: the same bytes `serde_json` writes for an [`Entry`], at
//! a fraction of the work for a decision's row.
//!
//! Every decision writes one row (~400 bytes of JSON) before its answer when the journal is on.
//! Through serde, every field name went through `serde_json`'s string escaper at every row, and
//! so did the 64-character key hash: 6 k of the daemon's ~86 k instructions per decision
//! (`cargo xtask bench daemon`, docs/benchmarks.md). Here the field names are literals and a
//! string is copied as is when it holds nothing to escape (the common case: hex, ids, paths);
//! only what needs escaping, numbers and addresses go through `serde_json`. The unit tests
//! compare the output byte for byte with `serde_json::to_vec` on rows with every field set and
//! unset and on strings that need escaping, so the file format cannot drift from the
//! `Deserialize` side that reads it back (`audit import`, the spill replay).
use super::{AuditRow, Entry};
use crate::json::{boolean, int, number, opt_number, opt_string, serde, string};

/// `entry` as `serde_json::to_writer` writes it, appended to `out`.
pub fn write(entry: &Entry, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    match entry {
        Entry::Decision(row) => {
            write_row(row, out);
            Ok(())
        }
        // Once a minute per key and reason: not worth a writer of its own.
        other => serde_json::to_writer(out, other),
    }
}

fn write_row(r: &AuditRow, out: &mut Vec<u8>) {
    // Every field named: a field added to the row without its line here does not compile.
    let AuditRow {
        id: _,
        at_us: _,
        key_hash: _,
        tier: _,
        endpoint: _,
        method: _,
        units: _,
        cost: _,
        multiplier: _,
        allowed: _,
        remaining: _,
        decided_by: _,
        denial: _,
        request_id: _,
        node: _,
        kind: _,
        client_ip: _,
        note: _,
        operator: _,
        true_cost: _,
        settle_by_us: _,
        candidate_allowed: _,
        candidate_cost: _,
    } = r;
    out.extend_from_slice(br#"{"t":"decision","id":"#);
    crate::json::uuid(&r.id, out);
    out.extend_from_slice(br#","at_us":"#);
    int(r.at_us, out);
    out.extend_from_slice(br#","key_hash":"#);
    string(&r.key_hash, out);
    out.extend_from_slice(br#","tier":"#);
    opt_string(r.tier.as_deref(), out);
    out.extend_from_slice(br#","endpoint":"#);
    string(&r.endpoint, out);
    out.extend_from_slice(br#","method":"#);
    string(&r.method, out);
    out.extend_from_slice(br#","units":"#);
    number(r.units, out);
    out.extend_from_slice(br#","cost":"#);
    number(r.cost, out);
    out.extend_from_slice(br#","multiplier":"#);
    number(r.multiplier, out);
    out.extend_from_slice(br#","allowed":"#);
    boolean(r.allowed, out);
    out.extend_from_slice(br#","remaining":"#);
    opt_number(r.remaining, out);
    out.extend_from_slice(br#","decided_by":"#);
    string(&r.decided_by, out);
    out.extend_from_slice(br#","denial":"#);
    opt_string(r.denial.as_deref(), out);
    out.extend_from_slice(br#","request_id":"#);
    opt_string(r.request_id.as_deref(), out);
    out.extend_from_slice(br#","node":"#);
    string(&r.node, out);
    out.extend_from_slice(br#","kind":""#);
    out.extend_from_slice(r.kind.as_str().as_bytes());
    out.extend_from_slice(br#"","client_ip":"#);
    match r.client_ip {
        Some(ip) => serde(&ip, out),
        None => out.extend_from_slice(b"null"),
    }
    // The fields serde skips when they are `None`.
    if let Some(note) = &r.note {
        out.extend_from_slice(br#","note":"#);
        string(note, out);
    }
    if let Some(operator) = &r.operator {
        out.extend_from_slice(br#","operator":"#);
        string(operator, out);
    }
    if let Some(v) = r.true_cost {
        out.extend_from_slice(br#","true_cost":"#);
        number(v, out);
    }
    if let Some(v) = r.settle_by_us {
        out.extend_from_slice(br#","settle_by_us":"#);
        int(v, out);
    }
    if let Some(v) = r.candidate_allowed {
        out.extend_from_slice(br#","candidate_allowed":"#);
        boolean(v, out);
    }
    if let Some(v) = r.candidate_cost {
        out.extend_from_slice(br#","candidate_cost":"#);
        number(v, out);
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{KernelRejections, RowKind};

    fn rows() -> Vec<AuditRow> {
        let base = AuditRow::sample(1_733_000_000_123_456, "ab".repeat(32));
        let mut all = base.clone();
        all.tier = None;
        all.allowed = false;
        all.remaining = None;
        all.denial = Some("exhausted".into());
        all.request_id = Some("0190b3c4-aaaa-7bbb-8ccc-123456789abc".into());
        all.kind = RowKind::Settle;
        all.client_ip = Some("2001:db8::1".parse().expect("ip"));
        all.note = Some("why \"not\"\n\u{1}\\ é 🚀".into());
        all.operator = Some("uid:0".into());
        all.true_cost = Some(0.1 + 0.2);
        all.settle_by_us = Some(-1);
        all.candidate_allowed = Some(false);
        all.candidate_cost = Some(1e300);
        let mut odd = base.clone();
        odd.endpoint = "/a\"b\\c\u{0}\u{7f}\u{2028}".into();
        odd.method = String::new();
        odd.units = f64::NAN;
        odd.cost = f64::INFINITY;
        odd.multiplier = -0.0;
        odd.remaining = Some(f64::MIN_POSITIVE);
        odd.client_ip = Some("10.0.0.1".parse().expect("ip"));
        odd.candidate_allowed = Some(true);
        odd.kind = RowKind::GrantExpiry;
        odd.at_us = i64::MIN;
        // Strings with one kind of byte to escape each (a check that missed one would copy
        // it raw).
        let mut quote = base.clone();
        quote.denial = Some("a\"b".into());
        quote.node = "back\\slash".into();
        quote.decided_by = "tab\tonly".into();
        quote.tier = Some("\u{1f}".into());
        let mut v = vec![base, all, odd, quote];
        // Every kind, and numbers across the range.
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        for i in 0..2000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut r = v[(i % 4) as usize].clone();
            r.cost = f64::from_bits(x) % 1e12;
            r.remaining = Some((x % 1_000_000) as f64 / 7.0);
            r.at_us = x as i64;
            r.kind = [
                RowKind::Debit,
                RowKind::Refund,
                RowKind::Grant,
                RowKind::Alert,
                RowKind::Settle,
                RowKind::GrantSpend,
                RowKind::GrantExpiry,
                RowKind::ReservationExpiry,
            ][(x % 8) as usize];
            v.push(r);
        }
        v
    }

    #[test]
    fn a_row_is_the_bytes_serde_writes() {
        for row in rows() {
            let entry = Entry::Decision(row);
            let mut ours = Vec::new();
            write(&entry, &mut ours).expect("writes");
            let theirs = serde_json::to_vec(&entry).expect("serde");
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&theirs)
            );
        }
    }

    #[test]
    fn a_kernel_rollup_is_serdes() {
        let entry = Entry::Kernel(KernelRejections {
            id: uuid::Uuid::now_v7(),
            minute_us: 60_000_000,
            node: "n".into(),
            key_id: -5,
            reason: "l7".into(),
            count: 3,
        });
        let mut ours = Vec::new();
        write(&entry, &mut ours).expect("writes");
        assert_eq!(ours, serde_json::to_vec(&entry).expect("serde"));
    }
}
