//! Medians, spreads and ratios of repeated measurements. Pure arithmetic, no
//! I/O: the benchmark runs each condition several times, interleaved, and
//! reports the middle value and how far the runs scattered around it.

/// The median of `xs` (the mean of the two middle values for an even count),
/// ignoring NaNs; `None` when nothing is left.
pub fn median(xs: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// The middle value of repeated measurements and their range.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// `None` for no (non-NaN) values.
    pub fn of(xs: &[f64]) -> Option<Spread> {
        let v: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
        let median = median(&v)?;
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Spread { n: v.len(), median, min, max })
    }

    /// Like [`Spread::of`] for integer counts.
    pub fn of_u64(xs: &[u64]) -> Option<Spread> {
        Spread::of(&xs.iter().map(|&x| x as f64).collect::<Vec<_>>())
    }

    /// (max − min) / median in percent: how much the runs disagreed. 0 for a
    /// single run; `None` when the median is 0.
    pub fn relative_range_percent(&self) -> Option<f64> {
        (self.median != 0.0).then(|| (self.max - self.min) / self.median.abs() * 100.0)
    }
}

/// Ratios `other[i] / base[i]` of runs made in the same round (interleaved
/// A B C A B C …): pairing cancels the drift a noisy machine adds between
/// rounds. Pairs with a zero or NaN base are skipped; extra runs of either
/// side too.
pub fn paired_ratios(base: &[f64], other: &[f64]) -> Vec<f64> {
    base.iter().zip(other).filter(|(b, o)| **b != 0.0 && !b.is_nan() && !o.is_nan()).map(|(b, o)| o / b).collect()
}

/// The rate lost, in percent, for a rate ratio (0.97 → 3 %).
pub fn loss_percent(ratio: f64) -> f64 {
    (1.0 - ratio) * 100.0
}

/// Whether a condition at `ratio` of the baseline rate stays within
/// `max_loss_percent` of it (0.97 with a 3 % budget meets it).
pub fn meets_loss_target(ratio: f64, max_loss_percent: f64) -> bool {
    // Rounding noise at the 1e-9 level must not flip the verdict.
    loss_percent(ratio) <= max_loss_percent + 1e-9
}

/// CPU use in percent of one core from two readings of a process's
/// utime+stime in clock ticks taken `wall_s` seconds apart.
pub fn cpu_percent(ticks_before: u64, ticks_after: u64, ticks_per_s: u64, wall_s: f64) -> Option<f64> {
    (wall_s > 0.0 && ticks_per_s > 0 && ticks_after >= ticks_before)
        .then(|| (ticks_after - ticks_before) as f64 / ticks_per_s as f64 / wall_s * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0), "NaNs are ignored");
        assert_eq!(median(&[f64::NAN]), None);
    }

    #[test]
    fn spread_has_median_min_max_and_relative_range() {
        let s = Spread::of(&[100.0, 90.0, 110.0, 105.0, 95.0]).unwrap();
        assert_eq!((s.n, s.median, s.min, s.max), (5, 100.0, 90.0, 110.0));
        assert_eq!(s.relative_range_percent(), Some(20.0));
        assert_eq!(Spread::of(&[4.0]).unwrap().relative_range_percent(), Some(0.0));
        assert_eq!(Spread::of(&[0.0]).unwrap().relative_range_percent(), None);
        assert!(Spread::of(&[]).is_none());
        assert_eq!(Spread::of_u64(&[3, 1, 2]).unwrap().median, 2.0);
    }

    #[test]
    fn ratios_pair_runs_of_the_same_round() {
        let base = [100.0, 200.0, 0.0, 50.0];
        let other = [97.0, 190.0, 10.0, 50.0, 99.0];
        assert_eq!(paired_ratios(&base, &other), vec![0.97, 0.95, 1.0]);
        assert!(paired_ratios(&[], &[1.0]).is_empty());
    }

    #[test]
    fn loss_and_target() {
        assert!((loss_percent(0.97) - 3.0).abs() < 1e-9);
        assert!(meets_loss_target(0.97, 3.0));
        assert!(meets_loss_target(1.02, 3.0), "faster than the baseline meets it");
        assert!(!meets_loss_target(0.969, 3.0));
    }

    #[test]
    fn cpu_percent_from_ticks() {
        assert_eq!(cpu_percent(100, 150, 100, 1.0), Some(50.0));
        assert_eq!(cpu_percent(0, 300, 100, 2.0), Some(150.0), "two cores busy");
        assert_eq!(cpu_percent(10, 5, 100, 1.0), None, "a counter going back is not a reading");
        assert_eq!(cpu_percent(0, 5, 100, 0.0), None);
    }
}
