//! The agent's pure core, growing out of the engine: what it decides has no sockets,
//! no tasks and no clock of its own — time comes in as an argument and what to send
//! goes out as values, so it is tested with simulated time (`docs/agent-core.md` says
//! where the split stands and where it goes).
//!
//! Parts so far: [`wg`] (WireGuard through boringtun, and where an incoming datagram
//! belongs), [`peer`] (one peer: its WireGuard session, disco state and held packets),
//! [`routes`] (which peer owns an address), and [`peers`] (the peer table built from
//! the network map, with its rules: the peer cap, disco keys claimed twice, and the
//! source-address check on decrypted packets). The engine (`crate::engine`) is the I/O
//! shell around it.

pub mod core;
pub mod demux;
pub mod filter;
pub mod outbox;
pub mod peer;
pub mod peers;
pub mod routes;
#[cfg(test)]
mod sim;
pub mod wg;

#[cfg(test)]
mod purity {
    //! The node's sources use no async runtime, no sockets and no clock: a reading of
    //! the files, so a change that adds one fails here rather than in review.

    const FORBIDDEN: &[&str] = &[
        "tokio",
        "async fn",
        ".await",
        "Instant::now",
        "SystemTime",
        "UdpSocket",
        "TcpStream",
        "TcpListener",
        "std::thread",
        // The shell's modules: the node must not reach back into them.
        "crate::sock",
        "crate::engine",
        "crate::relays",
        "crate::tundev",
        "crate::api",
    ];

    /// The code of a source file before its test module.
    fn code_of(text: &str) -> &str {
        text.split("#[cfg(test)]").next().unwrap_or(text)
    }

    #[test]
    fn node_sources_have_no_io_and_no_clock() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/node");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            // sim.rs is the simulated network, compiled for tests only.
            if path.extension().is_none_or(|e| e != "rs") || path.ends_with("sim.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = code_of(&text);
            for word in FORBIDDEN {
                let hit = code
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("//"))
                    .any(|l| l.contains(word));
                assert!(!hit, "{} uses {word}", path.display());
            }
            checked += 1;
        }
        assert!(checked >= 4, "only {checked} files under {}", dir.display());
    }

    #[test]
    fn the_check_sees_what_it_forbids() {
        let sample = "use tokio::net::UdpSocket;\nfn f() { let t = Instant::now(); }\n#[cfg(test)]\nmod tests { fn g() { Instant::now(); } }";
        let code = code_of(sample);
        assert!(FORBIDDEN.iter().filter(|w| code.contains(*w)).count() >= 3);
        assert!(!code.contains("mod tests"));
    }
}
