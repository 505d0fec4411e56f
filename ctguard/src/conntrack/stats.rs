//! Parsing `/proc/net/stat/nf_conntrack`: a header line naming the columns,
//! then one row of hexadecimal values per possible CPU.
//!
//! The column set changed over the years (`searched` became `clashres` in
//! 5.9, `delete_list` became `chainlength` in 5.15, older kernels lack
//! `search_restart`), so columns are matched by their header name and unknown
//! ones are kept as they are.
use serde::{Serialize, ser::SerializeMap};
use thiserror::Error;

/// The column that is not a per-CPU counter: every row repeats the
/// namespace's entry count, so it must never be summed across CPUs.
pub const ENTRIES_COLUMN: &str = "entries";

/// The kernel keeps these counters as 32-bit `unsigned int`s per CPU; a rise
/// is computed modulo 2^32 so a wrapped counter still gives the right delta.
const COUNTER_MODULUS: u64 = 1 << 32;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("the file is empty; expected a header line naming the columns")]
    Empty,
    #[error("the first line `{0}` is not a header of column names")]
    NoHeader(String),
    #[error("no per-CPU rows after the header")]
    NoRows,
    #[error("line {line}: {found} values for {expected} header columns")]
    WrongWidth { line: usize, expected: usize, found: usize },
    #[error("line {line}, column `{column}`: `{value}` is not a hexadecimal number")]
    NotHex { line: usize, column: String, value: String },
}

/// Named counter values in the kernel's column order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters(Vec<(String, u64)>);

impl Counters {
    pub fn get(&self, name: &str) -> Option<u64> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(n, v)| (n.as_str(), *v))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(String, u64)> for Counters {
    fn from_iter<I: IntoIterator<Item = (String, u64)>>(iter: I) -> Self {
        Counters(iter.into_iter().collect())
    }
}

/// A JSON object whose keys keep the kernel's column order.
impl Serialize for Counters {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in &self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

/// One reading of `/proc/net/stat/nf_conntrack`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatTable {
    columns: Vec<String>,
    /// One row per possible CPU, in CPU order.
    rows: Vec<Counters>,
}

impl StatTable {
    /// Column names as the header gives them.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// Per-CPU rows, one per possible CPU in ascending CPU order.
    pub fn per_cpu(&self) -> &[Counters] {
        &self.rows
    }

    /// Every counter summed over the CPUs; `entries` is taken once, not summed.
    pub fn summed(&self) -> Counters {
        self.columns
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let value = if name == ENTRIES_COLUMN {
                    self.rows.first().map_or(0, |row| row.0[i].1)
                } else {
                    self.rows.iter().map(|row| row.0[i].1).sum()
                };
                (name.clone(), value)
            })
            .collect()
    }

    /// How much each counter rose since `earlier`, summed over the CPUs.
    /// `entries` is left out: it is a level that can fall, not a counter.
    /// Columns or CPU rows missing from `earlier` count from zero.
    pub fn rise_since(&self, earlier: &StatTable) -> Counters {
        self.columns
            .iter()
            .enumerate()
            .filter(|(_, name)| *name != ENTRIES_COLUMN)
            .map(|(i, name)| {
                let rise = self
                    .rows
                    .iter()
                    .enumerate()
                    .map(|(cpu, row)| {
                        let before = earlier.rows.get(cpu).and_then(|r| r.get(name)).unwrap_or(0);
                        (row.0[i].1 + COUNTER_MODULUS - before % COUNTER_MODULUS) % COUNTER_MODULUS
                    })
                    .sum();
                (name.clone(), rise)
            })
            .collect()
    }
}

/// Parses the text of `/proc/net/stat/nf_conntrack`.
pub fn parse_stat(text: &str) -> Result<StatTable, ParseError> {
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().ok_or(ParseError::Empty)?;
    let columns: Vec<String> = header.split_whitespace().map(str::to_string).collect();
    // A header of names, not a row of numbers that lost its header.
    if columns.iter().all(|c| u64::from_str_radix(c, 16).is_ok()) {
        return Err(ParseError::NoHeader(header.trim().to_string()));
    }
    let mut rows = Vec::new();
    for (index, line) in lines {
        let values: Vec<&str> = line.split_whitespace().collect();
        if values.len() != columns.len() {
            return Err(ParseError::WrongWidth { line: index + 1, expected: columns.len(), found: values.len() });
        }
        let row = columns
            .iter()
            .zip(values)
            .map(|(column, value)| {
                u64::from_str_radix(value, 16).map(|v| (column.clone(), v)).map_err(|_| ParseError::NotHex {
                    line: index + 1,
                    column: column.clone(),
                    value: value.to_string(),
                })
            })
            .collect::<Result<Counters, _>>()?;
        rows.push(row);
    }
    if rows.is_empty() {
        return Err(ParseError::NoRows);
    }
    Ok(StatTable { columns, rows })
}

/// Parses a kernel CPU list such as `0-3,8-11` (`/sys/devices/system/cpu/possible`).
/// The stat file has one row per *possible* CPU, so this names its rows.
pub fn parse_cpu_list(text: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last): (u32, u32) = (first.parse().ok()?, last.parse().ok()?);
                if first > last {
                    return None;
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

/// The CPU number of each stat row: the possible CPUs when their count
/// matches the rows, else the row index (possible CPUs are almost always 0..n).
pub fn cpu_numbers(rows: usize, possible: Option<&[u32]>) -> Vec<u32> {
    match possible {
        Some(cpus) if cpus.len() == rows => cpus.to_vec(),
        _ => (0..rows as u32).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn parses_this_machines_6_18_file() {
        let table = parse_stat(&fixture("stat_nf_conntrack_6.18.txt")).unwrap();
        assert_eq!(table.per_cpu().len(), 2);
        assert_eq!(table.columns().len(), 17);
        assert_eq!(table.columns()[1], "clashres");
        let sum = table.summed();
        assert_eq!(sum.get("entries"), Some(996), "entries is repeated per CPU, not summed");
        assert_eq!(sum.get("drop"), Some(0));
    }

    #[test]
    fn sums_counters_but_not_entries_on_6_1() {
        let table = parse_stat(&fixture("stat_nf_conntrack_6.1.txt")).unwrap();
        assert_eq!(table.per_cpu().len(), 4);
        let sum = table.summed();
        assert_eq!(sum.get("entries"), Some(0x1f40));
        assert_eq!(sum.get("found"), Some(0x2a + 0x31 + 0x1c + 0x27));
        assert_eq!(sum.get("insert_failed"), Some(3 + 1));
        assert_eq!(sum.get("drop"), Some(0x10 + 0x0c));
        assert_eq!(sum.get("chainlength"), Some(0));
    }

    #[test]
    fn keeps_kernel_specific_columns_by_name() {
        let v5_4 = parse_stat(&fixture("stat_nf_conntrack_5.4.txt")).unwrap();
        assert_eq!(v5_4.columns()[1], "searched");
        assert!(v5_4.columns().contains(&"delete_list".to_string()));
        assert_eq!(v5_4.summed().get("early_drop"), Some(2 + 5));
        assert_eq!(v5_4.summed().get("clashres"), None);

        let v5_10 = parse_stat(&fixture("stat_nf_conntrack_5.10.txt")).unwrap();
        assert_eq!(v5_10.columns()[1], "clashres");
        assert!(v5_10.columns().contains(&"delete_list".to_string()));
        assert_eq!(v5_10.summed().get("clashres"), Some(0x11 + 0x0e));

        let v5_15 = parse_stat(&fixture("stat_nf_conntrack_5.15.txt")).unwrap();
        assert!(v5_15.columns().contains(&"chainlength".to_string()));
        assert_eq!(v5_15.summed().get("chainlength"), Some(2));
        assert_eq!(v5_15.summed().get("search_restart"), Some(0x1d + 0x13));
    }

    #[test]
    fn parses_an_old_layout_without_search_restart() {
        // 3.x kernels: 16 columns and a trailing space after each row.
        let text = "entries  searched found new invalid ignore delete delete_list insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete\n\
                    00000010  00000005 00000003 00000002 00000000 00000007 00000001 00000001 00000002 00000000 00000001 00000000 00000000  00000000 00000000 00000000 \n";
        let table = parse_stat(text).unwrap();
        assert_eq!(table.columns().len(), 16);
        assert_eq!(table.summed().get("drop"), Some(1));
        assert_eq!(table.summed().get("search_restart"), None);
    }

    #[test]
    fn summed_keeps_header_order() {
        let table = parse_stat(&fixture("stat_nf_conntrack_6.1.txt")).unwrap();
        let summed = table.summed();
        let names: Vec<&str> = summed.iter().map(|(n, _)| n).collect();
        assert_eq!(names, table.columns().iter().map(String::as_str).collect::<Vec<_>>());
        let json = serde_json::to_string(&table.summed()).unwrap();
        assert!(json.starts_with(r#"{"entries":8000,"clashres":"#), "{json}");
    }

    #[test]
    fn rise_since_is_per_cpu_and_survives_32_bit_wrap() {
        let earlier =
            parse_stat("entries drop insert_failed\n00000005 fffffffe 00000001\n00000005 00000003 00000000\n").unwrap();
        let later =
            parse_stat("entries drop insert_failed\n00000002 00000001 00000001\n00000002 00000007 00000002\n").unwrap();
        let rise = later.rise_since(&earlier);
        assert_eq!(rise.get("drop"), Some(3 + 4), "cpu0 wrapped from 0xfffffffe to 1");
        assert_eq!(rise.get("insert_failed"), Some(2));
        assert_eq!(rise.get("entries"), None, "entries is a level, not a counter");
    }

    #[test]
    fn rise_counts_columns_missing_earlier_from_zero() {
        let earlier = parse_stat("entries drop\n00000001 00000002\n").unwrap();
        let later = parse_stat("entries drop early_drop\n00000001 00000002 00000004\n").unwrap();
        assert_eq!(later.rise_since(&earlier).get("early_drop"), Some(4));
    }

    #[test]
    fn rejects_malformed_files() {
        assert_eq!(parse_stat(""), Err(ParseError::Empty));
        assert_eq!(parse_stat("entries drop\n"), Err(ParseError::NoRows));
        assert!(matches!(parse_stat("00000001 00000002\n00000001 00000002\n"), Err(ParseError::NoHeader(_))));
        assert_eq!(
            parse_stat("entries drop\n00000001\n"),
            Err(ParseError::WrongWidth { line: 2, expected: 2, found: 1 })
        );
        let err = parse_stat("entries drop\n00000001 0000zz02\n").unwrap_err();
        assert_eq!(err, ParseError::NotHex { line: 2, column: "drop".into(), value: "0000zz02".into() });
        assert!(err.to_string().contains("`drop`"));
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-3\n"), Some(vec![0, 1, 2, 3]));
        assert_eq!(parse_cpu_list("0,2,4-5"), Some(vec![0, 2, 4, 5]));
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
        assert_eq!(cpu_numbers(3, Some(&[0, 2, 4])), vec![0, 2, 4]);
        assert_eq!(cpu_numbers(2, Some(&[0, 2, 4])), vec![0, 1], "mismatch falls back to row index");
        assert_eq!(cpu_numbers(2, None), vec![0, 1]);
    }
}
