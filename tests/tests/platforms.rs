//! The Windows code paths (the service manager, the local API's named pipe, wintun
//! through tun-rs) compile and pass clippy: `cargo clippy --target x86_64-pc-windows-gnu`
//! on agentd and agentctl. They cannot run on this Linux machine; this keeps them from
//! rotting. Needs the Rust target and the MinGW C compiler (for `ring`), which `.ci/run`
//! installs; skips with a notice where they are missing.

#![allow(clippy::print_stderr)] // the skip notice

use std::path::Path;
use std::process::Command;

const TARGET: &str = "x86_64-pc-windows-gnu";

fn have_windows_target() -> bool {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l == TARGET)
        })
        .unwrap_or(false);
    installed && tests::have_program("x86_64-w64-mingw32-gcc")
}

#[test]
fn windows_code_compiles_without_warnings() {
    if !have_windows_target() {
        eprintln!(
            "SKIPPED: the Windows check needs `rustup target add {TARGET}` and the \
             gcc-mingw-w64-x86-64 package"
        );
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(&root)
        // Its own target directory: the test run's build lock stays untouched.
        .args([
            "clippy", "--quiet", "-p", "agent", "-p", "cli", "--target", TARGET,
        ])
        .args([
            "--target-dir",
            "target/windows-check",
            "--",
            "-D",
            "warnings",
        ])
        .output()
        .expect("running cargo");
    assert!(
        out.status.success(),
        "the Windows build of agentd/agentctl fails:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
