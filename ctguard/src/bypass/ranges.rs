//! Sets of integers stored as sorted, merged, inclusive ranges: ports
//! (0..=65535), protocol numbers, and IPv4/IPv6 addresses (as u128). The
//! selector uses them for its ports, the conflict analysis for every field
//! an nft rule can compare.
use std::fmt;

#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RangeSet {
    /// The largest value of the domain (65535 for ports, u32::MAX for IPv4).
    max: u128,
    /// Sorted, non-overlapping, non-adjacent inclusive ranges.
    ranges: Vec<(u128, u128)>,
}

impl RangeSet {
    pub fn empty(max: u128) -> Self {
        RangeSet { max, ranges: Vec::new() }
    }

    pub fn full(max: u128) -> Self {
        RangeSet { max, ranges: vec![(0, max)] }
    }

    pub fn single(v: u128, max: u128) -> Self {
        Self::from_ranges([(v, v)], max)
    }

    /// Builds a set from ranges in any order, clamping them to the domain
    /// and dropping reversed ones.
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u128, u128)>, max: u128) -> Self {
        let mut v: Vec<(u128, u128)> =
            ranges.into_iter().filter(|(lo, hi)| lo <= hi && *lo <= max).map(|(lo, hi)| (lo, hi.min(max))).collect();
        v.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(v.len());
        for (lo, hi) in v {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        RangeSet { max, ranges: merged }
    }

    pub fn max(&self) -> u128 {
        self.max
    }

    pub fn ranges(&self) -> &[(u128, u128)] {
        &self.ranges
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.ranges == [(0, self.max)]
    }

    /// Number of values (saturating).
    pub fn len(&self) -> u128 {
        self.ranges.iter().fold(0u128, |acc, (lo, hi)| acc.saturating_add(hi - lo).saturating_add(1))
    }

    pub fn contains(&self, v: u128) -> bool {
        self.ranges.iter().any(|(lo, hi)| *lo <= v && v <= *hi)
    }

    pub fn union(&self, other: &RangeSet) -> RangeSet {
        Self::from_ranges(self.ranges.iter().chain(other.ranges.iter()).copied(), self.max)
    }

    pub fn complement(&self) -> RangeSet {
        let mut out = Vec::new();
        let mut next = Some(0u128);
        for (lo, hi) in &self.ranges {
            if let Some(n) = next
                && *lo > n
            {
                out.push((n, lo - 1));
            }
            next = hi.checked_add(1).filter(|n| *n <= self.max);
        }
        if let Some(n) = next {
            out.push((n, self.max));
        }
        RangeSet { max: self.max, ranges: out }
    }

    pub fn intersect(&self, other: &RangeSet) -> RangeSet {
        let mut out = Vec::new();
        let (mut i, mut j) = (0, 0);
        while i < self.ranges.len() && j < other.ranges.len() {
            let (a, b) = (self.ranges[i], other.ranges[j]);
            let (lo, hi) = (a.0.max(b.0), a.1.min(b.1));
            if lo <= hi {
                out.push((lo, hi));
            }
            if a.1 < b.1 { i += 1 } else { j += 1 }
        }
        RangeSet { max: self.max, ranges: out }
    }

    pub fn is_subset_of(&self, other: &RangeSet) -> bool {
        self.intersect(other) == *self
    }

    pub fn is_disjoint(&self, other: &RangeSet) -> bool {
        self.intersect(other).is_empty()
    }
}

impl fmt::Debug for RangeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{")?;
        for (i, (lo, hi)) in self.ranges.iter().enumerate() {
            if i > 0 {
                write!(f, ",")?;
            }
            if lo == hi { write!(f, "{lo}")? } else { write!(f, "{lo}-{hi}")? }
        }
        write!(f, "}}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports(r: &[(u128, u128)]) -> RangeSet {
        RangeSet::from_ranges(r.iter().copied(), 65535)
    }

    #[test]
    fn normalizes_merges_and_sorts() {
        let s = ports(&[(8000, 8100), (80, 80), (81, 81), (8050, 8200), (90, 85)]);
        assert_eq!(s.ranges(), &[(80, 81), (8000, 8200)]);
        assert_eq!(s.len(), 2 + 201);
        assert!(s.contains(8150) && !s.contains(82));
    }

    #[test]
    fn complement_and_relations() {
        let s = ports(&[(0, 10), (20, 65535)]);
        assert_eq!(s.complement().ranges(), &[(11, 19)]);
        assert!(RangeSet::full(65535).complement().is_empty());
        assert!(RangeSet::empty(65535).complement().is_full());
        let a = ports(&[(80, 80), (15000, 15000)]);
        let b = ports(&[(1, 1024)]);
        assert_eq!(a.intersect(&b).ranges(), &[(80, 80)]);
        assert!(!a.is_subset_of(&b));
        assert!(ports(&[(80, 80)]).is_subset_of(&b));
        assert!(ports(&[(2000, 3000)]).is_disjoint(&b));
        let full = RangeSet::full(u128::MAX);
        assert!(full.complement().is_empty());
        assert_eq!(full.len(), u128::MAX);
    }
}
