//! Backend selection: the one implementation behind the kernel tables, `simulate` and the
//! userspace data plane.
//!
//! A flow's key (per [`KeyMode`]) is hashed with xxh32 and a per-service seed into a slot of a
//! fixed-size lookup table (`TABLE_SIZE`, a prime), and the slot names the backend. The hashing
//! and slot maths are `ambassador_ebpf::flow_slot`, compiled into the XDP program too; this module
//! builds the table and answers lookups with it, so kernel and userspace cannot disagree.
//!
//! # How the table is filled
//! Like Maglev, the table is a fixed prime-sized array built by the control plane and read with
//! one index by the data plane. Unlike Maglev's round-robin over permutations, each slot goes to
//! the backend with the best *weighted rendezvous* score for that slot (score = `-ln(u) / weight`,
//! `u` a uniform hash of slot and backend). That keeps Maglev's O(1) lookup and even, weighted
//! spread (±0.2% on 65,537 slots) and adds what Maglev only approximates: removing, draining or
//! ejecting a backend moves exactly the slots it owned, adding one moves only the slots it wins,
//! and a weight change moves slots only to or from the backend whose weight changed.

use ambassador_ebpf::{flow_slot, xxh32_40, FlowKey, NO_BACKEND, TABLE_SIZE};

/// One backend's place in the table: a stable identity and a weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Stable identity (the backend's name): the table depends on it, never on list order.
    pub id: String,
    pub weight: u32,
}

/// A built lookup table: `slots[slot]` is an index into the member list, or [`NO_BACKEND`].
/// It keeps each slot's winning score, its runner-up when known, and its members, so the next
/// table can be derived from it by [`Table::rebuild`] in time proportional to what changed.
#[derive(Debug, Clone)]
pub struct Table {
    pub slots: Vec<u32>,
    scores: Vec<f64>,
    /// Each slot's second-best member, or [`NO_BACKEND`] when not known (then a slot whose
    /// owner loses weight is rescored over everyone).
    second: Vec<u32>,
    second_scores: Vec<f64>,
    members: Vec<Member>,
}

/// Tables are equal when they send every slot to the same member.
impl PartialEq for Table {
    fn eq(&self, other: &Table) -> bool {
        self.slots == other.slots && self.members == other.members
    }
}

/// Per-member seed for the rendezvous scores.
fn member_seed(id: &str) -> u32 {
    xxhash_rust::xxh32::xxh32(id.as_bytes(), 0x616d_6261)
}

/// A member's rendezvous score for a slot: lower wins.
#[inline]
fn score(slot: u32, seed: u32, inv_weight: f64) -> f64 {
    let h = xxh32_40(&[slot, 0, 0, 0, 0, 0, 0, 0, 0, 0], seed);
    // u in (0, 1): never 0, so ln is finite.
    let u = (h as f64 + 0.5) / 4_294_967_296.0;
    -u.ln() * inv_weight
}

/// Whether member `a` (with score `sa`) beats member `b` (score `sb`; [`NO_BACKEND`] is beaten
/// by anyone). Ties (vanishingly rare) go to the smaller id, independent of list order.
#[inline]
fn beats(members: &[Member], a: u32, sa: f64, b: u32, sb: f64) -> bool {
    b == NO_BACKEND || sa < sb || (sa == sb && members[a as usize].id < members[b as usize].id)
}

/// The per-member values a table is scored with.
struct Scoring<'a> {
    members: &'a [Member],
    seeds: Vec<u32>,
    inv_w: Vec<f64>,
}

impl<'a> Scoring<'a> {
    fn new(members: &'a [Member]) -> Scoring<'a> {
        Scoring {
            members,
            seeds: members.iter().map(|m| member_seed(&m.id)).collect(),
            inv_w: members.iter().map(|m| 1.0 / m.weight as f64).collect(),
        }
    }

    fn score(&self, slot: usize, i: u32) -> f64 {
        score(slot as u32, self.seeds[i as usize], self.inv_w[i as usize])
    }

    /// The best and second-best members of a slot: ((index, score), (index, score)).
    fn best_two(&self, slot: usize) -> ((u32, f64), (u32, f64)) {
        let (mut b1, mut s1, mut b2, mut s2) =
            (NO_BACKEND, f64::INFINITY, NO_BACKEND, f64::INFINITY);
        for i in 0..self.members.len() as u32 {
            let sc = self.score(slot, i);
            if beats(self.members, i, sc, b1, s1) {
                (b2, s2) = (b1, s1);
                (b1, s1) = (i, sc);
            } else if beats(self.members, i, sc, b2, s2) {
                (b2, s2) = (i, sc);
            }
        }
        ((b1, s1), (b2, s2))
    }
}

impl Table {
    /// Build the table for `members` (weights ≥ 1). An empty member list gives a table of
    /// [`NO_BACKEND`].
    pub fn build(members: &[Member]) -> Table {
        let sc = Scoring::new(members);
        let n = TABLE_SIZE as usize;
        let mut t = Table {
            slots: vec![NO_BACKEND; n],
            scores: vec![f64::INFINITY; n],
            second: vec![NO_BACKEND; n],
            second_scores: vec![f64::INFINITY; n],
            members: members.to_vec(),
        };
        for slot in 0..n {
            t.rescore(&sc, slot);
        }
        t
    }

    fn rescore(&mut self, sc: &Scoring, slot: usize) {
        let ((b1, s1), (b2, s2)) = sc.best_two(slot);
        self.slots[slot] = b1;
        self.scores[slot] = s1;
        self.second[slot] = b2;
        self.second_scores[slot] = s2;
    }

    /// The table for `members`, derived from `prev` (a table for another member list): equal
    /// to [`Table::build`]`(members)`, computed in time proportional to the change. Members that
    /// joined or gained weight are scored on every slot and take the slots they now win; a slot
    /// whose owner left or lost weight goes to its runner-up when that is known and still ahead,
    /// and is rescored over everyone otherwise.
    // Slots index five parallel arrays (old and new owners, scores, runners-up).
    #[allow(clippy::needless_range_loop)]
    pub fn rebuild(prev: &Table, members: &[Member]) -> Table {
        let new_index: std::collections::HashMap<&str, u32> = members
            .iter()
            .enumerate()
            .map(|(i, m)| (m.id.as_str(), i as u32))
            .collect();
        let old_weight: std::collections::HashMap<&str, u32> = prev
            .members
            .iter()
            .map(|m| (m.id.as_str(), m.weight))
            .collect();
        // Members whose scores improved (joined, or heavier): they may take slots anywhere.
        let up: Vec<u32> = (0..members.len() as u32)
            .filter(|&i| {
                let m = &members[i as usize];
                old_weight.get(m.id.as_str()).is_none_or(|&w| m.weight > w)
            })
            .collect();
        if members.is_empty() || prev.members.is_empty() || up.len() * 4 > members.len() {
            return Table::build(members);
        }
        let sc = Scoring::new(members);
        // Old index → (new index or NO_BACKEND if gone, whether its score changed).
        let remap: Vec<(u32, bool)> = prev
            .members
            .iter()
            .map(|m| match new_index.get(m.id.as_str()) {
                Some(&n) => (n, members[n as usize].weight != m.weight),
                None => (NO_BACKEND, true),
            })
            .collect();
        let is_up = {
            let mut v = vec![false; members.len()];
            for &i in &up {
                v[i as usize] = true;
            }
            v
        };
        let n = TABLE_SIZE as usize;
        let mut t = Table {
            slots: Vec::with_capacity(n),
            scores: prev.scores.clone(),
            second: Vec::with_capacity(n),
            second_scores: prev.second_scores.clone(),
            members: members.to_vec(),
        };
        let mut rescored = vec![false; n];
        for slot in 0..n {
            let (o, o_changed) = remap
                .get(prev.slots[slot] as usize)
                .copied()
                .unwrap_or((NO_BACKEND, true));
            let (s2, s2_changed) = remap
                .get(prev.second[slot] as usize)
                .copied()
                .unwrap_or((NO_BACKEND, true));
            // The runner-up stays known only if it is still here; its score is refreshed when
            // its weight changed (a lighter one may have fallen behind others: forget it then).
            let (mut s2, mut s2s) = (s2, t.second_scores[slot]);
            if s2 != NO_BACKEND && s2_changed {
                if is_up[s2 as usize] {
                    s2s = sc.score(slot, s2);
                } else {
                    s2 = NO_BACKEND;
                }
            }
            let owner_down = o == NO_BACKEND || (o_changed && !is_up[o as usize]);
            if !owner_down {
                let os = if o_changed {
                    sc.score(slot, o)
                } else {
                    t.scores[slot]
                };
                // A runner-up that gained weight may now be ahead.
                let ((a, sa), (b, sb)) = if s2 != NO_BACKEND && beats(members, s2, s2s, o, os) {
                    ((s2, s2s), (o, os))
                } else {
                    ((o, os), (s2, s2s))
                };
                t.slots.push(a);
                t.scores[slot] = sa;
                t.second.push(b);
                t.second_scores[slot] = sb;
                continue;
            }
            // The owner left or lost weight.
            let os = (o != NO_BACKEND).then(|| sc.score(slot, o));
            match (s2, os) {
                (NO_BACKEND, _) => {
                    t.slots.push(NO_BACKEND);
                    t.second.push(NO_BACKEND);
                    t.rescore(&sc, slot);
                    rescored[slot] = true;
                }
                (s2, Some(os)) if beats(members, o, os, s2, s2s) => {
                    // Still ahead of the runner-up, which stays the runner-up.
                    t.slots.push(o);
                    t.scores[slot] = os;
                    t.second.push(s2);
                    t.second_scores[slot] = s2s;
                }
                (s2, _) => {
                    // The runner-up takes the slot; who is now second is not known.
                    t.slots.push(s2);
                    t.scores[slot] = s2s;
                    t.second.push(NO_BACKEND);
                    t.second_scores[slot] = f64::INFINITY;
                }
            }
        }
        for &i in &up {
            for slot in 0..n {
                // Rescored slots already weighed everyone; an owner or runner-up that gained
                // weight was refreshed and ordered above.
                if rescored[slot] || t.slots[slot] == i || t.second[slot] == i {
                    continue;
                }
                let s = sc.score(slot, i);
                if beats(members, i, s, t.slots[slot], t.scores[slot]) {
                    t.second[slot] = t.slots[slot];
                    t.second_scores[slot] = t.scores[slot];
                    t.slots[slot] = i;
                    t.scores[slot] = s;
                } else if t.second[slot] != NO_BACKEND
                    && beats(members, i, s, t.second[slot], t.second_scores[slot])
                {
                    t.second[slot] = i;
                    t.second_scores[slot] = s;
                }
            }
        }
        t
    }

    /// The member index for a slot.
    pub fn at(&self, slot: u32) -> u32 {
        self.slots[slot as usize]
    }
}

/// Everything needed to pick a backend for a flow of one service.
#[derive(Debug, Clone)]
pub struct Selector {
    pub key_mode: u32,
    pub seed: u32,
    pub table: Table,
}

/// The flow a packet or connection belongs to, from socket addresses (host form): the kernel's
/// own [`FlowKey`], so userspace hashes exactly what the XDP program hashes.
pub fn flow_key(src: std::net::SocketAddr, dst: std::net::SocketAddr, proto: u8) -> FlowKey {
    let (src_w, family) = wire_addr(src.ip());
    let (dst_w, _) = wire_addr(dst.ip());
    FlowKey {
        src: src_w,
        dst: dst_w,
        sport: ambassador_ebpf::wire_port(src.port()),
        dport: ambassador_ebpf::wire_port(dst.port()),
        proto,
        family,
        _pad: 0,
    }
}

/// Wire words and family of an address.
pub fn wire_addr(ip: std::net::IpAddr) -> ([u32; 4], u8) {
    match ip {
        std::net::IpAddr::V4(a) => (
            ambassador_ebpf::addr4(a.octets()),
            ambassador_ebpf::FAMILY_V4,
        ),
        std::net::IpAddr::V6(a) => (
            ambassador_ebpf::addr6(a.octets()),
            ambassador_ebpf::FAMILY_V6,
        ),
    }
}

/// The default per-service seed: derived from the name so it is stable across restarts and nodes.
pub fn service_seed(name: &str) -> u32 {
    xxhash_rust::xxh32::xxh32(name.as_bytes(), 0x7365_7276)
}

impl Selector {
    /// The table slot of a flow.
    pub fn slot(&self, f: &FlowKey) -> u32 {
        flow_slot(
            self.key_mode,
            self.seed,
            &f.src,
            &f.dst,
            f.sport,
            f.dport,
            f.proto,
            f.family,
        )
    }

    /// The member index a new flow goes to, or `None` when the service has no backend.
    pub fn pick(&self, f: &FlowKey) -> Option<usize> {
        match self.table.at(self.slot(f)) {
            NO_BACKEND => None,
            i => Some(i as usize),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambassador_ebpf::{hash_input, KeyMode};

    fn members(ws: &[u32]) -> Vec<Member> {
        ws.iter()
            .enumerate()
            .map(|(i, &w)| Member {
                id: format!("backend-{i}"),
                weight: w,
            })
            .collect()
    }

    /// 1M client keys, spread like real client addresses.
    fn keys(n: u32) -> impl Iterator<Item = u32> {
        (0..n).map(|i| i.wrapping_mul(2_654_435_761).rotate_left(7) ^ 0x0a00_0000)
    }

    fn shares(sel: &Selector, n: usize, count: u32) -> Vec<f64> {
        let mut c = vec![0u64; n];
        for k in keys(count) {
            let f = FlowKey {
                src: [k, 0, 0, 0],
                proto: 6,
                family: 4,
                ..FlowKey::default()
            };
            c[sel.pick(&f).unwrap()] += 1;
        }
        c.iter().map(|&x| x as f64 / count as f64).collect()
    }

    fn selector(ws: &[u32]) -> Selector {
        Selector {
            key_mode: KeyMode::SrcIp as u32,
            seed: 42,
            table: Table::build(&members(ws)),
        }
    }

    #[test]
    fn rebuild_equals_build_after_any_change() {
        use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(7);
        let mut ms = members(&[1; 20]);
        let mut t = Table::build(&ms);
        for step in 0..150 {
            let what = rng.gen_range(0..5);
            match what {
                0 | 1 => {
                    let i = rng.gen_range(0..ms.len());
                    ms[i].weight = rng.gen_range(1..100);
                }
                2 if ms.len() > 2 => {
                    let i = rng.gen_range(0..ms.len());
                    ms.remove(i);
                }
                3 => ms.push(Member {
                    id: format!("new-{step}"),
                    weight: rng.gen_range(1..100),
                }),
                _ => ms.shuffle(&mut rng),
            }
            let inc = Table::rebuild(&t, &ms);
            assert_eq!(
                inc.slots,
                Table::build(&ms).slots,
                "step {step} (change {what})"
            );
            t = inc;
        }
        // To and from no members at all.
        assert!(Table::rebuild(&t, &[])
            .slots
            .iter()
            .all(|&s| s == NO_BACKEND));
        let empty = Table::build(&[]);
        assert_eq!(Table::rebuild(&empty, &ms).slots, Table::build(&ms).slots);
    }

    #[test]
    fn xxh32_40_is_xxh32() {
        for i in 0..1000u32 {
            let w = hash_input(
                KeyMode::FiveTuple as u32,
                &[i, i.wrapping_mul(7), 3, 4],
                &[5, 6, i ^ 0xdead_beef, 8],
                (i as u16).wrapping_mul(31),
                443,
                6,
                6,
            );
            let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
            let seed = i.wrapping_mul(0x9e37_79b9);
            assert_eq!(
                xxh32_40(&w, seed),
                xxhash_rust::xxh32::xxh32(&bytes, seed),
                "input {i}"
            );
        }
    }

    #[test]
    fn shares_follow_weights_within_one_percent_over_1m_keys() {
        for ws in [
            &[9, 1][..],
            &[1, 1, 1],
            &[5, 3, 2],
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        ] {
            let total: u32 = ws.iter().sum();
            let got = shares(&selector(ws), ws.len(), 1_000_000);
            for (i, &w) in ws.iter().enumerate() {
                let want = w as f64 / total as f64;
                assert!(
                    (got[i] - want).abs() <= 0.01,
                    "weights {ws:?}: backend {i} got {:.4}, want {want:.4}",
                    got[i]
                );
            }
        }
    }

    #[test]
    fn removing_one_of_n_moves_only_its_keys() {
        for n in [2usize, 3, 5, 10, 20] {
            let all = members(&vec![1; n]);
            let before = Table::build(&all);
            for removed in [0, n / 2, n - 1] {
                let rest: Vec<Member> = all
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != removed)
                    .map(|(_, m)| m.clone())
                    .collect();
                let after = Table::build(&rest);
                let (mut moved, mut wrong) = (0u32, 0u32);
                for s in 0..TABLE_SIZE {
                    let b = &all[before.at(s) as usize].id;
                    let a = &rest[after.at(s) as usize].id;
                    if a != b {
                        moved += 1;
                        if before.at(s) as usize != removed {
                            wrong += 1;
                        }
                    }
                }
                let frac = moved as f64 / TABLE_SIZE as f64;
                assert_eq!(wrong, 0, "n={n}: slots of surviving backends moved");
                assert!(
                    frac <= 1.1 / n as f64,
                    "n={n}: {frac:.4} of keys moved, bound {:.4}",
                    1.1 / n as f64
                );
            }
        }
    }

    #[test]
    fn table_ignores_member_order() {
        let m = members(&[3, 1, 2]);
        let mut r = m.clone();
        r.reverse();
        let (a, b) = (Table::build(&m), Table::build(&r));
        for s in 0..TABLE_SIZE {
            assert_eq!(m[a.at(s) as usize].id, r[b.at(s) as usize].id);
        }
    }

    #[test]
    fn empty_service_has_no_backend() {
        let sel = selector(&[]);
        let f = flow_key(
            "10.0.0.1:1234".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
            6,
        );
        assert_eq!(sel.pick(&f), None);
    }

    #[test]
    fn src_ip_24_groups_a_slash_24() {
        let sel = Selector {
            key_mode: KeyMode::SrcIp24 as u32,
            ..selector(&[1, 1, 1, 1])
        };
        let dst = "10.0.0.2:80".parse().unwrap();
        let pick = |s: &str| sel.pick(&flow_key(s.parse().unwrap(), dst, 6));
        assert_eq!(pick("192.0.2.1:1000"), pick("192.0.2.254:2000"));
        let distinct: std::collections::HashSet<_> = (0..64)
            .map(|i| pick(&format!("192.0.{i}.1:1000")))
            .collect();
        assert!(distinct.len() > 1, "different /24s should spread");
    }
}
