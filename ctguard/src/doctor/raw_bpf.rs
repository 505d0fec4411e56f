//! Probes that aya 0.14 cannot express, done with the bpf(2) syscall directly:
//! a BPF_PROG_TYPE_NETFILTER program and its netfilter link (kernel 6.4+), and
//! fentry/fexit on a *module* function, which needs the module's BTF object
//! passed at load time (`attach_btf_obj_fd`).
//!
//! The programs are two instructions (`r0 = 1 or 0; exit`): they only have
//! to load and attach to prove the hook kind works here.
use std::{
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
};

use aya_obj::generated::{bpf_attach_type, bpf_btf_info, bpf_cmd, bpf_prog_type};

use crate::kernel::bpf_sys::{self, zeroed_attr};

/// `r0 = 1 (NF_ACCEPT); exit`, as raw eBPF instructions.
const ACCEPT_PROGRAM: [u64; 2] = [
    // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 1
    0x0000_0001_0000_00b7,
    // BPF_JMP | BPF_EXIT
    0x0000_0000_0000_0095,
];

/// `r0 = 0; exit`: a tracing program that does nothing.
const NOOP_PROGRAM: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];

const NFPROTO_IPV4: u32 = 2;
const NF_INET_LOCAL_OUT: u32 = 3;
/// A priority no real hook uses: an equal priority would fail with EBUSY.
const PROBE_PRIORITY: i32 = -1_999_999;

/// BPF_PROG_LOAD of a two-instruction GPL program.
fn load(
    prog_type: bpf_prog_type,
    attach_type: bpf_attach_type,
    insns: &[u64; 2],
    attach_btf: Option<(u32, &OwnedFd)>,
) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut attr = zeroed_attr();
    // SAFETY: writing the prog-load member of a zeroed union; the pointers
    // (instructions, license) outlive the call.
    unsafe {
        let load = &mut attr.__bindgen_anon_3;
        load.prog_type = prog_type as u32;
        load.expected_attach_type = attach_type as u32;
        load.insn_cnt = insns.len() as u32;
        load.insns = insns.as_ptr() as u64;
        load.license = license.as_ptr() as u64;
        if let Some((btf_id, btf_obj)) = attach_btf {
            load.attach_btf_id = btf_id;
            load.__bindgen_anon_1.attach_btf_obj_fd = btf_obj.as_raw_fd() as u32;
        }
    }
    bpf_sys::call_fd(bpf_cmd::BPF_PROG_LOAD, &mut attr)
}

/// Loads a NETFILTER program and links it at IPv4 LOCAL_OUT in this netns,
/// then releases both. Ok means the hook kind works.
pub fn probe_netfilter_link() -> io::Result<()> {
    let prog = load(bpf_prog_type::BPF_PROG_TYPE_NETFILTER, bpf_attach_type::BPF_NETFILTER, &ACCEPT_PROGRAM, None)?;
    let mut attr = zeroed_attr();
    // SAFETY: writing the link-create member of a zeroed union.
    unsafe {
        let link = &mut attr.link_create;
        link.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
        link.attach_type = bpf_attach_type::BPF_NETFILTER as u32;
        let nf = &mut link.__bindgen_anon_3.netfilter;
        nf.pf = NFPROTO_IPV4;
        nf.hooknum = NF_INET_LOCAL_OUT;
        nf.priority = PROBE_PRIORITY;
    }
    let _link = bpf_sys::call_fd(bpf_cmd::BPF_LINK_CREATE, &mut attr)?;
    Ok(())
}

/// The fd of the kernel BTF object called `module` (a loaded module's BTF;
/// the same id space `/sys/kernel/btf/MODULE` describes).
fn module_btf_fd(module: &str) -> io::Result<OwnedFd> {
    let mut id = 0u32;
    loop {
        let mut attr = zeroed_attr();
        attr.__bindgen_anon_6.__bindgen_anon_1.start_id = id;
        if let Err(e) = bpf_sys::call(bpf_cmd::BPF_BTF_GET_NEXT_ID, &mut attr) {
            return Err(if e.raw_os_error() == Some(libc::ENOENT) {
                io::Error::new(io::ErrorKind::NotFound, format!("no BTF object named {module} is loaded"))
            } else {
                e
            });
        }
        // SAFETY: the kernel wrote next_id into the member we passed.
        id = unsafe { attr.__bindgen_anon_6.next_id };
        let mut attr = zeroed_attr();
        attr.__bindgen_anon_6.__bindgen_anon_1.btf_id = id;
        // An object may vanish between listing and opening: skip it.
        let Ok(fd) = bpf_sys::call_fd(bpf_cmd::BPF_BTF_GET_FD_BY_ID, &mut attr) else { continue };
        if btf_name(&fd)? == module {
            return Ok(fd);
        }
    }
}

fn btf_name(fd: &OwnedFd) -> io::Result<String> {
    let mut name = [0u8; 64];
    // SAFETY: bpf_btf_info is plain data; zero is its default.
    let mut info: bpf_btf_info = unsafe { std::mem::zeroed() };
    info.name = name.as_mut_ptr() as u64;
    info.name_len = name.len() as u32;
    bpf_sys::object_info(fd.as_fd(), &mut info)?;
    let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// Loads a do-nothing fentry (or fexit) program on the module function with
/// BTF id `func_id` in `module`'s BTF, attaches it, then releases both.
pub fn probe_module_tracing(module: &str, func_id: u32, fexit: bool) -> io::Result<()> {
    let btf = module_btf_fd(module)?;
    let attach_type = if fexit { bpf_attach_type::BPF_TRACE_FEXIT } else { bpf_attach_type::BPF_TRACE_FENTRY };
    let prog = load(bpf_prog_type::BPF_PROG_TYPE_TRACING, attach_type, &NOOP_PROGRAM, Some((func_id, &btf)))?;
    // No tracepoint name: the program's own attach target is used.
    let mut attr = zeroed_attr();
    attr.raw_tracepoint.prog_fd = prog.as_raw_fd() as u32;
    let _link = bpf_sys::call_fd(bpf_cmd::BPF_RAW_TRACEPOINT_OPEN, &mut attr)?;
    Ok(())
}
