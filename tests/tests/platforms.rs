//! The Windows and macOS code paths (the service managers, the local API's named pipe,
//! wintun and utun through tun-rs) compile and pass clippy: `cargo clippy --target …` on
//! agentd and agentctl. They cannot run on this Linux machine; this keeps them from
//! rotting. Needs the Rust targets (and, for Windows, the MinGW C compiler for `ring`),
//! which `.ci/run` installs; skips with a notice where they are missing, and fails under
//! CI=true unless `.ci/run` said it could not install them.

#![allow(clippy::print_stderr)] // the skip notice

use std::path::Path;
use std::process::Command;

/// A check that cannot run: skipped with a notice, except under CI=true, where only
/// `.ci/run` may excuse it (AGENTD_PLATFORM_CHECK=skip, when it could not install a target).
fn skip(why: &str) {
    let excused = std::env::var("AGENTD_PLATFORM_CHECK").as_deref() == Ok("skip");
    assert!(!tests::in_ci() || excused, "{why} (.ci/run installs them)");
    eprintln!("SKIPPED: {why}");
}

fn have_target(target: &str) -> bool {
    Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l == target)
        })
        .unwrap_or(false)
}

/// `cargo clippy -p agent -p cli --target <target> -- -D warnings` in its own target
/// directory (the test run's build lock stays untouched), with extra environment.
fn clippy(target: &str, env: &[(&str, &str)]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Without the clippy component, a plain check (warnings still fail it).
    let have_clippy = Command::new(&cargo)
        .args(["clippy", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&root).envs(env.iter().copied());
    if have_clippy {
        cmd.arg("clippy");
    } else {
        eprintln!("NOTE: no clippy here; `cargo check` with warnings denied instead");
        cmd.arg("check").env("RUSTFLAGS", "-D warnings");
    }
    cmd.args(["--quiet", "-p", "agent", "-p", "cli", "--target", target])
        .args(["--target-dir", &format!("target/check-{target}")]);
    if have_clippy {
        cmd.args(["--", "-D", "warnings"]);
    }
    let out = cmd.output().expect("running cargo");
    assert!(
        out.status.success(),
        "agentd/agentctl for {target} do not build cleanly:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn windows_code_compiles_without_warnings() {
    const TARGET: &str = "x86_64-pc-windows-gnu";
    if !have_target(TARGET) || !tests::have_program("x86_64-w64-mingw32-gcc") {
        return skip(&format!(
            "the Windows check needs `rustup target add {TARGET}` and the \
             gcc-mingw-w64-x86-64 package"
        ));
    }
    clippy(TARGET, &[]);
}

#[test]
fn macos_code_compiles_without_warnings() {
    const TARGET: &str = "x86_64-apple-darwin";
    if !have_target(TARGET) {
        return skip(&format!(
            "the macOS check needs `rustup target add {TARGET}`"
        ));
    }
    // No C compiler for macOS here: ring's C code is "compiled" by `true`. Nothing is
    // linked in a check, so only our Rust code (and our dependencies') is really checked.
    clippy(
        TARGET,
        &[
            ("CC_x86_64_apple_darwin", "true"),
            ("AR_x86_64_apple_darwin", "true"),
        ],
    );
}
