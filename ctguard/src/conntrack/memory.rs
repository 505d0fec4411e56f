//! What a conntrack table costs in kernel memory: one `nf_conntrack` slab
//! object per entry, plus one hash bucket head per bucket.
use std::path::Path;

use serde::Serialize;

/// SLUB's per-cache attributes; `object_size` is the size the cache was
/// created with (`slab_size` adds SLUB's alignment and metadata).
pub const SYSFS_OBJECT_SIZE: &str = "/sys/kernel/slab/nf_conntrack/object_size";
/// Root-only; the fallback when SLUB's sysfs is absent (e.g. CONFIG_SLUB_DEBUG=n).
pub const SLABINFO: &str = "/proc/slabinfo";
/// The slab cache holding `struct nf_conn`.
pub const CONNTRACK_CACHE: &str = "nf_conntrack";

/// A bucket is one `struct hlist_nulls_head`: a single pointer, as wide as
/// this (native) build's pointers.
pub const BUCKET_BYTES: u64 = std::mem::size_of::<usize>() as u64;

/// Where the object size came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectSizeSource {
    /// /sys/kernel/slab/nf_conntrack/object_size
    Sysfs,
    /// The `<objsize>` column of /proc/slabinfo.
    Slabinfo,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ObjectSize {
    pub bytes: u64,
    pub source: ObjectSizeSource,
}

/// The estimate for one namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryEstimate {
    pub object_size: u64,
    pub object_size_source: ObjectSizeSource,
    /// object_size x entries.
    pub entries_bytes: u64,
    /// BUCKET_BYTES x buckets. The hash table is one global table shared by
    /// every namespace, so it is the same in each.
    pub hash_table_bytes: u64,
    pub total_bytes: u64,
}

/// Object size x entries + one pointer per bucket.
pub fn estimate(entries: u64, buckets: u64, object_size: ObjectSize) -> MemoryEstimate {
    let entries_bytes = object_size.bytes.saturating_mul(entries);
    let hash_table_bytes = BUCKET_BYTES.saturating_mul(buckets);
    MemoryEstimate {
        object_size: object_size.bytes,
        object_size_source: object_size.source,
        entries_bytes,
        hash_table_bytes,
        total_bytes: entries_bytes.saturating_add(hash_table_bytes),
    }
}

/// The `nf_conntrack` slab object size, from sysfs or else /proc/slabinfo;
/// `None` when neither says (conntrack not loaded, or not root: both files
/// are mode 0400 on recent kernels).
/// Slab caches are global, so any thread may call this.
pub fn lookup_object_size() -> Option<ObjectSize> {
    lookup_object_size_in(Path::new(SYSFS_OBJECT_SIZE), Path::new(SLABINFO))
}

pub fn lookup_object_size_in(sysfs_file: &Path, slabinfo: &Path) -> Option<ObjectSize> {
    let from_sysfs = std::fs::read_to_string(sysfs_file).ok().and_then(|s| s.trim().parse().ok());
    if let Some(bytes) = from_sysfs {
        return Some(ObjectSize { bytes, source: ObjectSizeSource::Sysfs });
    }
    let text = std::fs::read_to_string(slabinfo).ok()?;
    parse_slabinfo_object_size(&text, CONNTRACK_CACHE)
        .map(|bytes| ObjectSize { bytes, source: ObjectSizeSource::Slabinfo })
}

/// The `<objsize>` of `cache` in /proc/slabinfo text. The column is found
/// through the `# name ...` header when there is one.
pub fn parse_slabinfo_object_size(text: &str, cache: &str) -> Option<u64> {
    // slabinfo 2.x: name, active_objs, num_objs, objsize, ...
    const DEFAULT_OBJSIZE_COLUMN: usize = 3;
    let column = text
        .lines()
        .find_map(|l| l.strip_prefix('#'))
        .and_then(|header| header.split_whitespace().position(|c| c == "<objsize>"))
        .unwrap_or(DEFAULT_OBJSIZE_COLUMN);
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&cache))
        .and_then(|fields| fields.get(column)?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    #[test]
    fn estimate_adds_objects_and_bucket_heads() {
        let size = ObjectSize { bytes: 248, source: ObjectSizeSource::Sysfs };
        let m = estimate(996, 262_144, size);
        assert_eq!(m.entries_bytes, 248 * 996);
        assert_eq!(m.hash_table_bytes, BUCKET_BYTES * 262_144);
        assert_eq!(m.total_bytes, m.entries_bytes + m.hash_table_bytes);
        assert_eq!(m.object_size_source, ObjectSizeSource::Sysfs);
    }

    #[test]
    fn slabinfo_objsize_by_header() {
        assert_eq!(parse_slabinfo_object_size(&fixture("slabinfo_6.18.txt"), "nf_conntrack"), Some(256));
        assert_eq!(parse_slabinfo_object_size(&fixture("slabinfo_6.18.txt"), "TCP"), Some(2368));
        assert_eq!(parse_slabinfo_object_size(&fixture("slabinfo_6.18.txt"), "nf_conntrack_expect"), None);
    }

    #[test]
    fn slabinfo_matches_the_whole_cache_name() {
        let text = "nf_conntrack_expect    0      0    208   19    1 : tunables 0 0 0 : slabdata 0 0 0\n\
                    nf_conntrack         176    176    320   12    1 : tunables 0 0 0 : slabdata 11 11 0\n";
        // No header: the slabinfo 2.x column position is assumed.
        assert_eq!(parse_slabinfo_object_size(text, "nf_conntrack"), Some(320));
    }

    #[test]
    fn lookup_prefers_sysfs_then_falls_back_to_slabinfo() {
        let dir = tempfile::tempdir().unwrap();
        let sysfs = dir.path().join("object_size");
        let slabinfo = dir.path().join("slabinfo");
        std::fs::write(&slabinfo, fixture("slabinfo_6.18.txt")).unwrap();
        assert_eq!(
            lookup_object_size_in(&sysfs, &slabinfo),
            Some(ObjectSize { bytes: 256, source: ObjectSizeSource::Slabinfo })
        );
        std::fs::write(&sysfs, "248\n").unwrap();
        assert_eq!(
            lookup_object_size_in(&sysfs, &slabinfo),
            Some(ObjectSize { bytes: 248, source: ObjectSizeSource::Sysfs })
        );
        assert_eq!(lookup_object_size_in(&dir.path().join("none"), &dir.path().join("none")), None);
    }
}
