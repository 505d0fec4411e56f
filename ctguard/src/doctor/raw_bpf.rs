//! Probes that aya 0.14 cannot express, done with the bpf(2) syscall directly:
//! a BPF_PROG_TYPE_NETFILTER program and its netfilter link (kernel 6.4+), and
//! fentry/fexit on a *module* function, which needs the module's BTF object
//! passed at load time (`attach_btf_obj_fd`).
//!
//! The programs are two instructions (`r0 = 1 or 0; exit`): they only have
//! to load and attach to prove the hook kind works here.
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

/// `r0 = 0; exit`: a tracing program that does nothing.
const NOOP_PROGRAM: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];

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

/// The fd of the kernel BTF object called `module` (a loaded module's BTF;
/// the same id space `/sys/kernel/btf/MODULE` describes).
fn module_btf_fd(module: &str) -> io::Result<OwnedFd> {
    let mut id = 0u32;
    loop {
        // SAFETY: bpf_attr is plain data; all-zero is its documented default.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // Writing a union field is safe; the kernel reads the get-next-id member.
        attr.__bindgen_anon_6.__bindgen_anon_1.start_id = id;
        // SAFETY: BPF_BTF_GET_NEXT_ID returns 0 and writes next_id, or -1.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                bpf_cmd::BPF_BTF_GET_NEXT_ID as libc::c_long,
                &mut attr as *mut bpf_attr,
                size_of::<bpf_attr>(),
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::ENOENT) {
                io::Error::new(io::ErrorKind::NotFound, format!("no BTF object named {module} is loaded"))
            } else {
                e
            });
        }
        id = unsafe { attr.__bindgen_anon_6.next_id };
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.__bindgen_anon_6.__bindgen_anon_1.btf_id = id;
        let Ok(fd) = sys_bpf(bpf_cmd::BPF_BTF_GET_FD_BY_ID, &mut attr) else { continue };
        if btf_name(&fd)? == module {
            return Ok(fd);
        }
    }
}

fn btf_name(fd: &OwnedFd) -> io::Result<String> {
    use std::os::fd::AsRawFd;
    let mut name = [0u8; 64];
    // SAFETY: bpf_btf_info is plain data; zero is its default.
    let mut info: aya_obj::generated::bpf_btf_info = unsafe { std::mem::zeroed() };
    info.name = name.as_mut_ptr() as u64;
    info.name_len = name.len() as u32;
    // SAFETY: as above.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.info.bpf_fd = fd.as_raw_fd() as u32;
    attr.info.info_len = size_of::<aya_obj::generated::bpf_btf_info>() as u32;
    attr.info.info = &mut info as *mut _ as u64;
    // SAFETY: the kernel fills `info` and `name`, both alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            &mut attr as *mut bpf_attr,
            size_of::<bpf_attr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// Loads a do-nothing fentry (or fexit) program on the module function with
/// BTF id `func_id` in `module`'s BTF, attaches it, then releases both.
pub fn probe_module_tracing(module: &str, func_id: u32, fexit: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let btf = module_btf_fd(module)?;
    let license = c"GPL";
    let attach_type = if fexit { bpf_attach_type::BPF_TRACE_FEXIT } else { bpf_attach_type::BPF_TRACE_FENTRY };
    // SAFETY: all-zero bpf_attr, then the prog-load member.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    unsafe {
        let load = &mut attr.__bindgen_anon_3;
        load.prog_type = bpf_prog_type::BPF_PROG_TYPE_TRACING as u32;
        load.expected_attach_type = attach_type as u32;
        load.insn_cnt = NOOP_PROGRAM.len() as u32;
        load.insns = NOOP_PROGRAM.as_ptr() as u64;
        load.license = license.as_ptr() as u64;
        load.attach_btf_id = func_id;
        load.__bindgen_anon_1.attach_btf_obj_fd = btf.as_raw_fd() as u32;
    }
    let prog = sys_bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: all-zero bpf_attr, then the raw-tracepoint-open member (no
    // name: the program's attach target is used).
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.raw_tracepoint.prog_fd = prog.as_raw_fd() as u32;
    let _link = sys_bpf(bpf_cmd::BPF_RAW_TRACEPOINT_OPEN, &mut attr)?;
    Ok(())
}
