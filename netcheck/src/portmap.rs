//! Port mapping: asking the home router to forward a public UDP port to our socket, with
//! UPnP IGD, NAT-PMP or PCP (docs/protocols.md §5). The protocols themselves come from
//! n0's maintained `portmapper` crate (UPnP through igd-next, NAT-PMP and PCP codecs,
//! renewal at half the lease, release on deactivation); this file is the one place that
//! knows that crate, so it can be swapped without touching callers.

use std::net::SocketAddrV4;
use std::num::NonZeroU16;
use std::time::Duration;

use tokio::sync::watch;

/// Which port-mapping services the gateway answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortmapServices {
    pub upnp: bool,
    pub pmp: bool,
    pub pcp: bool,
}

impl PortmapServices {
    pub fn any(&self) -> bool {
        self.upnp || self.pmp || self.pcp
    }
}

impl std::fmt::Display for PortmapServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = [
            (self.upnp, "UPnP"),
            (self.pmp, "NAT-PMP"),
            (self.pcp, "PCP"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join(", "))
        }
    }
}

/// Why a probe gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum PortmapError {
    #[error("port-mapping probe failed: {0}")]
    Probe(String),
    #[error("port-mapping probe took longer than {0:?}")]
    Timeout(Duration),
}

/// A port-mapping client: probes the gateway and keeps one UDP mapping for the local
/// port it is given, renewing it before the lease ends. Dropping it stops renewals;
/// call [`PortMapper::release`] first to delete the mapping on the router.
#[derive(Debug, Clone)]
pub struct PortMapper {
    inner: portmapper::Client,
}

impl Default for PortMapper {
    fn default() -> Self {
        Self::new()
    }
}

impl PortMapper {
    /// Needs a tokio runtime (the crate runs a background service task).
    pub fn new() -> Self {
        PortMapper {
            inner: portmapper::Client::new(portmapper::Config::default()),
        }
    }

    /// Asks the gateway which services it offers.
    pub async fn probe(&self, timeout: Duration) -> Result<PortmapServices, PortmapError> {
        let rx = self.inner.probe();
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(PortmapError::Timeout(timeout)),
            Ok(Err(_)) => Err(PortmapError::Probe("port-mapping service stopped".into())),
            Ok(Ok(Err(e))) => Err(PortmapError::Probe(e.to_string())),
            Ok(Ok(Ok(out))) => Ok(PortmapServices {
                upnp: out.upnp,
                pmp: out.nat_pmp,
                pcp: out.pcp,
            }),
        }
    }

    /// Maps a public port to `local_port` (UDP), replacing any earlier mapping. The
    /// result appears on [`PortMapper::external`].
    pub fn map(&self, local_port: u16) {
        if let Some(p) = NonZeroU16::new(local_port) {
            self.inner.update_local_port(p);
        }
    }

    /// Tries again to get a mapping if there is none (e.g. after a network change).
    pub fn retry(&self) {
        self.inner.procure_mapping();
    }

    /// The public address of the current mapping (`None` while there is none).
    pub fn external(&self) -> watch::Receiver<Option<SocketAddrV4>> {
        self.inner.watch_external_address()
    }

    /// Deletes the mapping on the router and waits (up to `timeout`) until it is gone.
    pub async fn release(&self, timeout: Duration) {
        let mut ext = self.external();
        if ext.borrow().is_none() {
            return;
        }
        self.inner.deactivate();
        let _ = tokio::time::timeout(timeout, async {
            let _ = ext.wait_for(|e| e.is_none()).await;
            // The service handles one message at a time and finishes the release before
            // the next, so the answer to a later probe means the router was told.
            let _ = self.inner.probe().await;
        })
        .await;
    }
}
