//! Network namespaces and the commands that configure them.
//!
//! Naming: every namespace the lab makes is called `agl<pid>-<lab>-<node>`, where `<pid>` is
//! the creating process. That makes names unique across labs running in parallel (threads of
//! one `cargo test` process get different `<lab>` numbers) and across processes, and lets
//! [`remove_stale`] recognise what an earlier, crashed run left behind: a namespace whose
//! creator is no longer alive.
//!
//! Running code *inside* a namespace without a helper process: [`in_netns`] runs a closure on
//! a fresh thread that has joined the namespace (`setns`). Sockets and TUN devices keep the
//! namespace they were created in, so a socket made there can be used from any thread later.
//!
//! Not here: what the namespaces are for (see [`crate::lab`]).

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

use nix::sched::CloneFlags;

use crate::error::{IoContext, LabError, Result};

/// Prefix of every namespace the lab makes.
pub const NS_PREFIX: &str = "agl";

/// Where iproute2 keeps named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// Serialises `ip netns add`: the first one in a process mounts /run/netns, and concurrent
/// first calls race on that mount.
static NETNS_ADD: Mutex<()> = Mutex::new(());

/// Runs a command to completion and returns its output; fails on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .ctx(|| format!("cannot run {}", describe(cmd)))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(LabError::Command {
            command: describe(cmd),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// Runs a command with `input` on its stdin; fails on a non-zero exit.
pub fn run_with_input(cmd: &mut Command, input: &str) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ctx(|| format!("cannot run {}", describe(cmd)))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .ctx(|| format!("cannot write to {}", describe(cmd)))?;
    }
    let output = child
        .wait_with_output()
        .ctx(|| format!("cannot wait for {}", describe(cmd)))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(LabError::Command {
            command: format!("{} <<< {input:?}", describe(cmd)),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// The command line of `cmd`, for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// `ip -n <ns> <args…>`.
pub fn ip(ns: &str, args: &[&str]) -> Result<()> {
    run(Command::new("ip").arg("-n").arg(ns).args(args)).map(drop)
}

/// A command that runs `program` inside namespace `ns` (`ip netns exec`, which execs the
/// program: the child's pid is the program's).
pub fn exec_command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

/// Applies an nftables script inside `ns`.
pub fn nft(ns: &str, script: &str) -> Result<()> {
    run_with_input(exec_command(ns, "nft").args(["-f", "-"]), script).map(drop)
}

/// Creates namespace `ns` with loopback up.
pub fn create(ns: &str) -> Result<()> {
    {
        let _guard = NETNS_ADD.lock().unwrap_or_else(|e| e.into_inner());
        run(Command::new("ip").args(["netns", "add", ns]))?;
    }
    ip(ns, &["link", "set", "lo", "up"])
}

/// Stops every process still inside `ns` (SIGKILL, by pid) and deletes the namespace.
pub fn destroy(ns: &str) -> Result<()> {
    for pid in pids(ns) {
        if let Ok(raw) = i32::try_from(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(raw),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    run(Command::new("ip").args(["netns", "del", ns])).map(drop)
}

/// Processes living in `ns` (empty when it does not exist).
pub fn pids(ns: &str) -> Vec<u32> {
    let Ok(out) = run(Command::new("ip").args(["netns", "pids", ns])) else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Names of all named namespaces on the machine.
pub fn list() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// The pid encoded in a lab namespace name (`agl<pid>-…`), if it is one.
pub fn creator_pid(ns: &str) -> Option<u32> {
    let rest = ns.strip_prefix(NS_PREFIX)?;
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok()
}

/// Whether process `pid` is alive (a zombie counts as dead).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
        Err(_) => false,
    }
}

/// Deletes lab namespaces left by processes that no longer run (crashed earlier runs),
/// killing whatever still runs inside them. Returns the names removed.
pub fn remove_stale() -> Vec<String> {
    let mut removed = Vec::new();
    for ns in list() {
        let Some(pid) = creator_pid(&ns) else {
            continue;
        };
        if pid_alive(pid) {
            continue;
        }
        if destroy(&ns).is_ok() {
            removed.push(ns);
        }
    }
    removed
}

/// Runs `f` on a new thread that has joined network namespace `ns`, and returns its result.
///
/// Sockets, TUN devices and child processes created by `f` belong to `ns`.
pub fn in_netns<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let path = Path::new(NETNS_DIR).join(ns);
    let file = File::open(&path).ctx(|| format!("cannot open namespace {}", path.display()))?;
    std::thread::scope(|scope| {
        let handle = scope.spawn(move || -> Result<T> {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| {
                LabError::io(
                    format!("cannot enter namespace {ns}"),
                    std::io::Error::from(e),
                )
            })?;
            Ok(f())
        });
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Writes sysctls (dotted keys, e.g. `net.ipv4.ip_forward`) inside `ns`. Missing
/// `net.bridge.*` keys are ignored: they exist only while `br_netfilter` is loaded.
pub fn sysctl(ns: &str, settings: &[(&str, &str)]) -> Result<()> {
    let settings: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    in_netns(ns, move || -> Result<()> {
        for (key, value) in &settings {
            // Missing on kernels without bridge netfilter, or without IPv6 (booted with
            // ipv6.disable=1): nothing to switch off there. IPv6 tests still need their
            // forwarding settings, which stay mandatory.
            let optional = key.starts_with("net.bridge.")
                || key.ends_with(".accept_dad")
                || key.ends_with(".disable_ipv6");
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            match std::fs::write(&path, value) {
                Ok(()) => {}
                Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(LabError::io(format!("cannot set {key}={value}"), e)),
            }
        }
        Ok(())
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creator_pid_reads_lab_names_only() {
        assert_eq!(creator_pid("agl1234-0-alice"), Some(1234));
        assert_eq!(creator_pid("agl1234"), None);
        assert_eq!(creator_pid("other-1234-x"), None);
        assert_eq!(creator_pid("aglx-1"), None);
    }

    #[test]
    fn own_pid_is_alive_and_absurd_pid_is_not() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(u32::MAX - 1));
    }
}
