//! `ctguard lab`: the README's main job runs end to end, tells the truth,
//! and always cleans up — on success, on SIGTERM, and after SIGKILL (the
//! next lab restores what the killed one left).
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use ctguard_integration::{
    bin::ctguard_bin,
    lock::SerialGuard,
    max::read_max,
    require_root,
    tmux::{Tmux, wait_for_file},
};

fn lab_namespaces() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("ctguard-lab-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn lab_script_runs_the_story_and_cleans_up() {
    require_root();
    let _serial = SerialGuard::acquire();
    let max_before = read_max();
    let out = Command::new(ctguard_bin())
        .args(["lab", "--script", "--max", "2048", "--flows", "6000", "--rate", "12000"])
        .output()
        .expect("run ctguard lab");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "lab failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("ctguard matched the kernel's drop counter"), "{stdout}");
    // Matching is only worth something when there were drops to catch.
    let before = stdout.lines().find_map(|l| l.trim().strip_prefix("before the fix: ")).expect("the summary line");
    let dropped: u64 = before.split_whitespace().next().unwrap().parse().unwrap();
    assert!(dropped > 1000, "the first round should overflow a 2048-entry table with 6000 flows: {before}");
    assert!(before.contains(&format!("({dropped} vs {dropped})")), "{before}");
    assert!(stdout.contains("after bypassing 5353/udp: 0 of 6000 flows dropped"), "{stdout}");
    assert!(stdout.contains("$ ctguard recommend --from-top"), "{stdout}");
    assert_eq!(read_max(), max_before, "nf_conntrack_max restored");
    assert!(lab_namespaces().is_empty(), "namespaces left: {:?}", lab_namespaces());
}

#[test]
fn lab_cleans_up_on_sigterm_and_after_sigkill() {
    require_root();
    let _serial = SerialGuard::acquire();
    let max_before = read_max();
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let mut child = Command::new(ctguard_bin())
            .args(["lab", "--script", "--max", "512", "--flows", "400000", "--rate", "20000"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start lab");
        // Wait until the flood is running (the table is lowered by then).
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let started = lines.by_ref().map_while(Result::ok).any(|l| l.contains("entries"));
        assert!(started, "the lab never started flooding");
        assert_eq!(read_max(), 512, "the lab lowered nf_conntrack_max");
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait().unwrap();
        drop(lines);
        if signal == libc::SIGTERM {
            assert!(!status.success(), "an interrupted lab reports failure");
            assert_eq!(read_max(), max_before, "SIGTERM: restored at once");
            assert!(lab_namespaces().is_empty(), "SIGTERM left {:?}", lab_namespaces());
        } else {
            // Nothing can run on SIGKILL: the next lab repairs it first.
            assert_eq!(read_max(), 512, "SIGKILL leaves it lowered");
            let out = Command::new(ctguard_bin())
                .args(["lab", "--script", "--max", "2048", "--flows", "2000", "--rate", "10000"])
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                stdout.contains(&format!("restored nf_conntrack_max={max_before} left lowered by a killed lab")),
                "{stdout}"
            );
            assert!(stdout.contains("left by a killed lab"), "{stdout}");
            assert_eq!(read_max(), max_before);
            assert!(lab_namespaces().is_empty(), "left {:?}", lab_namespaces());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn interactive_lab_stops_on_ctrl_c_at_a_prompt_and_cleans_up() {
    require_root();
    let _serial = SerialGuard::acquire();
    let max_before = read_max();
    // A real terminal (tmux), so the lab waits for Enter between acts.
    let status_file = Tmux::scratch_file("ctg-lab", "status");
    let script = format!(
        "{} lab --max 777 --flows 2000; echo $? > {}; sleep 30",
        ctguard_bin().display(),
        status_file.display()
    );
    let term = Tmux::start("ctg-lab", &script);
    term.wait_for(&["(Enter to continue)"], 90);
    assert_eq!(read_max(), 777, "the lab lowered nf_conntrack_max before its first pause");
    term.send_keys("C-c");
    let status = wait_for_file(&status_file, 30, |t| !t.trim().is_empty());
    let screen = term.screen();
    assert!(!status.trim().is_empty(), "Ctrl-C at the prompt did not stop the lab:\n{screen}");
    assert_ne!(status.trim(), "0", "an interrupted lab reports failure:\n{screen}");
    assert_eq!(read_max(), max_before, "nf_conntrack_max restored after Ctrl-C");
    assert!(lab_namespaces().is_empty(), "Ctrl-C left {:?}", lab_namespaces());
}
