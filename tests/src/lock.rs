//! Serializing tests that share kernel state (the global nf_conntrack_max, the
//! shared conntrack hash table), within a process and across processes.
//!
//! The runner already passes `--test-threads=1`; this lock makes parallel runs
//! (several threads, or several `cargo test` processes) safe anyway. It is
//! reentrant per thread: a [`crate::Lab`] and a [`crate::MaxGuard`] made by
//! the same test share it. A child process can inherit it
//! ([`SerialGuard::pass_to`]).
use std::{
    fs::{File, OpenOptions},
    os::{
        fd::{AsRawFd, FromRawFd, RawFd},
        unix::{fs::MetadataExt, process::CommandExt},
    },
    process::Command,
    sync::{Condvar, Mutex, PoisonError},
    thread::{self, ThreadId},
};

/// The file `flock`-ed while a test holds the lock.
pub const LOCK_PATH: &str = "/run/ctguard-tests.lock";
/// Names the descriptor of a locked [`LOCK_PATH`] a child process inherited
/// from its parent (see [`SerialGuard::pass_to`]).
pub const INHERIT_ENV: &str = "CTGUARD_TESTS_LOCK_FD";

struct State {
    owner: Option<ThreadId>,
    depth: usize,
    file: Option<File>,
}

static STATE: Mutex<State> = Mutex::new(State { owner: None, depth: 0, file: None });
static RELEASED: Condvar = Condvar::new();

/// Holds the test lock until dropped. Acquire and drop it on the same thread;
/// a second acquire on that thread nests, other threads and processes wait.
#[must_use = "the lock is released when the guard is dropped"]
pub struct SerialGuard {
    _private: (),
}

impl SerialGuard {
    pub fn acquire() -> SerialGuard {
        let me = thread::current().id();
        let mut st = STATE.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            match st.owner {
                None => break,
                Some(owner) if owner == me => {
                    st.depth += 1;
                    return SerialGuard { _private: () };
                }
                Some(_) => st = RELEASED.wait(st).unwrap_or_else(PoisonError::into_inner),
            }
        }
        // An inherited descriptor shares the parent's open file description,
        // so flock on it succeeds at once: the lock is already ours.
        let file = inherited_lock_file().unwrap_or_else(|| {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(LOCK_PATH)
                .unwrap_or_else(|e| panic!("cannot open the test lock {LOCK_PATH}: {e}"))
        });
        loop {
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                panic!("cannot lock {LOCK_PATH}: {e}");
            }
        }
        st.owner = Some(me);
        st.depth = 1;
        st.file = Some(file);
        SerialGuard { _private: () }
    }

    /// Makes the child process `cmd` will start inherit the lock (its
    /// [`SerialGuard::acquire`] then succeeds at once) instead of waiting for
    /// this process to release it. For tests that run the test binary itself.
    pub fn pass_to(&self, cmd: &mut Command) {
        let st = STATE.lock().unwrap_or_else(PoisonError::into_inner);
        let fd = st.file.as_ref().expect("a live SerialGuard holds the file").as_raw_fd();
        cmd.env(INHERIT_ENV, fd.to_string());
        // SAFETY: fcntl is async-signal-safe; it clears FD_CLOEXEC in the
        // child only, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// A close-on-exec duplicate of the lock descriptor named by [`INHERIT_ENV`],
/// if that descriptor is open and refers to [`LOCK_PATH`].
fn inherited_lock_file() -> Option<File> {
    let fd: RawFd = std::env::var(INHERIT_ENV).ok()?.parse().ok()?;
    let expected = std::fs::metadata(LOCK_PATH).ok()?;
    // SAFETY: fstat only writes into the zeroed struct we pass.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0
        || st.st_dev as u64 != expected.dev()
        || st.st_ino as u64 != expected.ino()
    {
        return None;
    }
    // SAFETY: duplicating an open descriptor; the copy is owned by the File.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    (dup >= 0).then(|| unsafe { File::from_raw_fd(dup) })
}

impl Drop for SerialGuard {
    fn drop(&mut self) {
        let mut st = STATE.lock().unwrap_or_else(PoisonError::into_inner);
        st.depth = st.depth.saturating_sub(1);
        if st.depth == 0 {
            st.file = None; // closing the file drops the flock
            st.owner = None;
            RELEASED.notify_all();
        }
    }
}
