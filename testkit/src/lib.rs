//! Helpers for tests and benchmarks, in a crate of their own so that the relay's and the
//! control server's suites need only this, not the whole namespace lab (`tests/`).
//!
//! What is here: whether this run is CI ([`in_ci`]), where Tailscale's and Headscale's
//! programs are ([`interop::tool`]), a child process stopped on drop ([`KillOnDrop`]), a
//! free loopback port ([`free_port`]), an interrupt-safe `recv_from` ([`recv_from`]), and
//! readings of `/proc` ([`procfs`]). Nothing here talks to a network outside loopback.

pub mod interop;
pub mod procfs;

/// Whether this run is CI (`CI=true`), where a suite that cannot run is a failure, not
/// a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// A loopback TCP port that was free a moment ago (for servers that must know each
/// other's port before they start).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral loopback port")
}

/// A child process that is killed and reaped when this drops, also when the test panics.
#[derive(Debug)]
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    /// The child's process ID.
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `recv_from` that retries when a signal interrupts it, within the socket's read timeout.
/// On Linux a socket with a read timeout fails with EINTR when the process is stopped and
/// continued (signal(7)), even with no handler installed; a CI runner that pauses jobs does
/// exactly that. A retry waits only for what is left of the timeout, so repeated pauses
/// cannot stretch a bounded wait into an endless one.
pub fn recv_from(
    socket: &std::net::UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(usize, std::net::SocketAddr)> {
    use std::io::{Error, ErrorKind};
    let timeout = socket.read_timeout()?;
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    let mut shortened = false;
    let result = loop {
        match socket.recv_from(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => {
                let Some(deadline) = deadline else { continue };
                match deadline.checked_duration_since(std::time::Instant::now()) {
                    Some(left) if !left.is_zero() => {
                        shortened = true;
                        socket.set_read_timeout(Some(left))?;
                    }
                    _ => break Err(Error::new(ErrorKind::TimedOut, "read timed out")),
                }
            }
            other => break other,
        }
    };
    if shortened {
        socket.set_read_timeout(timeout)?;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_child_is_reaped() {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        drop(KillOnDrop(child));
        // Reaped: no process (not even a zombie) has that ID any more, or another one
        // took it (then it is not our sleep).
        let gone = procfs::command_line(pid).is_none_or(|c| !c.starts_with("sleep"));
        assert!(gone, "pid {pid} is still there");
    }

    #[test]
    fn free_ports_bind() {
        let p = free_port();
        assert_ne!(p, 0);
        std::net::TcpListener::bind(("127.0.0.1", p)).unwrap();
    }
}
