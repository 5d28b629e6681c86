//! `agentd service install|uninstall|status`: agentd as a system service. One interface,
//! one small file per service manager: systemd on Linux (the unit from
//! `packaging/systemd/agentd.service`, sandboxed), launchd on macOS (the plist from
//! `packaging/launchd/`), the Windows service manager (`windows.rs`, which also has the
//! service's entry point, `agentd service run`). Installing twice is the same as once;
//! uninstalling leaves no unit behind.

use std::path::{Path, PathBuf};

#[cfg(target_os = "linux")]
mod systemd;
#[cfg(target_os = "linux")]
use systemd as platform;

// Compiled for tests on Linux too: its files are checked in a scratch root there.
#[cfg(any(target_os = "macos", all(test, target_os = "linux")))]
mod launchd;
#[cfg(target_os = "macos")]
use launchd as platform;

#[cfg(windows)]
mod windows;
#[cfg(windows)]
use windows as platform;

/// The platforms with a service manager we drive.
macro_rules! supported {
    ($($item:item)*) => {$(#[cfg(any(target_os = "linux", target_os = "macos", windows))] $item)*};
}
macro_rules! unsupported {
    ($($item:item)*) => {$(#[cfg(not(any(target_os = "linux", target_os = "macos", windows)))] $item)*};
}

/// What `install` needs. Its `Debug` form leaves out the pre-auth key.
#[derive(Clone)]
pub struct InstallOptions {
    /// The agentd binary the service runs.
    pub exe: PathBuf,
    /// Written to the service's settings when given; kept from an earlier install if not.
    pub login_server: Option<String>,
    pub auth_key: Option<String>,
    /// Install under this directory instead of `/` (packaging and tests); nothing is
    /// started then.
    pub root: PathBuf,
    /// Enable and start the service after writing it (when the service manager runs).
    pub start: bool,
}

impl std::fmt::Debug for InstallOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstallOptions")
            .field("exe", &self.exe)
            .field("login_server", &self.login_server)
            .field("auth_key", &self.auth_key.as_ref().map(|_| "<redacted>"))
            .field("root", &self.root)
            .field("start", &self.start)
            .finish()
    }
}

supported! {
    /// Installs (or updates) the service; returns what was done, for the user.
    pub fn install(o: &InstallOptions) -> anyhow::Result<String> {
        platform::install(o)
    }

    /// Stops and removes the service.
    pub fn uninstall(root: &Path) -> anyhow::Result<String> {
        platform::uninstall(root)
    }

    /// Whether the service is installed and running.
    pub fn status(root: &Path) -> anyhow::Result<String> {
        platform::status(root)
    }
}

unsupported! {
    pub fn install(_o: &InstallOptions) -> anyhow::Result<String> {
        unsupported()
    }

    pub fn uninstall(_root: &Path) -> anyhow::Result<String> {
        unsupported()
    }

    pub fn status(_root: &Path) -> anyhow::Result<String> {
        unsupported()
    }

    fn unsupported() -> anyhow::Result<String> {
        anyhow::bail!(
            "agentd has no service manager to install itself into on this system; run `agentd up` directly"
        )
    }
}

/// The future that tells a running agentd to stop.
pub type Shutdown = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// How the service manager's agentd runs: settings, where its keys and log go.
#[derive(Debug, Clone, Default)]
pub struct ServiceRun {
    pub settings: Settings,
    pub state_dir: PathBuf,
    /// Log here (appending) instead of stderr.
    pub log_file: Option<PathBuf>,
}

/// What `agentd service run` runs once the service manager has started it.
pub type Runner = fn(ServiceRun, Shutdown) -> anyhow::Result<()>;

/// `agentd service run`: the entry point the Windows service manager starts. Elsewhere
/// the service manager runs `agentd up` itself, so this is an error.
pub fn run_service(runner: Runner) -> anyhow::Result<()> {
    #[cfg(windows)]
    {
        windows::run_service(runner)
    }
    #[cfg(not(windows))]
    {
        let _ = runner;
        anyhow::bail!(
            "`agentd service run` is for the Windows service manager; here the service runs `agentd up`"
        )
    }
}

/// The service's settings file where the service manager has no environment of its
/// own to keep them (Windows): `KEY=value` lines, `#` comments, keys named like the
/// environment variables `agentd up` reads. Its `Debug` form leaves out the pre-auth key.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Settings {
    pub login_server: Option<String>,
    pub auth_key: Option<String>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("login_server", &self.login_server)
            .field("auth_key", &self.auth_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

const LOGIN_SERVER_KEY: &str = "AGENTD_LOGIN_SERVER";
const AUTH_KEY_KEY: &str = "AGENTD_AUTH_KEY";

impl Settings {
    /// Reads a settings file (missing: no settings).
    pub fn read(path: &Path) -> anyhow::Result<Settings> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Settings::parse(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Settings::default()),
            Err(e) => Err(anyhow::anyhow!("reading {}: {e}", path.display())),
        }
    }

    /// Parses the text of a settings file; unknown keys and malformed lines are ignored.
    pub fn parse(text: &str) -> Settings {
        let mut s = Settings::default();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = Some(value.trim().to_string()).filter(|v| !v.is_empty());
            match key.trim() {
                LOGIN_SERVER_KEY => s.login_server = value,
                AUTH_KEY_KEY => s.auth_key = value,
                _ => {}
            }
        }
        s
    }

    /// The file's text; a value spanning lines is refused.
    pub fn to_text(&self) -> anyhow::Result<String> {
        let mut out = String::from("# agentd's service settings (see `agentd up --help`)\n");
        for (key, value) in [
            (LOGIN_SERVER_KEY, &self.login_server),
            (AUTH_KEY_KEY, &self.auth_key),
        ] {
            if let Some(v) = value {
                if v.contains(['\r', '\n']) {
                    anyhow::bail!("{key} must be one line");
                }
                out.push_str(&format!("{key}={v}\n"));
            }
        }
        Ok(out)
    }
}

/// Runs a service-manager command; its output on failure becomes the error.
#[cfg(any(target_os = "linux", target_os = "macos", windows))]
fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("running {program}: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `dir` joined with an absolute path (`/etc/x` under `/tmp/root` is `/tmp/root/etc/x`).
pub fn under(root: &std::path::Path, abs: &str) -> PathBuf {
    root.join(abs.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip_and_ignore_what_they_do_not_know() {
        let s = Settings {
            login_server: Some("https://control.example.com".into()),
            auth_key: Some("tskey-abc=def".into()),
        };
        assert_eq!(Settings::parse(&s.to_text().unwrap()), s);
        let parsed =
            Settings::parse("# c\nJUNK\nOTHER=1\n AGENTD_LOGIN_SERVER = http://x:8080 \r\n");
        assert_eq!(parsed.login_server.as_deref(), Some("http://x:8080"));
        assert_eq!(parsed.auth_key, None);
        assert!(!format!("{s:?}").contains("tskey"));
        let bad = Settings {
            auth_key: Some("a\nAGENTD_LOGIN_SERVER=evil".into()),
            ..Settings::default()
        };
        assert!(bad.to_text().is_err());
    }
}
