//! The bpf(2) syscall, for the few things aya 0.14 does not expose (program
//! recursion misses, netfilter links, module fentry, BTF object names).
use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use aya_obj::generated::{bpf_attr, bpf_cmd};

/// A bpf_attr with every field zero, the kernel's default for all of them.
pub fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is a plain C union of integers.
    unsafe { std::mem::zeroed() }
}

/// Runs `cmd`; returns the kernel's non-negative result.
pub fn call(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a fully initialised bpf_attr of the kernel's layout
    // and outlives the call; any memory it points to is the caller's.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd as libc::c_long, attr as *mut bpf_attr, size_of::<bpf_attr>()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// Runs a command that returns a new file descriptor.
pub fn call_fd(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<OwnedFd> {
    let fd = call(cmd, attr)?;
    // SAFETY: a non-negative return of these commands is a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF_OBJ_GET_INFO_BY_FD into `info` (a bpf_prog_info, bpf_btf_info, …;
/// plain C data the kernel fills up to its size).
pub fn object_info<T>(fd: BorrowedFd<'_>, info: &mut T) -> io::Result<()> {
    let mut attr = zeroed_attr();
    attr.info.bpf_fd = fd.as_raw_fd() as u32;
    attr.info.info_len = size_of::<T>() as u32;
    attr.info.info = info as *mut T as u64;
    call(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
}
