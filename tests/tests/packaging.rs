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
