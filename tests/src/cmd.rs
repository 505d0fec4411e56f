//! Running the tools the fixture drives (`ip`, `nft`, `cat`): on failure they
//! panic with the command line, the exit status and stderr.
use std::{
    io::Write,
    process::{Command, Output, Stdio},
};

/// Runs `program args…` and returns its output, whatever the exit status.
/// Panics only if the program cannot be started.
pub fn try_run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", render(program, args)))
}

/// Runs `program args…`, panics unless it exits 0, returns its stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    check(program, args, try_run(program, args))
}

/// Like [`run`], feeding `stdin` to the program.
pub fn run_with_stdin(program: &str, args: &[&str], stdin: &str) -> String {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", render(program, args)));
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(stdin.as_bytes())
        .unwrap_or_else(|e| panic!("cannot write to `{}`: {e}", render(program, args)));
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("`{}`: {e}", render(program, args)));
    check(program, args, out)
}

fn check(program: &str, args: &[&str], out: Output) -> String {
    if !out.status.success() {
        panic!(
            "`{}` failed ({}):\n--- stderr ---\n{}--- stdout ---\n{}",
            render(program, args),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
        );
    }
    String::from_utf8(out.stdout).unwrap_or_else(|e| panic!("`{}` printed non-UTF-8: {e}", render(program, args)))
}

/// The command line, for messages.
pub fn render(program: &str, args: &[&str]) -> String {
    std::iter::once(program).chain(args.iter().copied()).collect::<Vec<_>>().join(" ")
}
