//! The README's first command: `target/debug/demo` builds the whole system in namespaces
//! and prints both devices' `agentctl status`, each showing a direct path. Needs root;
//! skips without it (fails under CI=true).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

#[test]
fn demo_prints_both_status_tables_with_a_direct_path() {
    // Only to learn whether this machine can host a lab (and to fail under CI if not).
    drop(tests::lab_or_skip!());
    let demo = tests::process::workspace_bin("tests", "demo", &[]).unwrap();
    let out = std::process::Command::new(demo).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let alice = text.split("==> agentctl status on alice").nth(1).unwrap();
    let bob = alice.split("==> agentctl status on bob").nth(1).unwrap();
    let alice = alice.split("==> agentctl status on bob").next().unwrap();
    assert!(
        alice.contains("bob") && alice.contains("direct 198.51.100."),
        "{text}"
    );
    assert!(
        bob.contains("alice") && bob.contains("direct 198.51.100."),
        "{text}"
    );
    assert!(text.contains("==> tearing down"), "{text}");
}
