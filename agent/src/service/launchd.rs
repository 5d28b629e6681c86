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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn plist_runs_the_binary_with_escaped_settings_root_only_and_uninstalls_cleanly() {
        let root = tempfile::tempdir().unwrap();
        let o = InstallOptions {
            exe: "/opt/agent d/agentd".into(),
            login_server: Some("https://control.example.com/?a=1&b=2".into()),
            auth_key: Some("key<secret>".into()),
            root: root.path().to_path_buf(),
            start: true, // a scratch root starts nothing
        };
        let first = install(&o).unwrap();
        assert!(first.contains("wrote"), "{first}");
        let path = under(root.path(), PLIST_PATH);
        let plist = std::fs::read_to_string(&path).unwrap();
        assert!(
            plist.contains("<string>/opt/agent d/agentd</string>"),
            "{plist}"
        );
        assert!(!plist.contains("/usr/local/bin/agentd"));
        assert!(plist.contains("<key>AGENTD_LOGIN_SERVER</key>\n    <string>https://control.example.com/?a=1&amp;b=2</string>"), "{plist}");
        assert!(
            plist.contains("<string>key&lt;secret&gt;</string>"),
            "{plist}"
        );
        // The settings sit inside EnvironmentVariables, next to the state directory.
        let env = plist
            .split("<key>EnvironmentVariables</key>")
            .nth(1)
            .unwrap();
        let env = env.split("</dict>").next().unwrap();
        assert!(env.contains("AGENTD_STATE_DIR") && env.contains("AGENTD_AUTH_KEY"));
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        install(&o).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            plist,
            "not idempotent"
        );
        assert!(status(root.path()).unwrap().starts_with("installed"));
        uninstall(root.path()).unwrap();
        assert!(!path.exists());
        assert_eq!(status(root.path()).unwrap(), "not installed");
    }
}
