//! `agentd service install|uninstall|status`: agentd as a system service. One interface,
//! one small file per service manager: systemd on Linux (the unit from
//! `packaging/systemd/agentd.service`, sandboxed), launchd on macOS (the plist from
//! `packaging/launchd/`). Installing twice is the same as once; uninstalling leaves no
//! unit behind.

use std::path::PathBuf;

#[cfg(target_os = "linux")]
mod systemd;
#[cfg(target_os = "linux")]
use systemd as platform;

#[cfg(target_os = "macos")]
mod launchd;
#[cfg(target_os = "macos")]
use launchd as platform;

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

/// Installs (or updates) the service; returns what was done, for the user.
pub fn install(o: &InstallOptions) -> anyhow::Result<String> {
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    {
        platform::install(o)
    }
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    {
        let _ = o;
        unsupported()
    }
}

/// Stops and removes the service.
pub fn uninstall(root: &std::path::Path) -> anyhow::Result<String> {
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    {
        platform::uninstall(root)
    }
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    {
        let _ = root;
        unsupported()
    }
}

/// Whether the service is installed and running.
pub fn status(root: &std::path::Path) -> anyhow::Result<String> {
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    {
        platform::status(root)
    }
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    {
        let _ = root;
        unsupported()
    }
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn unsupported() -> anyhow::Result<String> {
    anyhow::bail!(
        "agentd cannot install itself as a service on this system yet (Windows needs the service \
         control handler, which is not written); run `agentd up` directly"
    )
}

/// Runs a service-manager command; its output on failure becomes the error.
#[cfg(any(target_os = "linux", target_os = "macos"))]
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
