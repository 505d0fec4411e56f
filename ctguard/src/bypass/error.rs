//! Errors of `ctguard bypass`, each with a hint. `main` prints them and
//! exits 2; nothing has been changed when one is returned.
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BypassError {
    /// The selector options are invalid.
    #[error("invalid selector: {what}\n  hint: {hint}")]
    Selector { what: String, hint: String },

    /// nft could not be run or failed.
    #[error("nft: {what}\n  hint: {hint}")]
    Nft { what: String, hint: String },

    /// The ruleset (live or from --ruleset) could not be understood.
    #[error("ruleset: {what}\n  hint: {hint}")]
    Ruleset { what: String, hint: String },

    /// Conflicts were found and --force was not given.
    #[error(
        "refusing to {action}: {count} conflict(s) listed above would break traffic once these packets are untracked; nothing was changed\n  hint: apply the fixes shown, narrow the selector (--src/--dst/--iface/--proto), or pass --force to {action} anyway"
    )]
    Refused { action: &'static str, count: usize },

    /// `remove ID` named no installed bypass.
    #[error("no bypass {id} in table inet ctguard{place}\n  hint: {hint}")]
    NotFound { id: String, place: String, hint: String },

    /// Bad combination of options.
    #[error("{what}\n  hint: {hint}")]
    Usage { what: String, hint: String },
}

impl BypassError {
    pub fn selector(what: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::Selector { what: what.into(), hint: hint.into() }
    }
    pub fn nft(what: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::Nft { what: what.into(), hint: hint.into() }
    }
    pub fn ruleset(what: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::Ruleset { what: what.into(), hint: hint.into() }
    }
    pub fn usage(what: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::Usage { what: what.into(), hint: hint.into() }
    }
}
