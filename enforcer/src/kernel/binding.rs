//! Which client addresses the kernel gate may take for one key (its L4 identity), learnt from
//! the addresses decisions carry.
//!
//! A bound address has its connection starts (SYN) and its key-less request starts judged by
//! that key's budget. Binding an address another key also uses would drop that key's traffic,
//! so the policy ([`Bindings`]) is cautious:
//!
//! - an address is bound to a key only once it was seen with that key `bind_after` times
//!   (`[kernel] bind_after`, default 3; 0: never bind) and never with another key;
//! - an address seen with a second key is *shared* (NAT, an office, a proxy): unbound, and never
//!   bound again;
//! - the memory is bounded, in two separate structures, so that a flood of new addresses cannot
//!   wipe what is known about shared ones. The candidates (addresses seen with one key, the
//!   bound ones among them) are an LRU of at most [`MAX_CANDIDATES`]; a flood evicts only
//!   candidates, which then start counting again. The shared addresses are a set of at most
//!   [`MAX_SHARED`] that nothing evicts; once it is full, no address is bound any more (one it
//!   could not remember as shared might otherwise be bound later).
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

/// Most addresses counted (and bound) at once: the size of the kernel's `BINDINGS` map.
pub const MAX_CANDIDATES: usize = enforcer_common::capacity::BINDINGS as usize;
/// Most addresses remembered as shared.
pub const MAX_SHARED: usize = 65_536;

/// What the kernel's `BINDINGS` map needs after a sighting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing.
    None,
    /// Bind the address to the key.
    Bind(IpAddr, u64),
    /// Remove the address's binding (if any).
    Unbind(IpAddr),
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    key_id: u64,
    seen: u32,
    /// Bound in the kernel (refreshed while its key is tracked).
    bound: bool,
    /// Position in the LRU order.
    stamp: u64,
}

/// The binding policy's memory (see the module docs).
#[derive(Debug)]
pub struct Bindings {
    bind_after: u32,
    max_candidates: usize,
    max_shared: usize,
    candidates: HashMap<IpAddr, Candidate>,
    /// Candidates by their last sighting, oldest first.
    lru: BTreeMap<u64, IpAddr>,
    next_stamp: u64,
    shared: HashSet<IpAddr>,
    /// The shared set overflowed: nothing is bound any more.
    saturated: bool,
    /// A bound address the last sighting evicted (its kernel binding must go).
    evicted: Option<IpAddr>,
}

impl Bindings {
    /// From now on, binds after `bind_after` sightings (a config reload); sightings so far
    /// are kept.
    pub fn set_bind_after(&mut self, bind_after: u32) {
        self.bind_after = bind_after;
    }

    /// Binds after `bind_after` sightings with one key (0: never), with the default bounds.
    pub fn new(bind_after: u32) -> Self {
        Self::with_bounds(bind_after, MAX_CANDIDATES, MAX_SHARED)
    }

    /// The same with other bounds (tests).
    pub fn with_bounds(bind_after: u32, max_candidates: usize, max_shared: usize) -> Self {
        Self {
            bind_after,
            max_candidates: max_candidates.max(1),
            max_shared,
            candidates: HashMap::new(),
            lru: BTreeMap::new(),
            next_stamp: 0,
            shared: HashSet::new(),
            saturated: false,
            evicted: None,
        }
    }

    /// A decision of `key_id` carried `ip`.
    pub fn seen(&mut self, ip: IpAddr, key_id: u64) -> Change {
        if self.bind_after == 0 || self.shared.contains(&ip) {
            return Change::None;
        }
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        match self.candidates.get_mut(&ip) {
            Some(c) if c.key_id != key_id => {
                // Several keys behind one address: never bind it again.
                self.lru.remove(&c.stamp);
                self.candidates.remove(&ip);
                if self.shared.len() < self.max_shared {
                    self.shared.insert(ip);
                } else if !self.saturated {
                    self.saturated = true;
                    tracing::warn!(
                        shared = self.shared.len(),
                        "kernel gate: too many addresses shared by several keys to remember; \
                         no more addresses are bound"
                    );
                }
                Change::Unbind(ip)
            }
            Some(c) => {
                self.lru.remove(&c.stamp);
                self.lru.insert(stamp, ip);
                c.stamp = stamp;
                c.seen = c.seen.saturating_add(1);
                if !c.bound && c.seen >= self.bind_after && !self.saturated {
                    c.bound = true;
                    Change::Bind(ip, key_id)
                } else {
                    Change::None
                }
            }
            None => {
                if self.candidates.len() >= self.max_candidates
                    && let Some((_, oldest)) = self.lru.pop_first()
                {
                    // Its kernel binding (if any) goes too: a binding holds while the daemon's
                    // heartbeat is fresh, and an address forgotten here could not be unbound
                    // when another key shows up behind it.
                    if self.candidates.remove(&oldest).is_some_and(|c| c.bound) {
                        self.evicted = Some(oldest);
                    }
                }
                self.candidates.insert(
                    ip,
                    Candidate {
                        key_id,
                        seen: 1,
                        bound: false,
                        stamp,
                    },
                );
                self.lru.insert(stamp, ip);
                if self.bind_after == 1 && !self.saturated {
                    if let Some(c) = self.candidates.get_mut(&ip) {
                        c.bound = true;
                    }
                    Change::Bind(ip, key_id)
                } else {
                    Change::None
                }
            }
        }
    }

    /// A bound address the last [`Bindings::seen`] evicted from memory: remove its kernel
    /// binding.
    pub fn take_evicted(&mut self) -> Option<IpAddr> {
        self.evicted.take()
    }

    /// The bound addresses and their keys.
    pub fn bound(&self) -> impl Iterator<Item = (IpAddr, u64)> + '_ {
        self.candidates
            .iter()
            .filter(|(_, c)| c.bound)
            .map(|(ip, c)| (*ip, c.key_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(i: u32) -> IpAddr {
        IpAddr::from(i.to_be_bytes())
    }

    #[test]
    fn an_address_is_bound_after_bind_after_sightings_with_one_key() {
        let mut b = Bindings::new(3);
        assert_eq!(b.seen(ip(1), 7), Change::None);
        assert_eq!(b.seen(ip(1), 7), Change::None);
        assert_eq!(b.bound().count(), 0, "twice is not enough");
        assert_eq!(b.seen(ip(1), 7), Change::Bind(ip(1), 7));
        assert_eq!(b.seen(ip(1), 7), Change::None, "bound once");
        assert_eq!(b.bound().collect::<Vec<_>>(), [(ip(1), 7)]);
        let mut once = Bindings::new(1);
        assert_eq!(once.seen(ip(1), 7), Change::Bind(ip(1), 7));
        let mut never = Bindings::new(0);
        for _ in 0..10 {
            assert_eq!(never.seen(ip(1), 7), Change::None);
        }
    }

    #[test]
    fn an_address_seen_with_another_key_is_never_bound_again() {
        let mut b = Bindings::new(3);
        for _ in 0..3 {
            b.seen(ip(1), 7);
        }
        assert_eq!(
            b.seen(ip(1), 8),
            Change::Unbind(ip(1)),
            "bound, then shared"
        );
        for _ in 0..10 {
            assert_eq!(b.seen(ip(1), 7), Change::None);
            assert_eq!(b.seen(ip(1), 8), Change::None);
        }
        assert_eq!(b.bound().count(), 0);
        // Not bound yet when the second key shows up: never bound either.
        b.seen(ip(2), 7);
        assert_eq!(b.seen(ip(2), 8), Change::Unbind(ip(2)));
        for _ in 0..10 {
            assert_eq!(b.seen(ip(2), 8), Change::None);
        }
    }

    #[test]
    fn a_flood_of_new_addresses_does_not_wipe_the_shared_ones() {
        let mut b = Bindings::with_bounds(3, 100, 100);
        b.seen(ip(1), 7);
        b.seen(ip(1), 8);
        for i in 1000..1000 + 10_000 {
            b.seen(ip(i), 9);
        }
        for _ in 0..5 {
            assert_eq!(b.seen(ip(1), 7), Change::None, "still shared");
        }
        assert!(b.candidates.len() <= 100 && b.lru.len() == b.candidates.len());
        // The flood evicted the oldest candidates only: a recent one is still counted.
        b.seen(ip(20_000), 5);
        b.seen(ip(20_000), 5);
        for i in 30_000..30_050 {
            b.seen(ip(i), 9);
        }
        assert_eq!(b.seen(ip(20_000), 5), Change::Bind(ip(20_000), 5));
    }

    #[test]
    fn a_bound_address_evicted_from_memory_is_unbound() {
        let mut b = Bindings::with_bounds(1, 2, 100);
        assert_eq!(b.seen(ip(1), 7), Change::Bind(ip(1), 7));
        assert_eq!(b.seen(ip(2), 8), Change::Bind(ip(2), 8));
        assert_eq!(b.take_evicted(), None);
        // A third address evicts the oldest (bound) one.
        assert_eq!(b.seen(ip(3), 9), Change::Bind(ip(3), 9));
        assert_eq!(b.take_evicted(), Some(ip(1)));
        assert_eq!(b.take_evicted(), None, "told once");
        // An evicted candidate that was never bound needs no unbinding.
        let mut b = Bindings::with_bounds(3, 1, 100);
        b.seen(ip(1), 7);
        b.seen(ip(2), 7);
        assert_eq!(b.take_evicted(), None);
    }

    #[test]
    fn a_full_shared_set_stops_all_binding() {
        let mut b = Bindings::with_bounds(2, 100, 2);
        for i in 1..=3 {
            b.seen(ip(i), 7);
            assert_eq!(b.seen(ip(i), 8), Change::Unbind(ip(i)));
        }
        // ip(3) could not be remembered as shared: it must not be bound later, nor anything.
        for i in [3, 4] {
            for _ in 0..3 {
                assert_eq!(b.seen(ip(i), 8), Change::None);
            }
        }
        assert_eq!(b.bound().count(), 0);
    }
}
