//! The sizing formulas, as pure functions of their inputs.
//!
//! * The classic runbook formula: `CONNTRACK_MAX = RAM / 16384 / (ARCH / 32)`,
//!   buckets = max / 8 (anywhere from max / 8 to max / 2).
//! * The kernel's own defaults (`nf_conntrack_init_start`, unchanged from 5.15
//!   through 6.18): buckets = RAM / 16384 / sizeof(struct hlist_head) =
//!   RAM / 128 KiB, then set to 262144 above 4 GiB (64-bit) or 65536 above
//!   1 GiB, at least 1024, rounded up to a whole page of bucket heads;
//!   max = buckets, or 8 x hashsize when `nf_conntrack.hashsize=` was given.
//!   Before 5.15 ("netfilter: conntrack: sanitize table size default
//!   settings", d532bcd0b269, changed it): 65536 above 4 GiB, 16384 above
//!   1 GiB, at least 32, and max = 4 x buckets. Stable trees may carry the
//!   newer rule as a backport; the report says whether the live values match.
//! * Little's law: the entries a steady flow of new entries keeps in the
//!   table = new entries per second x how long each one lives.
//! * Memory: one slab object per entry plus one pointer per bucket.
use serde::Serialize;

/// The classic formula's bytes of RAM per entry on a 32-bit machine.
pub const CLASSIC_RAM_PER_ENTRY: u64 = 16384;
/// `sizeof(struct hlist_head)` (and `hlist_nulls_head`): one pointer.
pub const BUCKET_HEAD_BYTES: u64 = 8;
/// Largest value `nf_conntrack_max` accepts (an `int` sysctl with
/// `proc_dointvec_minmax`, 0..INT_MAX).
pub const KERNEL_MAX_LIMIT: u64 = i32::MAX as u64;
/// Largest bucket count the kernel allocates: `nf_ct_alloc_hashtable`
/// refuses sizes above `INT_MAX / sizeof(struct hlist_nulls_head)`.
pub const KERNEL_BUCKETS_LIMIT: u64 = i32::MAX as u64 / BUCKET_HEAD_BYTES;
/// Largest timeout (seconds) every kernel accepts: the timeouts are
/// `proc_dointvec_jiffies` sysctls, which refuse seconds > INT_MAX / HZ;
/// this is the bound for the largest common HZ (1000).
pub const KERNEL_TIMEOUT_LIMIT_S: u64 = i32::MAX as u64 / 1000;
/// A recommendation may cost at most this fraction of RAM (1/4): beyond it
/// conntrack competes with everything else on the host for memory, and a
/// flood that fills the table can push the host into reclaim or OOM.
pub const MEMORY_BUDGET_DIVISOR: u64 = 4;
/// Used when the nf_conntrack slab object size cannot be read (module not
/// loaded, no SLUB sysfs and no root for /proc/slabinfo): larger than
/// `struct nf_conn` on any kernel ctguard knows (248 B on 6.18), so memory
/// is over- rather than under-estimated.
pub const FALLBACK_OBJECT_SIZE: u64 = 320;

const GIB: u64 = 1 << 30;

/// The classic runbook numbers for a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Classic {
    /// RAM / 16384 / (arch_bits / 32).
    pub max: u64,
    /// max / 8, the runbook's usual choice.
    pub buckets: u64,
    /// The runbook's range for buckets: max / 8 ..= max / 2.
    pub buckets_min: u64,
    pub buckets_max: u64,
}

/// `CONNTRACK_MAX = RAMSIZE / 16384 / (ARCH / 32)`; 64 GiB on 64-bit gives
/// 2 097 152, buckets 262 144 ..= 1 048 576.
pub fn classic(ram_bytes: u64, arch_bits: u32) -> Classic {
    let arch_factor = u64::from((arch_bits / 32).max(1));
    let max = ram_bytes / CLASSIC_RAM_PER_ENTRY / arch_factor;
    Classic { max, buckets: max / 8, buckets_min: max / 8, buckets_max: max / 2 }
}

/// Which branch of `nf_conntrack_init_start` decided the default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DefaultRule {
    /// RAM / 128 KiB (hosts of at most 1 GiB).
    RamFormula,
    /// More than 1 GiB (and not the 4 GiB branch): 65536 (16384 before 5.15).
    Above1GiB,
    /// More than 4 GiB: 262144 on a 64-bit kernel (65536 before 5.15, any word size).
    Above4GiB,
    /// Raised to the minimum: 1024 (32 before 5.15).
    Minimum,
    /// `nf_conntrack.hashsize=N` was given at module load: buckets = N, max = 8 x N.
    HashsizeOption,
}

/// The two generations of the default-size code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rules {
    /// 5.15 and later: max = buckets, up to 262144.
    Since5_15,
    /// 4.x to 5.14: max = 4 x buckets, up to 65536 buckets.
    Before5_15,
}

impl Rules {
    /// The rules of a kernel release string (`6.18.44-...`); unknown
    /// releases get the current rules.
    pub fn for_release(release: &str) -> Rules {
        match parse_kernel_version(release) {
            Some(v) if v < (5, 15) => Rules::Before5_15,
            _ => Rules::Since5_15,
        }
    }
}

/// `6.18.44-fc-v669` -> (6, 18).
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

impl DefaultRule {
    pub fn describe(self, rules: Rules) -> &'static str {
        match (rules, self) {
            (_, DefaultRule::HashsizeOption) => {
                "hashsize= given at module load: buckets = hashsize; max = 8 x hashsize"
            }
            (Rules::Since5_15, DefaultRule::RamFormula) => "buckets = RAM / 16384 / 8 (RAM / 128 KiB); max = buckets",
            (Rules::Since5_15, DefaultRule::Above1GiB) => "RAM > 1 GiB: buckets = 65536; max = buckets",
            (Rules::Since5_15, DefaultRule::Above4GiB) => {
                "RAM > 4 GiB on a 64-bit kernel: buckets = 262144; max = buckets"
            }
            (Rules::Since5_15, DefaultRule::Minimum) => {
                "RAM / 128 KiB is below the minimum: buckets = 1024; max = buckets"
            }
            (Rules::Before5_15, DefaultRule::RamFormula) => "before 5.15: buckets = RAM / 128 KiB; max = 4 x buckets",
            (Rules::Before5_15, DefaultRule::Above1GiB) => {
                "before 5.15: RAM > 1 GiB: buckets = 16384; max = 4 x buckets"
            }
            (Rules::Before5_15, DefaultRule::Above4GiB) => {
                "before 5.15: RAM > 4 GiB: buckets = 65536; max = 4 x buckets"
            }
            (Rules::Before5_15, DefaultRule::Minimum) => {
                "before 5.15: at least 32 buckets (a page of heads); max = 4 x buckets"
            }
        }
    }
}

/// What the kernel sets at module load for this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct KernelDefault {
    pub buckets: u64,
    pub max: u64,
    pub rule: DefaultRule,
    pub rules: Rules,
}

impl KernelDefault {
    pub fn describe(&self) -> &'static str {
        self.rule.describe(self.rules)
    }
}

/// The kernel's defaults: see the module docs. `ram_bytes` is MemTotal
/// (totalram_pages x PAGE_SIZE), `bits_per_long` the kernel's word size,
/// `hashsize_option` the `nf_conntrack.hashsize=` module option if one was
/// given (0 means not given, as in the kernel).
pub fn kernel_default(
    ram_bytes: u64,
    page_size: u64,
    bits_per_long: u32,
    hashsize_option: Option<u64>,
    rules: Rules,
) -> KernelDefault {
    let page_size = page_size.max(1);
    let nr_pages = ram_bytes / page_size;
    let (above_4g, above_1g, minimum, default_factor) = match rules {
        Rules::Since5_15 => (262_144, 65_536, 1024, 1),
        Rules::Before5_15 => (65_536, 16_384, 32, 4),
    };
    // The 4 GiB branch gained its 64-bit condition in 5.15.
    let four_gib_branch = nr_pages > 4 * (GIB / page_size) && (bits_per_long >= 64 || rules == Rules::Before5_15);
    let (size, factor, rule) = match hashsize_option.filter(|&h| h > 0) {
        Some(h) => (h, 8, DefaultRule::HashsizeOption),
        None => {
            let mut size = nr_pages * page_size / CLASSIC_RAM_PER_ENTRY / BUCKET_HEAD_BYTES;
            let mut rule = DefaultRule::RamFormula;
            if four_gib_branch {
                (size, rule) = (above_4g, DefaultRule::Above4GiB);
            } else if nr_pages > GIB / page_size {
                (size, rule) = (above_1g, DefaultRule::Above1GiB);
            }
            if size < minimum {
                (size, rule) = (minimum, DefaultRule::Minimum);
            }
            (size, default_factor, rule)
        }
    };
    // nf_ct_alloc_hashtable rounds up to a whole page of bucket heads.
    let buckets = round_up(size, page_size / BUCKET_HEAD_BYTES);
    KernelDefault { buckets, max: factor * buckets, rule, rules }
}

/// What the kernel makes of a bucket count written at run time: it rounds
/// up to a whole page of bucket heads (`nf_ct_alloc_hashtable`).
pub fn kernel_rounds_buckets(buckets: u64, page_size: u64) -> u64 {
    round_up(buckets, page_size / BUCKET_HEAD_BYTES)
}

/// `n` rounded up to a multiple of `m` (`m` = 0 or 1 leaves `n`).
pub fn round_up(n: u64, m: u64) -> u64 {
    if m <= 1 { n } else { n.div_ceil(m).saturating_mul(m) }
}

/// The smallest power of two >= `n` (1 for 0).
pub fn next_power_of_two(n: u64) -> u64 {
    n.max(1).checked_next_power_of_two().unwrap_or(1 << 63)
}

/// The granularity recommended max values are rounded up to: 1024 for small
/// tables, 65536 from 65536 up (numbers people can read and type).
pub fn round_max(entries: u64) -> u64 {
    let step = if entries > 65_536 { 65_536 } else { 1024 };
    round_up(entries.max(1), step)
}

/// Little's law: entries held = arrivals per second x seconds each stays.
pub fn littles_law(new_per_s: f64, lifetime_s: f64) -> f64 {
    (new_per_s.max(0.0)) * lifetime_s.max(0.0)
}

/// Entries freed by shortening a lifetime from `old_s` to `new_s` at a
/// steady `new_per_s`: Little's law on the difference (0 when not shorter).
pub fn frees(new_per_s: f64, old_s: u64, new_s: u64) -> f64 {
    littles_law(new_per_s, old_s.saturating_sub(new_s) as f64)
}

/// Worst-case kernel memory of a table: every entry in use plus the hash table.
pub fn memory_cost(max: u64, buckets: u64, object_size: u64) -> u64 {
    object_size.saturating_mul(max).saturating_add(BUCKET_HEAD_BYTES.saturating_mul(buckets))
}

/// The most memory a recommendation may cost: RAM / 4.
pub fn memory_budget(ram_bytes: u64) -> u64 {
    ram_bytes / MEMORY_BUDGET_DIVISOR
}

/// The largest max ctguard recommends on this host: its entries plus the
/// hash table ctguard would pair with it (at most 2 buckets per entry, see
/// [`buckets_for`]) fit in the budget.
pub fn max_within_budget(ram_bytes: u64, object_size: u64) -> u64 {
    let per_entry = object_size.max(1) + 2 * BUCKET_HEAD_BYTES;
    (memory_budget(ram_bytes) / per_entry).min(KERNEL_MAX_LIMIT)
}

/// Buckets for a table of `max` entries: the next power of two, so a full
/// table averages at most one entry per bucket (the kernel's own default
/// ratio), within the kernel's limit.
pub fn buckets_for(max: u64) -> u64 {
    let pow2_limit = 1u64 << (63 - KERNEL_BUCKETS_LIMIT.leading_zeros());
    next_power_of_two(max).min(pow2_limit)
}

/// Average chain length of a full table.
pub fn load_factor(max: u64, buckets: u64) -> f64 {
    if buckets == 0 { f64::INFINITY } else { max as f64 / buckets as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;
    const NEW: Rules = Rules::Since5_15;
    const OLD: Rules = Rules::Before5_15;

    #[test]
    fn classic_formula_matches_the_seed() {
        // "64*1024*1024*1024/16384/2 = 2097152", buckets 262144 ~ 1048576.
        let c = classic(64 * GIB, 64);
        assert_eq!(c.max, 2_097_152);
        assert_eq!((c.buckets, c.buckets_min, c.buckets_max), (262_144, 262_144, 1_048_576));
        // The seed's 16 GiB example: 524288.
        assert_eq!(classic(16 * GIB, 64).max, 524_288);
        // 32-bit: no halving.
        assert_eq!(classic(GIB, 32).max, 65_536);
        // This machine: MemTotal 24684084 kB.
        assert_eq!(classic(24_684_084 * 1024, 64).max, 771_377);
    }

    #[test]
    fn kernel_default_for_1_gib() {
        // Exactly 1 GiB is not "> 1 GiB": RAM / 128 KiB = 8192.
        let d = kernel_default(GIB, PAGE, 64, None, NEW);
        assert_eq!((d.buckets, d.max, d.rule), (8192, 8192, DefaultRule::RamFormula));
        // A "1 GiB" VM's MemTotal is a bit less: 980 MiB / 128 KiB = 7840,
        // rounded up to a page of heads (512) = 8192.
        let d = kernel_default(980 << 20, PAGE, 64, None, NEW);
        assert_eq!((d.buckets, d.max), (8192, 8192));
        // Just above 1 GiB: 65536.
        let d = kernel_default(GIB + PAGE, PAGE, 64, None, NEW);
        assert_eq!((d.buckets, d.max, d.rule), (65_536, 65_536, DefaultRule::Above1GiB));
    }

    #[test]
    fn kernel_default_for_4_gib() {
        // Exactly 4 GiB is not "> 4 GiB": the 1 GiB branch applies.
        let d = kernel_default(4 * GIB, PAGE, 64, None, NEW);
        assert_eq!((d.buckets, d.max, d.rule), (65_536, 65_536, DefaultRule::Above1GiB));
        // A 4 GiB VM (MemTotal ~3.8 GiB) too.
        assert_eq!(kernel_default(3_900 << 20, PAGE, 64, None, NEW).max, 65_536);
        // Above 4 GiB on 64-bit: 262144; on 32-bit still 65536.
        assert_eq!(kernel_default(4 * GIB + PAGE, PAGE, 64, None, NEW).max, 262_144);
        assert_eq!(kernel_default(8 * GIB, PAGE, 32, None, NEW).max, 65_536);
    }

    #[test]
    fn kernel_default_for_24_gib() {
        let d = kernel_default(24 * GIB, PAGE, 64, None, NEW);
        assert_eq!((d.buckets, d.max, d.rule), (262_144, 262_144, DefaultRule::Above4GiB));
        // This machine's MemTotal gives the same (reference section 7 [live]).
        assert_eq!(kernel_default(24_684_084 * 1024, PAGE, 64, None, NEW).max, 262_144);
    }

    #[test]
    fn kernel_default_minimum_and_hashsize_option() {
        let d = kernel_default(64 << 20, PAGE, 64, None, NEW);
        assert_eq!((d.buckets, d.max, d.rule), (1024, 1024, DefaultRule::Minimum));
        let d = kernel_default(24 * GIB, PAGE, 64, Some(131_072), NEW);
        assert_eq!((d.buckets, d.max, d.rule), (131_072, 1_048_576, DefaultRule::HashsizeOption));
        // hashsize is rounded up to a page of heads, then max = 8 x that.
        let d = kernel_default(24 * GIB, PAGE, 64, Some(1000), NEW);
        assert_eq!((d.buckets, d.max), (1024, 8192));
        // hashsize=0 means "not given", as in the kernel.
        assert_eq!(kernel_default(24 * GIB, PAGE, 64, Some(0), NEW).rule, DefaultRule::Above4GiB);
    }

    #[test]
    fn kernel_default_before_5_15() {
        // A 24 GiB host on 5.10: 65536 buckets, max 4 x 65536 = 262144.
        let d = kernel_default(24 * GIB, PAGE, 64, None, OLD);
        assert_eq!((d.buckets, d.max, d.rule), (65_536, 262_144, DefaultRule::Above4GiB));
        // 4 GiB: 16384 / 65536; 1 GiB: RAM / 128 KiB = 8192 / 32768.
        assert_eq!(kernel_default(4 * GIB, PAGE, 64, None, OLD).max, 65_536);
        assert_eq!(kernel_default(GIB, PAGE, 64, None, OLD).max, 32_768);
        // The 4 GiB branch had no word-size check then.
        assert_eq!(kernel_default(8 * GIB, PAGE, 32, None, OLD).buckets, 65_536);
        // Minimum 32, rounded up to a page of heads (512).
        let d = kernel_default(2 << 20, PAGE, 64, None, OLD);
        assert_eq!((d.buckets, d.max, d.rule), (512, 2048, DefaultRule::Minimum));
        // hashsize= is the same in both.
        assert_eq!(kernel_default(24 * GIB, PAGE, 64, Some(131_072), OLD).max, 1_048_576);
    }

    #[test]
    fn kernel_versions_pick_the_rules() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.10.0-28-amd64"), Some((5, 10)));
        assert_eq!(parse_kernel_version("unknown"), None);
        assert_eq!(Rules::for_release("6.1.0-21-amd64"), Rules::Since5_15);
        assert_eq!(Rules::for_release("5.15.0-91-generic"), Rules::Since5_15);
        assert_eq!(Rules::for_release("5.14.21"), Rules::Before5_15);
        assert_eq!(Rules::for_release("4.19.0-26-amd64"), Rules::Before5_15);
        assert_eq!(Rules::for_release("unknown"), Rules::Since5_15);
    }

    #[test]
    fn rounding_helpers() {
        assert_eq!(round_up(7840, 512), 8192);
        assert_eq!(round_up(8192, 512), 8192);
        assert_eq!(round_up(5, 0), 5);
        assert_eq!(next_power_of_two(0), 1);
        assert_eq!(next_power_of_two(262_144), 262_144);
        assert_eq!(next_power_of_two(262_145), 524_288);
        assert_eq!(round_max(0), 1024);
        assert_eq!(round_max(1000), 1024);
        assert_eq!(round_max(65_536), 65_536);
        assert_eq!(round_max(65_537), 131_072);
        assert_eq!(round_max(300_000), 327_680);
        assert_eq!(kernel_rounds_buckets(1000, PAGE), 1024);
        assert_eq!(kernel_rounds_buckets(262_144, PAGE), 262_144);
    }

    #[test]
    fn littles_law_cases() {
        // 1000 new UDP flows/s living udp_timeout = 30 s: 30 000 entries.
        assert_eq!(littles_law(1000.0, 30.0), 30_000.0);
        // 500 TCP connections/s, 120 s in TIME_WAIT: 60 000.
        assert_eq!(littles_law(500.0, 120.0), 60_000.0);
        assert_eq!(littles_law(0.0, 600.0), 0.0);
        assert_eq!(littles_law(-5.0, 30.0), 0.0);
        // time_wait 120 s -> 30 s at 455.6 closes/s frees ~41 000 entries.
        assert_eq!(frees(455.6, 120, 30).round(), 41_004.0);
        assert_eq!(frees(100.0, 30, 60), 0.0, "a longer timeout frees nothing");
    }

    #[test]
    fn memory_and_budget() {
        // 262144 entries of 248 B + 262144 heads of 8 B = 64 MiB.
        assert_eq!(memory_cost(262_144, 262_144, 248), 262_144 * 256);
        assert_eq!(memory_budget(24 * GIB), 6 * GIB);
        let cap = max_within_budget(24 * GIB, 248);
        assert_eq!(cap, 6 * GIB / 264);
        assert!(memory_cost(cap, buckets_for(cap), 248) <= memory_budget(24 * GIB));
        // A tiny host's cap is small but still a number.
        assert_eq!(max_within_budget(256 << 20, 248), (64 << 20) / 264);
    }

    #[test]
    fn buckets_are_powers_of_two_within_the_kernel_limit() {
        assert_eq!(buckets_for(262_144), 262_144);
        assert_eq!(buckets_for(300_000), 524_288);
        assert_eq!(buckets_for(1), 1);
        let top = buckets_for(KERNEL_MAX_LIMIT);
        assert!(top.is_power_of_two() && top <= KERNEL_BUCKETS_LIMIT, "{top}");
        assert_eq!(load_factor(262_144, 131_072), 2.0);
        assert!(load_factor(1, 0).is_infinite());
    }
}
