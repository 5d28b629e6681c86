//! Where the interop suite finds its peers: Tailscale's and Headscale's programs, built by
//! `.ci/run` with `go install` into a cache outside the repository.

use std::path::PathBuf;

/// The program `name` from `$AGENTD_TAILSCALE_BIN`, else `~/.cache/agentd-interop/bin`.
/// `None` (the caller skips, saying so) on a developer machine without it, or when
/// `.ci/run` found no Go toolchain (`AGENTD_INTEROP=skip`). Under `CI=true` otherwise, a
/// missing program panics: the suite must run there.
#[allow(clippy::print_stderr)] // the skip notice is for the person running the tests
pub fn tool(name: &str) -> Option<PathBuf> {
    if std::env::var("AGENTD_INTEROP").as_deref() == Ok("skip") {
        eprintln!("SKIPPED: the interop suite is off (AGENTD_INTEROP=skip: no Go toolchain)");
        return None;
    }
    let dir = std::env::var_os("AGENTD_TAILSCALE_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/agentd-interop/bin"))
        })?;
    let p = dir.join(name);
    if p.is_file() {
        return Some(p);
    }
    assert!(
        !crate::in_ci(),
        "{name} not found in {}: .ci/run builds it (Tailscale v1.102.3, Headscale v0.29.0)",
        dir.display()
    );
    // Once per test program: one line says what to install.
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        eprintln!(
            "SKIPPED (not CI): interop tests here: {name} is not in {} (install Go 1.26 or newer, then `sudo .ci/run --deps-only` builds Tailscale's and Headscale's programs)",
            dir.display()
        )
    });
    None
}
