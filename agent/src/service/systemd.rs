//! systemd: the sandboxed unit from `packaging/systemd/agentd.service` (pointing at the
//! running binary) in /etc/systemd/system, its settings in /etc/default/agentd (0600: it
//! may hold a pre-auth key), and the `agentd` group that may use the local API.

use std::path::Path;

use super::{run, under, InstallOptions};

const UNIT: &str = include_str!("../../../packaging/systemd/agentd.service");
const UNIT_PATH: &str = "/etc/systemd/system/agentd.service";
const ENV_PATH: &str = "/etc/default/agentd";

/// Whether systemd manages this machine (and we are installing into it, not a scratch root).
fn systemd_running(root: &Path) -> bool {
    root == Path::new("/") && Path::new("/run/systemd/system").is_dir()
}

/// The unit, running `exe`.
pub fn unit_for(exe: &Path) -> String {
    UNIT.replace("/usr/bin/agentd", &exe.display().to_string())
}

/// One `KEY=value` line; values are quoted the way systemd reads them.
fn env_line(key: &str, value: &str) -> String {
    let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
    format!("{key}=\"{escaped}\"\n")
}

pub fn install(o: &InstallOptions) -> anyhow::Result<String> {
    let mut done = Vec::new();
    let unit_path = under(&o.root, UNIT_PATH);
    let unit = unit_for(&o.exe);
    if std::fs::read_to_string(&unit_path).ok().as_deref() != Some(unit.as_str()) {
        proto::secretfile::write_atomic(&unit_path, unit.as_bytes(), 0o644)?;
        done.push(format!("wrote {}", unit_path.display()));
    }
    if o.login_server.is_some() || o.auth_key.is_some() {
        let env_path = under(&o.root, ENV_PATH);
        let mut env =
            String::from("# agentd's settings (see `agentd up --help`); read by agentd.service\n");
        if let Some(u) = &o.login_server {
            env.push_str(&env_line("AGENTD_LOGIN_SERVER", u));
        }
        if let Some(k) = &o.auth_key {
            env.push_str(&env_line("AGENTD_AUTH_KEY", k));
        }
        proto::secretfile::write_private(&env_path, env.as_bytes())?;
        done.push(format!("wrote {} (mode 0600)", env_path.display()));
    }
    if systemd_running(&o.root) {
        if std::process::Command::new("getent")
            .args(["group", "agentd"])
            .output()
            .is_ok_and(|out| !out.status.success())
        {
            run("groupadd", &["--system", "agentd"])?;
            done.push("created group agentd (its members may use agentctl)".into());
        }
        run("systemctl", &["daemon-reload"])?;
        if o.start {
            run("systemctl", &["enable", "--now", "agentd.service"])?;
            done.push("enabled and started agentd.service".into());
        }
    } else if o.root == Path::new("/") {
        done.push("systemd is not running here: start agentd with `agentd up` instead".into());
    }
    if done.is_empty() {
        done.push("already installed; nothing to change".into());
    }
    Ok(done.join("\n"))
}

pub fn uninstall(root: &Path) -> anyhow::Result<String> {
    let mut done = Vec::new();
    if systemd_running(root) && under(root, UNIT_PATH).exists() {
        // Not running or not loaded is fine: the goal is that it is gone.
        let _ = run("systemctl", &["disable", "--now", "agentd.service"]);
        done.push("stopped and disabled agentd.service".into());
    }
    for p in [UNIT_PATH, ENV_PATH] {
        let path = under(root, p);
        match std::fs::remove_file(&path) {
            Ok(()) => done.push(format!("removed {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow::anyhow!("removing {}: {e}", path.display())),
        }
    }
    if systemd_running(root) {
        run("systemctl", &["daemon-reload"])?;
    }
    if done.is_empty() {
        done.push("not installed; nothing to remove".into());
    }
    Ok(done.join("\n"))
}

pub fn status(root: &Path) -> anyhow::Result<String> {
    let unit = under(root, UNIT_PATH);
    if !unit.exists() {
        return Ok("not installed".into());
    }
    if !systemd_running(root) {
        return Ok(format!(
            "installed ({}); systemd is not running here",
            unit.display()
        ));
    }
    let out = std::process::Command::new("systemctl")
        .args(["is-active", "agentd.service"])
        .output()?;
    Ok(format!(
        "installed; {}",
        String::from_utf8_lossy(&out.stdout).trim()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_points_at_the_binary_and_env_values_are_quoted() {
        let u = unit_for(Path::new("/opt/agentd/bin/agentd"));
        assert!(u.contains("ExecStart=/opt/agentd/bin/agentd up"));
        assert!(!u.contains("/usr/bin/agentd"));
        assert_eq!(env_line("K", "a\"b"), "K=\"a\\\"b\"\n");
    }
}
