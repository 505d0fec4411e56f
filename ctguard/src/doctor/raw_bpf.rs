//! Probes that aya 0.14 cannot express, done with the bpf(2) syscall directly:
//! a BPF_PROG_TYPE_NETFILTER program and its netfilter link (kernel 6.4+).
//!
//! The program is two instructions (`r0 = NF_ACCEPT; exit`): it only has to
//! load and attach to prove the hook kind works here.
use std::{
    io,
    os::fd::{FromRawFd, OwnedFd},
};

use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_prog_type};

/// `r0 = 1 (NF_ACCEPT); exit`, as raw eBPF instructions.
const ACCEPT_PROGRAM: [u64; 2] = [
    // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 1
    0x0000_0001_0000_00b7,
    // BPF_JMP | BPF_EXIT
    0x0000_0000_0000_0095,
];

const NFPROTO_IPV4: u32 = 2;
const NF_INET_LOCAL_OUT: u32 = 3;
/// A priority no real hook uses: an equal priority would fail with EBUSY.
const PROBE_PRIORITY: i32 = -1_999_999;

fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<OwnedFd> {
    // SAFETY: attr is a fully initialised bpf_attr of the kernel's layout and
    // outlives the call; the kernel returns a new fd or -1.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd as libc::c_long, attr as *mut bpf_attr, size_of::<bpf_attr>()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a non-negative return of these commands is a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
}

/// Loads a NETFILTER program and links it at IPv4 LOCAL_OUT in this netns,
/// then releases both. Ok means the hook kind works.
pub fn probe_netfilter_link() -> io::Result<()> {
    let license = c"GPL";
    // SAFETY: bpf_attr is plain data; all-zero is its documented default.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the prog-load member of the union we just zeroed.
    unsafe {
        let load = &mut attr.__bindgen_anon_3;
        load.prog_type = bpf_prog_type::BPF_PROG_TYPE_NETFILTER as u32;
        load.insn_cnt = ACCEPT_PROGRAM.len() as u32;
        load.insns = ACCEPT_PROGRAM.as_ptr() as u64;
        load.license = license.as_ptr() as u64;
        load.expected_attach_type = bpf_attach_type::BPF_NETFILTER as u32;
    }
    let prog = sys_bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr)?;

    // SAFETY: as above, for the link-create member.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    unsafe {
        use std::os::fd::AsRawFd;
        let link = &mut attr.link_create;
        link.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
        link.attach_type = bpf_attach_type::BPF_NETFILTER as u32;
        let nf = &mut link.__bindgen_anon_3.netfilter;
        nf.pf = NFPROTO_IPV4;
        nf.hooknum = NF_INET_LOCAL_OUT;
        nf.priority = PROBE_PRIORITY;
    }
    let _link = sys_bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr)?;
    Ok(())
}
