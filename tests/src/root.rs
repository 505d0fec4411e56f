//! Privileged tests fail loudly without root; they never skip.

/// Panics unless the process runs as root (effective uid 0).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        panic!(
            "this privileged test must run as root (effective uid is {euid}): it creates network \
             namespaces, loads nft rules and changes net.netfilter.nf_conntrack_max. Run \
             `sudo -E cargo test -p ctguard-integration -- --test-threads=1`"
        );
    }
}

/// True when this thread runs in the initial network namespace, where the
/// global conntrack sysctls are writable (see
/// `ctguard::flood::thread_in_initial_netns`).
pub fn in_initial_netns() -> bool {
    ctguard::flood::thread_in_initial_netns()
        .unwrap_or_else(|e| panic!("cannot tell whether this is the initial network namespace: {e}"))
}
