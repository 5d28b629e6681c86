//! Whether this host gives the tunnel IPv6. Many servers, VPS images and containers run
//! with IPv6 switched off (`net.ipv6.conf.all.disable_ipv6=1`: the kernel then refuses
//! IPv6 addresses with EACCES) or built without it (EAFNOSUPPORT from every IPv6 socket).
//! agentd then runs on IPv4 alone: no IPv6 tunnel address, no IPv6 routes, no IPv6 UDP
//! socket, and peers' IPv6 tunnel traffic dropped and counted. This module decides that
//! from what the kernel says; it does no I/O but reading the sysctls in [`probe_host`].

use std::io;

/// The tunnel's IPv6.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ipv6Support {
    On,
    /// Off, and why (for the log line and `agentctl status`).
    Off(Ipv6Off),
}

/// Why IPv6 is off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ipv6Off {
    /// The kernel has no IPv6 (EAFNOSUPPORT, or no `/proc/sys/net/ipv6`).
    NoKernelSupport,
    /// IPv6 is switched off (`disable_ipv6`, or the kernel refused an IPv6 address
    /// with EACCES).
    Disabled,
    /// The kernel refused a step for another reason.
    Refused { op: String, error: String },
}

impl std::fmt::Display for Ipv6Off {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ipv6Off::NoKernelSupport => f.write_str("the kernel has no IPv6"),
            Ipv6Off::Disabled => f.write_str("IPv6 is switched off (disable_ipv6)"),
            Ipv6Off::Refused { op, error } => write!(f, "{op} failed: {error}"),
        }
    }
}

impl Ipv6Support {
    pub fn is_on(&self) -> bool {
        matches!(self, Ipv6Support::On)
    }

    /// What a failed IPv6 step (`op`, e.g. "binding the IPv6 UDP socket") says about
    /// the host.
    pub fn from_error(op: &str, e: &io::Error) -> Ipv6Support {
        Ipv6Support::Off(match classify(e) {
            Some(off) => off,
            None => Ipv6Off::Refused {
                op: op.to_string(),
                error: e.to_string(),
            },
        })
    }

    /// Runs an IPv6 set-up step unless IPv6 is already known to be off; a failure turns
    /// it off. Returns what the step made, if it ran and succeeded.
    pub fn attempt<T>(&mut self, op: &str, step: impl FnOnce() -> io::Result<T>) -> Option<T> {
        if !self.is_on() {
            return None;
        }
        match step() {
            Ok(t) => Some(t),
            Err(e) => {
                *self = Ipv6Support::from_error(op, &e);
                None
            }
        }
    }
}

/// The errors that mean "this host has no usable IPv6", as opposed to a step failing.
#[cfg(unix)]
fn classify(e: &io::Error) -> Option<Ipv6Off> {
    use nix::errno::Errno;
    match Errno::from_raw(e.raw_os_error()?) {
        Errno::EAFNOSUPPORT | Errno::EPROTONOSUPPORT => Some(Ipv6Off::NoKernelSupport),
        // What the kernel answers an IPv6 address on an interface where IPv6 is off.
        Errno::EACCES | Errno::EADDRNOTAVAIL => Some(Ipv6Off::Disabled),
        _ => None,
    }
}

#[cfg(not(unix))]
fn classify(e: &io::Error) -> Option<Ipv6Off> {
    // WSAEAFNOSUPPORT, WSAEPROTONOSUPPORT.
    match e.raw_os_error()? {
        10047 | 10043 => Some(Ipv6Off::NoKernelSupport),
        _ => None,
    }
}

/// What the host's settings say before anything is tried (Linux: the sysctls; elsewhere
/// IPv6 is assumed on until a step fails).
pub fn probe_host() -> Ipv6Support {
    #[cfg(target_os = "linux")]
    {
        let read = |name: &str| {
            std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6")).ok()
        };
        if !std::path::Path::new("/proc/sys/net/ipv6").exists() {
            return Ipv6Support::Off(Ipv6Off::NoKernelSupport);
        }
        // `all` switches every interface off; `default` is what a new interface (our
        // TUN device) starts with.
        for name in ["all", "default"] {
            if read(name).is_some_and(|v| v.trim() == "1") {
                return Ipv6Support::Off(Ipv6Off::Disabled);
            }
        }
    }
    Ipv6Support::On
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn os_error(e: nix::errno::Errno) -> io::Error {
        io::Error::from_raw_os_error(e as i32)
    }

    /// A kernel without IPv6: the socket call fails with EAFNOSUPPORT, nothing after it
    /// is tried, and IPv4 goes on.
    #[cfg(unix)]
    #[test]
    fn a_kernel_without_ipv6_turns_it_off_at_the_socket_and_skips_the_rest() {
        use nix::errno::Errno;
        let mut v6 = Ipv6Support::On;
        let sock: Option<()> = v6.attempt("binding the IPv6 UDP socket", || {
            Err(os_error(Errno::EAFNOSUPPORT))
        });
        assert!(sock.is_none());
        assert_eq!(v6, Ipv6Support::Off(Ipv6Off::NoKernelSupport));
        let mut tried = false;
        let addr: Option<()> = v6.attempt("adding the tunnel's IPv6 address", || {
            tried = true;
            Ok(())
        });
        assert!(addr.is_none() && !tried, "a step ran although IPv6 is off");
    }

    /// A kernel with IPv6 that refuses the address (EAFNOSUPPORT from the address call,
    /// or EACCES where IPv6 is switched off).
    #[cfg(unix)]
    #[test]
    fn the_address_call_failing_turns_ipv6_off_with_the_right_reason() {
        use nix::errno::Errno;
        for (errno, want) in [
            (Errno::EAFNOSUPPORT, Ipv6Off::NoKernelSupport),
            (Errno::EACCES, Ipv6Off::Disabled),
            (Errno::EADDRNOTAVAIL, Ipv6Off::Disabled),
        ] {
            let mut v6 = Ipv6Support::On;
            assert_eq!(v6.attempt("binding", || Ok(7)), Some(7));
            let r: Option<()> = v6.attempt("adding the address", || Err(os_error(errno)));
            assert!(r.is_none());
            assert_eq!(v6, Ipv6Support::Off(want), "{errno}");
        }
    }

    /// Any other refusal still leaves IPv4 running, and says which step and errno.
    #[cfg(unix)]
    #[test]
    fn another_refusal_names_the_step_and_the_error() {
        let mut v6 = Ipv6Support::On;
        let r: Option<()> = v6.attempt("adding the tunnel address fd7a::1/48 to agentd0", || {
            Err(os_error(nix::errno::Errno::EBUSY))
        });
        assert!(r.is_none());
        let Ipv6Support::Off(off) = v6 else {
            panic!("still on")
        };
        let text = off.to_string();
        assert!(
            text.contains("fd7a::1/48 to agentd0") && text.contains("busy"),
            "{text}"
        );
    }

    #[test]
    fn reasons_read_as_a_person_would_say_them() {
        assert_eq!(
            Ipv6Off::Disabled.to_string(),
            "IPv6 is switched off (disable_ipv6)"
        );
        assert_eq!(
            Ipv6Off::NoKernelSupport.to_string(),
            "the kernel has no IPv6"
        );
    }
}
