//! The steps of reaching and using a control server, the deadline of each, and the error
//! a missed deadline becomes. What the numbers are (and why) is in [`crate::defaults`];
//! this module only carries them around and names the step that ran out of time.

use std::future::Future;
use std::time::Duration;

use crate::defaults;

/// A step of the control client, as named in errors and in the session's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    TcpConnect,
    Tls,
    FetchKey,
    Upgrade,
    Register,
    LoginWait,
    MapStart,
    LiteUpdate,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::TcpConnect => "connecting to the control server (TCP)",
            Step::Tls => "TLS handshake with the control server",
            Step::FetchKey => "fetching the control key",
            Step::Upgrade => "upgrading to ts2021 (Noise handshake)",
            Step::Register => "registering",
            Step::LoginWait => "waiting for the login to finish",
            Step::MapStart => "starting the map poll",
            Step::LiteUpdate => "sending a lite map update",
        })
    }
}

/// The deadline of each step. `Default` gives the values of [`crate::defaults`]; tests
/// shorten them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    pub tcp_connect: Duration,
    pub tls: Duration,
    pub fetch_key: Duration,
    pub upgrade: Duration,
    pub register: Duration,
    pub login_wait: Duration,
    pub map_start: Duration,
    pub lite_update: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            tcp_connect: defaults::TCP_CONNECT_TIMEOUT,
            tls: defaults::TLS_HANDSHAKE_TIMEOUT,
            fetch_key: defaults::KEY_FETCH_TIMEOUT,
            upgrade: defaults::UPGRADE_TIMEOUT,
            register: defaults::REGISTER_TIMEOUT,
            login_wait: defaults::LOGIN_WAIT_TIMEOUT,
            map_start: defaults::MAP_START_TIMEOUT,
            lite_update: defaults::LITE_UPDATE_TIMEOUT,
        }
    }
}

impl Deadlines {
    /// The deadline of `step`.
    pub fn of(&self, step: Step) -> Duration {
        match step {
            Step::TcpConnect => self.tcp_connect,
            Step::Tls => self.tls,
            Step::FetchKey => self.fetch_key,
            Step::Upgrade => self.upgrade,
            Step::Register => self.register,
            Step::LoginWait => self.login_wait,
            Step::MapStart => self.map_start,
            Step::LiteUpdate => self.lite_update,
        }
    }

    /// Runs `fut` under the deadline of `step`.
    pub async fn run<T>(&self, step: Step, fut: impl Future<Output = T>) -> Result<T, TimedOut> {
        let after = self.of(step);
        tokio::time::timeout(after, fut)
            .await
            .map_err(|_| TimedOut { step, after })
    }
}

/// A step that did not finish within its deadline, e.g. "fetching the control key: timed
/// out after 10 s".
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{step}: timed out after {}", Secs(*after))]
pub struct TimedOut {
    pub step: Step,
    pub after: Duration,
}

/// A duration as a person reads it: "10 s", "1.5 s", "250 ms".
struct Secs(Duration);

impl std::fmt::Display for Secs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.0.as_millis();
        if ms < 1000 {
            write!(f, "{ms} ms")
        } else if ms.is_multiple_of(1000) {
            write!(f, "{} s", ms / 1000)
        } else {
            write!(f, "{:.1} s", self.0.as_secs_f64())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_name_the_step_and_the_time() {
        let t = TimedOut {
            step: Step::FetchKey,
            after: Duration::from_secs(10),
        };
        assert_eq!(
            t.to_string(),
            "fetching the control key: timed out after 10 s"
        );
        let t = TimedOut {
            step: Step::LiteUpdate,
            after: Duration::from_millis(250),
        };
        assert_eq!(
            t.to_string(),
            "sending a lite map update: timed out after 250 ms"
        );
        let t = TimedOut {
            step: Step::Register,
            after: Duration::from_millis(1500),
        };
        assert_eq!(t.to_string(), "registering: timed out after 1.5 s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_that_never_finishes_times_out_at_its_deadline() {
        let d = Deadlines::default();
        let start = tokio::time::Instant::now();
        let r = d.run(Step::Upgrade, std::future::pending::<()>()).await;
        assert_eq!(
            r,
            Err(TimedOut {
                step: Step::Upgrade,
                after: defaults::UPGRADE_TIMEOUT
            })
        );
        assert_eq!(start.elapsed(), defaults::UPGRADE_TIMEOUT);
        assert_eq!(d.run(Step::Register, async { 7 }).await, Ok(7));
    }
}
