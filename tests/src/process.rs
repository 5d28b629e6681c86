//! Programs the lab runs, and where to find the workspace's own programs.
//!
//! Every child is held by a [`ChildGuard`]: on drop it is stopped (SIGTERM, then SIGKILL after
//! a grace period) and always waited for — PID 1 on these machines reaps orphans lazily, so an
//! unwaited child stays a zombie. Its stdout and stderr go to files in the lab's log folder;
//! when the thread is panicking (a failing test) the guard prints them, so a failure shows
//! what each program said.
//!
//! [`workspace_bin`] finds `relayd`, `controld`, `agentctl`, … next to the running test
//! executable (`target/<profile>/`) and builds them with cargo when they are missing.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{IoContext, LabError, Result};

/// How long a child gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// How much of each log a failing test prints (the end of it).
const DUMP_TAIL_BYTES: u64 = 64 * 1024;

/// The folder holding a lab's logs and configuration files. Removed when the last user is
/// gone, unless `AGENTD_LAB_KEEP` is set.
#[derive(Debug)]
pub struct LogDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    next: AtomicU32,
}

impl LogDir {
    pub(crate) fn new() -> Result<Arc<Self>> {
        let dir = tempfile::Builder::new()
            .prefix("agentd-lab-")
            .tempdir()
            .ctx(|| "cannot create the lab's temporary folder".to_string())?;
        let path = dir.path().to_path_buf();
        let keep = std::env::var_os("AGENTD_LAB_KEEP").is_some();
        Ok(Arc::new(LogDir {
            dir: if keep {
                drop(dir.keep());
                None
            } else {
                Some(dir)
            },
            path,
            next: AtomicU32::new(0),
        }))
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A file name stem unique in this folder: `<n>-<label>`.
    pub(crate) fn unique(&self, label: &str) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let clean: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("{n:02}-{clean}")
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

/// A running program. Dropping it stops the program and waits for it.
#[derive(Debug)]
pub struct ChildGuard {
    label: String,
    child: Child,
    pid: u32,
    stdout: Option<PathBuf>,
    stderr: PathBuf,
    status: Option<ExitStatus>,
    _dir: Arc<LogDir>,
}

/// Where a child's stdin/stdout go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChildIo {
    /// stdin null, stdout to a file.
    Logged,
    /// stdin and stdout piped to the lab (a control channel); stderr still logged.
    Control,
}

impl ChildGuard {
    /// Spawns `cmd` with its output captured under `dir`, labelled `label` in logs.
    pub(crate) fn spawn(
        dir: &Arc<LogDir>,
        label: &str,
        mut cmd: Command,
        mode: ChildIo,
    ) -> Result<ChildGuard> {
        let stem = dir.unique(label);
        let stderr_path = dir.path().join(format!("{stem}.stderr"));
        let stderr = File::create(&stderr_path)
            .ctx(|| format!("cannot create {}", stderr_path.display()))?;
        let stdout_path = match mode {
            ChildIo::Logged => {
                let path = dir.path().join(format!("{stem}.stdout"));
                let file =
                    File::create(&path).ctx(|| format!("cannot create {}", path.display()))?;
                cmd.stdin(Stdio::null()).stdout(file);
                Some(path)
            }
            ChildIo::Control => {
                cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
                None
            }
        };
        cmd.stderr(stderr);
        let child = cmd
            .spawn()
            .ctx(|| format!("cannot start {}", crate::netns::describe(&cmd)))?;
        Ok(ChildGuard {
            label: label.to_string(),
            pid: child.id(),
            child,
            stdout: stdout_path,
            stderr: stderr_path,
            status: None,
            _dir: Arc::clone(dir),
        })
    }

    /// The program's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The label used in logs.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The file receiving the program's stdout (none for control-channel children).
    pub fn stdout_path(&self) -> Option<&Path> {
        self.stdout.as_deref()
    }

    /// The file receiving the program's stderr.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr
    }

    /// Everything the program has printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout
            .as_deref()
            .and_then(|p| std::fs::read(p).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Everything the program has printed on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read(&self.stderr)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub(crate) fn take_control(&mut self) -> Option<(ChildStdin, ChildStdout)> {
        Some((self.child.stdin.take()?, self.child.stdout.take()?))
    }

    /// Waits until stdout or stderr contains `needle`; fails if the program exits first or
    /// `timeout` passes. Returns the output seen.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = format!("{}{}", self.stdout(), self.stderr());
            if seen.contains(needle) {
                return Ok(seen);
            }
            if let Some(status) = self.try_wait()? {
                return Err(LabError::Invalid(format!(
                    "{} exited ({status}) before printing {needle:?}; it said:\n{seen}",
                    self.label
                )));
            }
            if Instant::now() >= deadline {
                return Err(LabError::Timeout(format!(
                    "{} did not print {needle:?} within {timeout:?}; it said:\n{seen}",
                    self.label
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status if the program has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .ctx(|| format!("cannot check on {}", self.label))?;
        }
        Ok(self.status)
    }

    /// Stops the program (SIGTERM, SIGKILL after a grace period) and waits for it.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        if let Ok(raw) = i32::try_from(self.pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(raw),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.kill()
    }

    /// Kills the program (SIGKILL) and waits for it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .ctx(|| format!("cannot wait for {}", self.label))?;
        self.status = Some(status);
        Ok(status)
    }

    /// Prints the end of the program's stdout and stderr to the test's stderr.
    #[allow(clippy::print_stderr)] // showing the logs of a failing test is the point
    pub fn dump_logs(&self) {
        let status = self
            .status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "running".to_string());
        for (what, path) in [
            ("stdout", self.stdout.as_deref()),
            ("stderr", Some(&self.stderr)),
        ] {
            let Some(path) = path else { continue };
            let text = tail(path, DUMP_TAIL_BYTES);
            if text.trim().is_empty() {
                continue;
            }
            eprintln!(
                "----- {} (pid {}, {status}) {what} [{}] -----\n{}\n----- end of {} {what} -----",
                self.label,
                self.pid,
                path.display(),
                text.trim_end(),
                self.label
            );
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.stop();
        if std::thread::panicking() {
            self.dump_logs();
        }
    }
}

/// The last `max` bytes of a file, marked when cut.
fn tail(path: &Path, max: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut prefix = String::new();
    if len > max {
        let _ = file.seek(SeekFrom::Start(len - max));
        prefix = format!("[… first {} bytes cut …]\n", len - max);
    }
    let mut buf = Vec::new();
    let _ = file.read_to_end(&mut buf);
    prefix + &String::from_utf8_lossy(&buf)
}

/// Binaries already resolved by [`workspace_bin`]; the lock also serialises builds.
static RESOLVED: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// The target/<profile> folder of the running executable (test binaries live in its `deps/`).
fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().ctx(|| "cannot find the running executable".to_string())?;
    let dir = exe
        .parent()
        .ok_or_else(|| LabError::Invalid(format!("{} has no folder", exe.display())))?;
    Ok(if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().unwrap_or(dir).to_path_buf()
    } else {
        dir.to_path_buf()
    })
}

/// Path of binary `bin` of workspace package `package` built with `features`: next to the
/// running test executable if it is there and newer than every source file of the
/// workspace, otherwise built now with `$CARGO build -p <package> --bin <bin> --features …`
/// into the same target folder. (`cargo test -p tests` builds only this package's
/// binaries: without the check a lab test would run an agentd older than its source.)
pub fn workspace_bin(package: &str, bin: &str, features: &[&str]) -> Result<PathBuf> {
    let profile_dir = profile_dir()?;
    let path = profile_dir.join(bin);
    let mut resolved = RESOLVED.lock().unwrap_or_else(|e| e.into_inner());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| Path::new("."));
    let fresh = || {
        let built = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        // The sources are looked at once per test process, not once per binary.
        static NEWEST: std::sync::OnceLock<Option<std::time::SystemTime>> =
            std::sync::OnceLock::new();
        let newest = *NEWEST.get_or_init(|| newest_source(workspace));
        built.is_some_and(|b| newest.is_none_or(|s| s <= b))
    };
    if resolved.contains(&path) || fresh() {
        resolved.insert(path.clone());
        return Ok(path);
    }
    let cargo = std::env::var_os("CARGO")
        .or_else(|| option_env!("CARGO").map(Into::into))
        .unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--quiet", "-p", package, "--bin", bin]);
    if !features.is_empty() {
        cmd.arg("--features").arg(features.join(","));
    }
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
    }
    if let Some(target) = profile_dir.parent() {
        if target.join("CACHEDIR.TAG").is_file() {
            cmd.arg("--target-dir").arg(target);
        }
    }
    crate::netns::run(&mut cmd)?;
    if !path.is_file() {
        return Err(LabError::Invalid(format!(
            "`{}` succeeded but {} does not exist",
            crate::netns::describe(&cmd),
            path.display()
        )));
    }
    resolved.insert(path.clone());
    Ok(path)
}

/// When a Rust source or manifest of the workspace under `dir` last changed (build
/// output, git data and hidden folders are not looked at).
fn newest_source(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let Ok(kind) = e.file_type() else { continue };
            if kind.is_dir() {
                if name != "target" && !name.starts_with('.') {
                    stack.push(e.path());
                }
            } else if name.ends_with(".rs") || name == "Cargo.toml" || name == "Cargo.lock" {
                let t = e.metadata().and_then(|m| m.modified()).ok();
                newest = newest.max(t);
            }
        }
    }
    newest
}

/// The relay server (`relayd`, package `relay`, feature `server`).
pub fn relayd() -> Result<PathBuf> {
    workspace_bin("relay", "relayd", &["server"])
}

/// The coordination server (`controld`, package `control`, feature `server`).
pub fn controld() -> Result<PathBuf> {
    workspace_bin("control", "controld", &["server"])
}

/// The CLI (`agentctl`, package `cli`).
pub fn agentctl() -> Result<PathBuf> {
    workspace_bin("cli", "agentctl", &[])
}

/// The agent daemon (`agentd`, package `agent`).
pub fn agentd() -> Result<PathBuf> {
    workspace_bin("agent", "agentd", &[])
}

/// The link emulator of this crate (`linkemu`).
pub fn linkemu() -> Result<PathBuf> {
    workspace_bin("tests", "linkemu", &[])
}
