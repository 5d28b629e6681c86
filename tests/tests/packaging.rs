//! Packaging: every systemd unit in `packaging/systemd/` passes `systemd-analyze verify`,
//! and `agentd service install` is idempotent, writes a unit that verifies and settings
//! only root can read, and `uninstall` leaves nothing behind. Needs `systemd-analyze`
//! (Debian package `systemd`); skips without it, except under CI=true.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
#![allow(clippy::print_stderr)] // the skip notice

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn have_analyze() -> bool {
    if tests::have_program("systemd-analyze") {
        return true;
    }
    assert!(
        !tests::in_ci(),
        "systemd-analyze is missing (install the systemd package; .ci/run does)"
    );
    eprintln!("SKIPPED (not CI): systemd-analyze is missing");
    false
}

/// `systemd-analyze verify` on `unit`; returns its complaints.
fn verify(unit: &Path) -> Result<(), String> {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    // Only complaints about our unit count (the host's own units may have some).
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| l.contains(unit.file_name().unwrap().to_str().unwrap()))
        .collect();
    if out.status.success() && ours.is_empty() {
        Ok(())
    } else {
        Err(err)
    }
}

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd")
}

#[test]
fn every_systemd_unit_passes_systemd_analyze_verify() {
    if !have_analyze() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bins = [
        ("agentd", tests::process::agentd().unwrap()),
        ("relayd", tests::process::relayd().unwrap()),
        ("controld", tests::process::controld().unwrap()),
    ];
    // Every unit in the folder is one of ours, each for a binary built here.
    let mut units: Vec<String> = std::fs::read_dir(packaging())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".service") || n.ends_with(".socket") || n.ends_with(".timer"))
        .collect();
    units.sort();
    let mut names: Vec<String> = bins.iter().map(|(n, _)| format!("{n}.service")).collect();
    names.sort();
    assert_eq!(
        units, names,
        "a unit without a check, or a check without a unit"
    );
    for (name, bin) in bins {
        let unit = std::fs::read_to_string(packaging().join(format!("{name}.service"))).unwrap();
        // The unit names /usr/bin/<name>; verify checks the binary exists, so point it at
        // the one just built.
        let unit = unit.replace(&format!("/usr/bin/{name}"), &bin.display().to_string());
        let path = dir.path().join(format!("{name}.service"));
        std::fs::write(&path, unit).unwrap();
        verify(&path).unwrap_or_else(|e| panic!("{name}.service: {e}"));
    }
}

fn agentd(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(tests::process::agentd().unwrap())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn service_install_twice_is_once_and_uninstall_leaves_nothing() {
    if !have_analyze() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let r = root.path().display().to_string();
    let install = [
        "service",
        "install",
        "--root",
        &r,
        "--no-start",
        "--login-server",
        "https://control.example.com",
        "--auth-key",
        "tskey-secret",
    ];
    let (ok, out, err) = agentd(&install);
    assert!(ok, "{out}{err}");
    let unit = root.path().join("etc/systemd/system/agentd.service");
    let env = root.path().join("etc/default/agentd");
    let first = (std::fs::read(&unit).unwrap(), std::fs::read(&env).unwrap());

    let (ok, out, err) = agentd(&install);
    assert!(ok, "{out}{err}");
    assert!(
        !out.contains("agentd.service"),
        "the unit was rewritten: {out}"
    );
    assert_eq!(
        (std::fs::read(&unit).unwrap(), std::fs::read(&env).unwrap()),
        first
    );

    // The unit runs this very binary, and verifies.
    let text = std::fs::read_to_string(&unit).unwrap();
    let exe = tests::process::agentd().unwrap().canonicalize().unwrap();
    assert!(
        text.contains(&format!("ExecStart={} up", exe.display())),
        "{text}"
    );
    assert!(text.contains("CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW"));
    verify(&unit).unwrap();
    // The settings hold the key: root only.
    let mode = std::fs::metadata(&env).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(std::fs::read_to_string(&env)
        .unwrap()
        .contains("AGENTD_AUTH_KEY=\"tskey-secret\""));

    let (ok, out, _) = agentd(&["service", "status", "--root", &r]);
    assert!(ok && out.starts_with("installed"), "{out}");

    let (ok, out, err) = agentd(&["service", "uninstall", "--root", &r]);
    assert!(ok, "{out}{err}");
    assert!(!unit.exists() && !env.exists());
    let left: Vec<_> = walk(root.path())
        .into_iter()
        .filter(|p| p.is_file())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let (ok, out, _) = agentd(&["service", "uninstall", "--root", &r]);
    assert!(ok && out.contains("not installed"), "{out}");
    let (_, out, _) = agentd(&["service", "status", "--root", &r]);
    assert_eq!(out.trim(), "not installed");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

fn have_cargo_deb() -> bool {
    let ok = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            !tests::in_ci(),
            "cargo-deb is missing (cargo install cargo-deb; .ci/run does)"
        );
        eprintln!("SKIPPED (not CI): cargo-deb is missing");
    }
    ok
}

/// Builds the .deb of workspace package `pkg` from the binaries already built (this test
/// run's profile; releases use `cargo deb` with the release profile) into `out`.
fn build_deb(pkg: &str, out: &Path) -> PathBuf {
    let profile = tests::process::agentd()
        .unwrap()
        .parent()
        .and_then(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap();
    let profile = if profile == "debug" {
        "dev".to_string()
    } else {
        profile
    };
    let o = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .args([
            "deb",
            "-p",
            pkg,
            "--no-build",
            "--fast",
            "--profile",
            &profile,
            "-o",
        ])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "cargo deb -p {pkg}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let path = String::from_utf8_lossy(&o.stdout)
        .trim()
        .lines()
        .last()
        .unwrap()
        .to_string();
    PathBuf::from(path)
}

fn deb_files(deb: &Path) -> Vec<String> {
    let o = Command::new("dpkg-deb")
        .arg("-c")
        .arg(deb)
        .output()
        .unwrap();
    assert!(o.status.success());
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').to_string())
        .collect()
}

#[test]
fn debs_hold_the_binaries_and_units_and_install_into_a_scratch_root() {
    if !have_cargo_deb() {
        return;
    }
    // The binaries the packages take.
    for bin in [
        tests::process::agentd(),
        tests::process::agentctl(),
        tests::process::relayd(),
        tests::process::controld(),
    ] {
        bin.unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let expect: [(&str, &str, &[&str]); 3] = [
        (
            "agent",
            "agentd",
            &[
                "/usr/bin/agentd",
                "/usr/bin/agentctl",
                "/lib/systemd/system/agentd.service",
            ],
        ),
        (
            "relay",
            "relayd",
            &["/usr/bin/relayd", "/lib/systemd/system/relayd.service"],
        ),
        (
            "control",
            "controld",
            &["/usr/bin/controld", "/lib/systemd/system/controld.service"],
        ),
    ];
    let mut agentd_deb = None;
    for (pkg, name, files) in expect {
        let deb = build_deb(pkg, out.path());
        let field = Command::new("dpkg-deb")
            .arg("-f")
            .arg(&deb)
            .arg("Package")
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&field.stdout).trim(), name);
        let listed = deb_files(&deb);
        for f in files {
            assert!(
                listed.iter().any(|l| l == f),
                "{name}: no {f} in {listed:?}"
            );
        }
        if name == "agentd" {
            agentd_deb = Some(deb);
        }
    }

    // Install agentd's package into a scratch root with dpkg itself.
    let root = tempfile::tempdir().unwrap();
    let admin = root.path().join("var/lib/dpkg");
    std::fs::create_dir_all(admin.join("info")).unwrap();
    std::fs::create_dir_all(admin.join("updates")).unwrap();
    std::fs::write(admin.join("status"), "").unwrap();
    // The root's own group files: postinst adds group agentd there, not to this system's.
    let etc = root.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("group"), "root:x:0:\n").unwrap();
    std::fs::write(etc.join("gshadow"), "root:*::\n").unwrap();
    std::fs::write(etc.join("passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(etc.join("shadow"), "root:*:1::::::\n").unwrap();
    let host_groups = std::fs::read_to_string("/etc/group").unwrap();
    let o = Command::new("dpkg")
        .arg(format!("--root={}", root.path().display()))
        .args(["--force-depends", "--force-script-chrootless", "-i"])
        .arg(agentd_deb.unwrap())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "dpkg -i: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // postinst made the group the unit runs in, in the root it was installed into.
    let groups = std::fs::read_to_string(etc.join("group")).unwrap();
    assert!(
        groups.lines().any(|l| l.starts_with("agentd:")),
        "no group agentd after installing: {groups}"
    );
    assert_eq!(std::fs::read_to_string("/etc/group").unwrap(), host_groups);
    assert!(root.path().join("usr/lib/sysusers.d/agentd.conf").is_file());
    let agentd = root.path().join("usr/bin/agentd");
    assert!(root.path().join("usr/bin/agentctl").is_file());
    assert!(root
        .path()
        .join("lib/systemd/system/agentd.service")
        .is_file());
    let v = Command::new(&agentd).arg("--version").output().unwrap();
    assert!(
        String::from_utf8_lossy(&v.stdout).starts_with("agentd "),
        "{v:?}"
    );
    // dpkg knows the package and its files.
    let l = Command::new("dpkg")
        .arg(format!("--root={}", root.path().display()))
        .args(["-L", "agentd"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&l.stdout).contains("/usr/bin/agentd"));
}

/// The `[Service]` settings of a unit, the last of each key (systemd's rule for most of
/// them), and every `Environment=` line.
fn service_settings(unit: &str) -> (std::collections::BTreeMap<String, String>, Vec<String>) {
    let mut settings = std::collections::BTreeMap::new();
    let mut env = Vec::new();
    let mut in_service = false;
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        let Some((k, v)) = line.split_once('=').filter(|_| in_service) else {
            continue;
        };
        if k == "Environment" {
            env.push(v.to_string());
        } else {
            settings.insert(k.to_string(), v.to_string());
        }
    }
    (settings, env)
}

/// The numeric ID of group `name` in /etc/group.
fn group_id(name: &str) -> Option<u32> {
    std::fs::read_to_string("/etc/group")
        .ok()?
        .lines()
        .find(|l| l.split(':').next() == Some(name))
        .and_then(|l| l.split(':').nth(2))
        .and_then(|g| g.parse().ok())
}

/// The group `agentd` for the length of a test: made if missing (as the package's
/// postinst does) and removed again only if this made it.
struct AgentdGroup {
    gid: u32,
    made: bool,
}

impl AgentdGroup {
    fn ensure() -> AgentdGroup {
        if let Some(gid) = group_id("agentd") {
            return AgentdGroup { gid, made: false };
        }
        let o = Command::new("groupadd")
            .args(["--system", "agentd"])
            .output()
            .unwrap();
        assert!(o.status.success(), "groupadd: {o:?}");
        AgentdGroup {
            gid: group_id("agentd").unwrap(),
            made: true,
        }
    }
}

impl Drop for AgentdGroup {
    fn drop(&mut self) {
        if self.made {
            let _ = Command::new("groupdel").arg("agentd").output();
        }
    }
}

/// agentd run the way `packaging/systemd/agentd.service` runs it — its capability
/// bounding set, no new privileges, its umask and group, its environment, its state and
/// runtime directories with their modes — through `setpriv`, since this machine has no
/// systemd as PID 1: a member of group `agentd` can use agentctl, and someone who is
/// not cannot. (What `setpriv` cannot reproduce — the mount sandboxing, device policy,
/// address families — is checked by `systemd-analyze verify` above.)
#[test]
fn a_member_of_group_agentd_uses_agentctl_when_agentd_runs_as_the_unit_runs_it() {
    let lab = tests::lab_or_skip!(requires: ["setpriv", "groupadd"]);
    let unit = std::fs::read_to_string(packaging().join("agentd.service")).unwrap();
    let (s, env) = service_settings(&unit);
    let group = AgentdGroup::ensure();
    assert_eq!(s.get("Group").map(String::as_str), Some("agentd"), "{unit}");

    // The state and runtime directories as systemd makes them: owned by root and the
    // unit's group, with the unit's modes.
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = |name: &str, mode_key: &str| {
        let d = base.path().join(name);
        std::fs::create_dir(&d).unwrap();
        std::os::unix::fs::chown(&d, None, Some(group.gid)).unwrap();
        let mode = u32::from_str_radix(&s[mode_key], 8).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
        d
    };
    let state = dir("state", "StateDirectoryMode");
    let runtime = dir("run", "RuntimeDirectoryMode");
    let socket = runtime.join("agentd.sock");

    // setpriv: exactly the unit's capabilities, no new privileges, its group and no
    // other; the umask through the shell that execs agentd.
    let caps = |key: &str| -> String {
        s.get(key)
            .map(|v| {
                v.split_whitespace()
                    .map(|c| format!(",+{}", c.trim_start_matches("CAP_").to_lowercase()))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(s.get("NoNewPrivileges").map(String::as_str), Some("yes"));
    let umask = s["UMask"].clone();
    let host = lab.add_public_host("dev").unwrap();
    let mut cmd = lab.command(&host.node, "setpriv");
    cmd.arg(format!(
        "--bounding-set=-all{}",
        caps("CapabilityBoundingSet")
    ))
    .arg(format!("--inh-caps=-all{}", caps("AmbientCapabilities")))
    .arg(format!(
        "--ambient-caps=-all{}",
        caps("AmbientCapabilities")
    ))
    .arg("--no-new-privs")
    .arg(format!("--regid={}", group.gid))
    .arg("--clear-groups")
    .args(["sh", "-c", &format!("umask {umask} && exec \"$0\" \"$@\"")])
    .arg(tests::process::agentd().unwrap())
    .arg("up");
    for e in &env {
        let (k, v) = e.trim_matches('"').split_once('=').unwrap();
        let v = match k {
            "AGENTD_STATE_DIR" => state.display().to_string(),
            "AGENTD_SOCKET" => socket.display().to_string(),
            _ => v.to_string(),
        };
        cmd.env(k, v);
    }
    // No control server: the local API answers all the same.
    cmd.env("AGENTD_LOGIN_SERVER", "http://127.0.0.1:9");
    let mut agentd = lab.spawn_command("dev-agentd-as-unit", cmd).unwrap();
    agentd
        .wait_for_output("local API listening", std::time::Duration::from_secs(20))
        .unwrap();

    {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::metadata(&socket).unwrap();
        assert_eq!(m.gid(), group.gid, "the socket is not in group agentd");
        assert_eq!(m.mode() & 0o777, 0o660);
    }
    let agentctl = |groups: &str| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", groups, "--inh-caps=-all"])
            .arg(tests::process::agentctl().unwrap())
            .arg("--socket")
            .arg(&socket)
            .args(["status", "--json"])
            .output()
            .unwrap()
    };
    let member = agentctl(&format!("--groups={}", group.gid));
    assert!(
        member.status.success(),
        "a member of group agentd: {}",
        String::from_utf8_lossy(&member.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&member.stdout).unwrap();
    assert!(status["control_state"].is_string(), "{status:#}");
    let stranger = agentctl("--clear-groups");
    assert!(
        !stranger.status.success(),
        "someone outside group agentd could use agentctl"
    );
    let log = agentd.stderr();
    assert!(!log.contains("cannot give the local API socket"), "{log}");
    agentd.stop().unwrap();
}
