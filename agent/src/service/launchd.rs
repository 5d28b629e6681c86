//! launchd: the plist from `packaging/launchd/com.agentd.agentd.plist` (pointing at the
//! running binary, with the login server and key as environment variables) in
//! /Library/LaunchDaemons, loaded with launchctl.

use std::path::Path;

use super::{run, under, InstallOptions};

const PLIST: &str = include_str!("../../../packaging/launchd/com.agentd.agentd.plist");
const PLIST_PATH: &str = "/Library/LaunchDaemons/com.agentd.agentd.plist";

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn install(o: &InstallOptions) -> anyhow::Result<String> {
    let mut plist = PLIST.replace(
        "/usr/local/bin/agentd",
        &xml_escape(&o.exe.display().to_string()),
    );
    let mut extra = String::new();
    for (k, v) in [
        ("AGENTD_LOGIN_SERVER", &o.login_server),
        ("AGENTD_AUTH_KEY", &o.auth_key),
    ] {
        if let Some(v) = v {
            extra.push_str(&format!(
                "    <key>{k}</key>\n    <string>{}</string>\n",
                xml_escape(v)
            ));
        }
    }
    plist = plist.replace(
        "  </dict>\n  <key>RunAtLoad</key>",
        &format!("{extra}  </dict>\n  <key>RunAtLoad</key>"),
    );
    let path = under(&o.root, PLIST_PATH);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // The plist may hold a pre-auth key: root-only.
    proto::secretfile::write_private(&path, plist.as_bytes())?;
    if o.root == Path::new("/") && o.start {
        let _ = run("launchctl", &["unload", PLIST_PATH]);
        run("launchctl", &["load", "-w", PLIST_PATH])?;
        return Ok(format!("wrote {}; loaded it", path.display()));
    }
    Ok(format!("wrote {}", path.display()))
}

pub fn uninstall(root: &Path) -> anyhow::Result<String> {
    let path = under(root, PLIST_PATH);
    if !path.exists() {
        return Ok("not installed; nothing to remove".into());
    }
    if root == Path::new("/") {
        let _ = run("launchctl", &["unload", "-w", PLIST_PATH]);
    }
    std::fs::remove_file(&path)?;
    Ok(format!("unloaded and removed {}", path.display()))
}

pub fn status(root: &Path) -> anyhow::Result<String> {
    let path = under(root, PLIST_PATH);
    Ok(if path.exists() {
        format!("installed ({})", path.display())
    } else {
        "not installed".into()
    })
}
