//! Kernel text addresses from /proc/kallsyms, to know which function freed a
//! dropped packet (kernel reference §2: `nft_do_chain` for nftables verdicts,
//! `nf_hook_slow` for conntrack's own drops and iptables-legacy).
use std::ops::Range;

use crate::error::CtguardError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    pub addr: u64,
    pub name: String,
    pub module: Option<String>,
}

/// Text symbols sorted by address.
#[derive(Clone, Debug, Default)]
pub struct Kallsyms {
    symbols: Vec<Symbol>,
}

impl Kallsyms {
    pub fn read() -> Result<Self, CtguardError> {
        let text = std::fs::read_to_string("/proc/kallsyms")
            .map_err(|e| CtguardError::Kallsyms { what: format!("cannot read /proc/kallsyms: {e}") })?;
        let syms = Self::parse(&text);
        if syms.symbols.is_empty() {
            return Err(CtguardError::Kallsyms {
                what: "/proc/kallsyms shows no addresses (they are hidden from this user)".into(),
            });
        }
        Ok(syms)
    }

    /// Parses kallsyms text, keeping text symbols (t/T) with non-zero addresses.
    pub fn parse(text: &str) -> Self {
        let mut symbols: Vec<Symbol> = text
            .lines()
            .filter_map(|line| {
                let mut parts = line.split_whitespace();
                let addr = u64::from_str_radix(parts.next()?, 16).ok()?;
                let kind = parts.next()?;
                let name = parts.next()?;
                let module = parts.next().map(|m| m.trim_matches(['[', ']']).to_string());
                (addr != 0 && matches!(kind, "t" | "T")).then(|| Symbol { addr, name: name.to_string(), module })
            })
            .collect();
        symbols.sort_by_key(|s| s.addr);
        Self { symbols }
    }

    /// `[start, next symbol)` of the function `name`, if present.
    pub fn function_range(&self, name: &str) -> Option<Range<u64>> {
        let i = self.symbols.iter().position(|s| s.name == name)?;
        let start = self.symbols[i].addr;
        let end = self.symbols[i + 1..].iter().find(|s| s.addr > start).map_or(start + 1, |s| s.addr);
        Some(start..end)
    }

    /// `function+0xoff` for an address inside kernel text.
    pub fn symbolize(&self, addr: u64) -> Option<String> {
        let i = self.symbols.partition_point(|s| s.addr <= addr).checked_sub(1)?;
        let s = &self.symbols[i];
        Some(format!("{}+{:#x}", s.name, addr - s.addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
ffffffff81f2af50 T nf_hook_slow
ffffffff81f2b100 T nf_hook_slow_list
ffffffff81f653d0 T nft_do_chain\t[nf_tables]
ffffffff81f65c00 t nft_do_chain_ipv4\t[nf_tables]
ffffffff82000000 D some_data
0000000000000000 T hidden_symbol
";

    #[test]
    fn ranges_end_at_the_next_symbol() {
        let k = Kallsyms::parse(SAMPLE);
        assert_eq!(k.function_range("nf_hook_slow"), Some(0xffffffff81f2af50..0xffffffff81f2b100));
        assert_eq!(k.function_range("nft_do_chain"), Some(0xffffffff81f653d0..0xffffffff81f65c00));
        assert_eq!(k.function_range("missing"), None);
        assert_eq!(k.function_range("hidden_symbol"), None, "zero addresses are dropped");
    }

    #[test]
    fn symbolizes_with_offset() {
        let k = Kallsyms::parse(SAMPLE);
        assert_eq!(k.symbolize(0xffffffff81f2afcd).as_deref(), Some("nf_hook_slow+0x7d"));
        assert_eq!(k.symbolize(0x10), None);
    }

    #[test]
    fn keeps_module_names() {
        let k = Kallsyms::parse(SAMPLE);
        assert_eq!(k.symbols[2].module.as_deref(), Some("nf_tables"));
    }
}
