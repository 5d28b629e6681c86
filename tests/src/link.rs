//! Emulated links: the lab-side handle of a running `linkemu` (see [`crate::emulator`]).
//!
//! An [`EmuLink`] is a point-to-point layer-3 link between two namespaces with a one-way
//! delay and a loss share per direction, both changeable while traffic flows. Its process
//! belongs to the [`crate::Lab`], which stops it on drop; the handle is a cheap clone.

use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, ChildStdout};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::emulator::PPM;
use crate::error::{IoContext, LabError, Result};

/// Delay and loss of a link, the same in both directions unless set per direction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkParams {
    /// One-way delay.
    pub delay: Duration,
    /// Share of packets dropped, 0.0 ..= 1.0.
    pub loss: f64,
}

impl LinkParams {
    /// A link with one-way `delay` and no loss.
    pub fn delay(delay: Duration) -> Self {
        LinkParams { delay, loss: 0.0 }
    }

    /// A link with one-way delay of `ms` milliseconds and no loss.
    pub fn delay_ms(ms: u64) -> Self {
        LinkParams::delay(Duration::from_millis(ms))
    }

    /// The same link dropping `loss` (0.0 ..= 1.0) of the packets in each direction.
    pub fn with_loss(self, loss: f64) -> Self {
        LinkParams { loss, ..self }
    }

    pub(crate) fn delay_us(&self) -> u64 {
        u64::try_from(self.delay.as_micros()).unwrap_or(u64::MAX)
    }

    pub(crate) fn loss_ppm(&self) -> u32 {
        // Clamped to 0..=1 first, so the cast cannot overflow.
        (self.loss.clamp(0.0, 1.0) * f64::from(PPM)).round() as u32
    }
}

impl Default for LinkParams {
    fn default() -> Self {
        LinkParams::delay(Duration::ZERO)
    }
}

/// Which way along an [`EmuLink`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// From the link's first namespace (`a`) to its second (`b`).
    AtoB,
    /// From `b` to `a`.
    BtoA,
}

/// Counters of one direction of an emulated link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WayStats {
    /// Packets that entered the link.
    pub received: u64,
    /// Packets delivered at the other end.
    pub forwarded: u64,
    /// Packets dropped by the configured loss.
    pub lost: u64,
    /// Packets dropped because the link's queue was full.
    pub overflow: u64,
}

/// Counters of both directions of an emulated link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// From `a` to `b`.
    pub a_to_b: WayStats,
    /// From `b` to `a`.
    pub b_to_a: WayStats,
}

struct Control {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// A running emulated link. Clones share the link.
#[derive(Clone)]
pub struct EmuLink {
    /// Interface name in namespace `a`.
    pub dev_a: String,
    /// Interface name in namespace `b`.
    pub dev_b: String,
    control: Arc<Mutex<Control>>,
}

impl std::fmt::Debug for EmuLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmuLink")
            .field("dev_a", &self.dev_a)
            .field("dev_b", &self.dev_b)
            .finish_non_exhaustive()
    }
}

impl EmuLink {
    pub(crate) fn new(
        dev_a: String,
        dev_b: String,
        stdin: ChildStdin,
        stdout: ChildStdout,
    ) -> Result<Self> {
        let link = EmuLink {
            dev_a,
            dev_b,
            control: Arc::new(Mutex::new(Control {
                stdin,
                stdout: BufReader::new(stdout),
            })),
        };
        let ready = link.read_line()?;
        if ready != "ready" {
            return Err(LabError::Invalid(format!(
                "linkemu did not start (said {ready:?}); see its stderr log"
            )));
        }
        Ok(link)
    }

    fn read_line(&self) -> Result<String> {
        let mut control = self.control.lock().unwrap_or_else(|e| e.into_inner());
        let mut line = String::new();
        control
            .stdout
            .read_line(&mut line)
            .ctx(|| "cannot read from linkemu".to_string())?;
        Ok(line.trim().to_string())
    }

    fn request(&self, line: &str) -> Result<String> {
        let mut control = self.control.lock().unwrap_or_else(|e| e.into_inner());
        writeln!(control.stdin, "{line}")
            .and_then(|()| control.stdin.flush())
            .ctx(|| "cannot write to linkemu (has it exited?)".to_string())?;
        let mut answer = String::new();
        let n = control
            .stdout
            .read_line(&mut answer)
            .ctx(|| "cannot read from linkemu".to_string())?;
        if n == 0 {
            return Err(LabError::Invalid(
                "linkemu exited; see its stderr log".to_string(),
            ));
        }
        Ok(answer.trim().to_string())
    }

    fn set_way(&self, which: &str, params: LinkParams) -> Result<()> {
        let answer = self.request(&format!(
            "set {which} {} {}",
            params.delay_us(),
            params.loss_ppm()
        ))?;
        if answer == "ok" {
            Ok(())
        } else {
            Err(LabError::Invalid(format!("linkemu refused: {answer}")))
        }
    }

    /// Sets delay and loss of both directions; takes effect for the next packet.
    pub fn set(&self, params: LinkParams) -> Result<()> {
        self.set_way("both", params)
    }

    /// Sets delay and loss of one direction.
    pub fn set_one_way(&self, way: Way, params: LinkParams) -> Result<()> {
        self.set_way(
            match way {
                Way::AtoB => "ab",
                Way::BtoA => "ba",
            },
            params,
        )
    }

    /// Sets the one-way delay of both directions, keeping no loss.
    pub fn set_delay(&self, delay: Duration) -> Result<()> {
        self.set(LinkParams::delay(delay))
    }

    /// Reads the link's counters.
    pub fn stats(&self) -> Result<LinkStats> {
        let answer = self.request("stats")?;
        parse_stats(&answer)
            .ok_or_else(|| LabError::Invalid(format!("linkemu sent bad stats {answer:?}")))
    }
}

fn parse_stats(line: &str) -> Option<LinkStats> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let way = |at: usize| -> Option<WayStats> {
        let n = |i: usize| words.get(at + i)?.parse::<u64>().ok();
        Some(WayStats {
            received: n(0)?,
            forwarded: n(1)?,
            lost: n(2)?,
            overflow: n(3)?,
        })
    };
    match (words.first(), words.get(1), words.get(6)) {
        (Some(&"stats"), Some(&"ab"), Some(&"ba")) => Some(LinkStats {
            a_to_b: way(2)?,
            b_to_a: way(7)?,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_convert_to_wire_units() {
        let p = LinkParams::delay_ms(20).with_loss(0.015);
        assert_eq!(p.delay_us(), 20_000);
        assert_eq!(p.loss_ppm(), 15_000);
        assert_eq!(LinkParams::default().with_loss(7.0).loss_ppm(), PPM);
        assert_eq!(LinkParams::default().with_loss(-1.0).loss_ppm(), 0);
    }

    #[test]
    fn stats_line_parses_both_directions() {
        let s = parse_stats("stats ab 1 2 3 4 ba 5 6 7 8").unwrap();
        assert_eq!(s.a_to_b.lost, 3);
        assert_eq!(s.b_to_a.received, 5);
        assert_eq!(s.b_to_a.overflow, 8);
        assert!(parse_stats("stats ab 1 2 3").is_none());
    }
}
