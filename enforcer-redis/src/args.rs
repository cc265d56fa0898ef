//! The packed form of `ENFORCER.DEBIT`'s arguments: what the daemon sends and the module reads,
//! in one place so that the two cannot drift apart.
//!
//! Redis makes a string object of every argument of a command (parsed, allocated, counted,
//! freed after the call: ~500 instructions each, docs/benchmarks.md); the debit's 12 or more
//! arguments after its keys cost Redis more than the rule itself. Packed, they are one
//! argument, `<length>:<bytes>` after one another (a netstring without the comma), which the
//! module reads in place. The keys stay separate arguments: Redis Cluster routes by them and
//! ACLs check them.
//!
//! The form is named by the first argument: `<sha1 of debit.lua>` for the script's arguments
//! one by one (as `EVALSHA`), `<sha1 of debit.lua>:p` ([`PACKED`]) for them packed,
//! `<sha1 of debit.lua>:m` ([`MANY`]) for several debits in one call (each command costs Redis
//! its dispatch, its key lookup and its reply's head). A module that predates a form refuses it
//! as another script version, and the daemon then falls back to the script, so daemon and
//! module can still be upgraded in either order.

/// What follows the SHA-1 in the first argument when the arguments are packed.
pub const PACKED: &str = ":p";

/// What follows the SHA-1 in the first argument of a call that makes several debits
/// ([`pack_many`]): the keys of all of them, one after another, then one argument.
pub const MANY: &str = ":m";

/// The last argument of a call of several debits: for each, its key count and its packed
/// arguments ([`pack`]), as two fields of one packed argument. `debits` gives each debit's key
/// count and packed arguments; its keys are the call's keys in the same order.
pub fn pack_many<A: AsRef<[u8]>>(debits: &[(usize, A)]) -> Vec<u8> {
    let size = debits.iter().map(|(_, a)| a.as_ref().len() + 12).sum();
    let mut out = Vec::with_capacity(size);
    let mut count = Vec::with_capacity(4);
    for (nkeys, args) in debits {
        count.clear();
        crate::lua::digits(*nkeys as u64, &mut count);
        field(&count, &mut out);
        field(args.as_ref(), &mut out);
    }
    out
}

/// Most debits [`unpack_many`] reads: far above what the daemon sends in one call (32), and a
/// bound on what one call can make Redis allocate (each debit's arguments are a list of their
/// own).
pub const MAX_DEBITS: usize = 1024;

/// [`pack_many`]'s debits: each one's key count and arguments (borrowed from `packed`); `None`
/// unless `packed` is a non-empty sequence of at most [`MAX_DEBITS`] such pairs whose key
/// counts are each at least 1 and add up to `nkeys`, the call's keys.
pub fn unpack_many(packed: &[u8], nkeys: usize) -> Option<Vec<Debit<'_>>> {
    let fields = unpack(packed)?;
    if fields.is_empty() || fields.len() % 2 != 0 || fields.len() > 2 * MAX_DEBITS {
        return None;
    }
    let mut debits = Vec::with_capacity(fields.len() / 2);
    let mut keys = 0usize;
    for pair in fields.chunks_exact(2) {
        // Digits only (`parse` alone would take a '+').
        if !pair[0].iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n: usize = std::str::from_utf8(pair[0]).ok()?.parse().ok()?;
        if n == 0 {
            return None;
        }
        keys = keys.checked_add(n)?;
        debits.push((n, unpack(pair[1])?));
    }
    (keys == nkeys).then_some(debits)
}

/// One debit of a call of many: its key count and its arguments.
pub type Debit<'a> = (usize, Vec<&'a [u8]>);

/// One `<length>:<bytes>` field.
fn field(bytes: &[u8], out: &mut Vec<u8>) {
    crate::lua::digits(bytes.len() as u64, out);
    out.push(b':');
    out.extend_from_slice(bytes);
}

/// `args` packed into one argument.
pub fn pack<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let size = args.iter().map(|a| a.as_ref().len() + 4).sum();
    let mut out = Vec::with_capacity(size);
    for arg in args {
        field(arg.as_ref(), &mut out);
    }
    out
}

/// Most arguments [`unpack`] reads: far above any debit's (a few dozen, four more per tier
/// with a candidate policy), and a bound on what one call can make Redis allocate (a 512 MB
/// argument of empty fields would otherwise be a 4 GB list).
pub const MAX_ARGS: usize = 1 << 20;

/// The arguments [`pack`] packed into `packed`, borrowed from it; `None` when it is not
/// exactly a sequence of `<length>:<bytes>` (a length that is not decimal digits, longer than
/// 10 digits, or running past the end), or holds more than [`MAX_ARGS`].
pub fn unpack(packed: &[u8]) -> Option<Vec<&[u8]>> {
    let mut args = Vec::with_capacity(24);
    let mut rest = packed;
    while !rest.is_empty() {
        if args.len() == MAX_ARGS {
            return None;
        }
        // The length: 1 to 10 decimal digits (no sign: `parse` would take a '+'), so no
        // overflow on 64 bits and an error, not a wrap, on 32; read by hand, as `parse` after
        // `from_utf8` cost Redis ~150 instructions a field.
        let mut len = 0u64;
        let mut digits = 0;
        for &b in rest.iter().take(11) {
            if !b.is_ascii_digit() {
                break;
            }
            len = len * 10 + u64::from(b - b'0');
            digits += 1;
        }
        if digits == 0 || digits > 10 || rest.get(digits) != Some(&b':') {
            return None;
        }
        let body = &rest[digits + 1..];
        let len = usize::try_from(len).ok().filter(|&l| l <= body.len())?;
        args.push(&body[..len]);
        rest = &body[len..];
    }
    Some(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpack_gives_back_what_pack_packed() {
        let long = "x".repeat(100_000);
        let cases: [&[&str]; 5] = [
            &[],
            &[""],
            &["1", "600000", "ab12", "", "\nfree 0 1e12 1e9 0.8 8e11", "-"],
            &["12:34", ":", "0:", "with\0nul", "\r\n$3\r\n"],
            &[&long, "", &long],
        ];
        for args in cases {
            let packed = pack(args);
            let back = unpack(&packed).expect("unpacks");
            let back: Vec<&str> = back
                .iter()
                .map(|a| std::str::from_utf8(a).expect("utf-8"))
                .collect();
            assert_eq!(back, args);
        }
        assert_eq!(pack(&["ab", ""]), b"2:ab0:");
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            &b"1"[..],
            b":",
            b"1:",
            b"2:a",
            b"a:b",
            b"-1:a",
            b"+1:a",
            b" 1:a",
            b"1:a1",
            b"99999999999:",
            b"18446744073709551616:",
            b"1:a:",
        ] {
            assert_eq!(unpack(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(unpack(b""), Some(vec![]));
        let most = "0:".repeat(MAX_ARGS);
        assert_eq!(unpack(most.as_bytes()).map(|a| a.len()), Some(MAX_ARGS));
        assert_eq!(unpack(format!("{most}0:").as_bytes()), None);
        assert_eq!(unpack(b"0000000001:a"), Some(vec![&b"a"[..]]));
    }

    #[test]
    fn unpack_many_gives_back_each_debit() {
        let first = pack(&["1", "600000", "ab"]);
        let second = pack(&["", "x:y"]);
        let packed = pack_many(&[(4, &first), (1, &second)]);
        let debits = unpack_many(&packed, 5).expect("unpacks");
        assert_eq!(debits.len(), 2);
        assert_eq!(debits[0].0, 4);
        assert_eq!(debits[0].1, vec![&b"1"[..], b"600000", b"ab"]);
        assert_eq!(debits[1].0, 1);
        assert_eq!(debits[1].1, vec![&b""[..], b"x:y"]);
    }

    #[test]
    fn a_malformed_call_of_many_is_refused_as_a_whole() {
        let args = pack(&["1"]);
        let ok = pack_many(&[(2, &args), (1, &args)]);
        assert!(unpack_many(&ok, 3).is_some());
        // Key counts that do not add up to the call's keys, either way.
        assert_eq!(unpack_many(&ok, 2), None);
        assert_eq!(unpack_many(&ok, 4), None);
        // A debit of no keys, a count that is not digits, an odd field, no debit at all.
        assert_eq!(unpack_many(&pack_many(&[(0, &args), (3, &args)]), 3), None);
        assert_eq!(unpack_many(&pack(&["+1", "1:1"]), 1), None);
        assert_eq!(unpack_many(&pack(&["x", "1:1"]), 1), None);
        assert_eq!(unpack_many(&pack(&["1", "1:1", "1"]), 1), None);
        assert_eq!(unpack_many(b"", 0), None);
        // A debit's arguments that are not themselves packed.
        assert_eq!(unpack_many(&pack(&["1", "2:a"]), 1), None);
        // A count past usize.
        assert_eq!(
            unpack_many(&pack(&["18446744073709551615", "", "1", ""]), 0),
            None
        );
        // More debits than MAX_DEBITS, and exactly as many.
        let most = pack_many(&vec![(1, &args); MAX_DEBITS]);
        assert_eq!(
            unpack_many(&most, MAX_DEBITS).map(|d| d.len()),
            Some(MAX_DEBITS)
        );
        let more = pack_many(&vec![(1, &args); MAX_DEBITS + 1]);
        assert_eq!(unpack_many(&more, MAX_DEBITS + 1), None);
    }
}
