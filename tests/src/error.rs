//! The lab's error type: what went wrong while building or driving a network lab.
//!
//! [`LabError::Unavailable`] is the one a test acts on: it means this machine cannot host a lab
//! (not root, no `ip`, namespaces refused), and [`crate::lab_or_skip!`] turns it into a skip
//! locally and a failure under `CI=true`. Every other variant is a bug in the lab or the test.

use std::io;

/// Result alias for lab operations.
pub type Result<T, E = LabError> = std::result::Result<T, E>;

/// What went wrong in the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// This machine cannot host the lab (needs root, iproute2, nftables, network namespaces).
    #[error("network lab unavailable: {0}")]
    Unavailable(String),
    /// A command the lab ran (ip, nft, …) failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line, for the reader.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// An I/O error, with what the lab was doing.
    #[error("{context}: {source}")]
    Io {
        /// What the lab was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Something did not happen in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The lab was asked for something it cannot do (bad name, address pool exhausted, …).
    #[error("{0}")]
    Invalid(String),
}

impl LabError {
    /// Wraps an I/O error with what the lab was doing.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        LabError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Adds context to I/O results.
pub(crate) trait IoContext<T> {
    /// Turns an `io::Error` into a [`LabError::Io`] saying what was being done.
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| LabError::io(context(), e))
    }
}
