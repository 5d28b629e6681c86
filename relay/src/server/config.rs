//! relayd's settings: command-line flags, the same keys in an optional TOML file (flags
//! win), and their translation into a [`ServerConfig`]. Also the server key file.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Parser;
use proto::{MeshKey, NodePrivate};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use super::{RateLimit, ServerConfig, VerifyConfig};
use crate::client::tls::{TlsSettings, TlsVerify};
use crate::client::RelayTarget;

/// relayd: a DERP relay server for agentd and Tailscale clients.
///
/// Forwards encrypted packets between devices that cannot reach each other directly,
/// answers STUN, and meshes with the other relays of its region. Every flag can also be
/// set in a TOML file given with --config (same names, without the leading dashes);
/// flags override the file.
#[derive(Parser, Debug, Default, Clone, Deserialize, Serialize)]
#[command(name = "relayd", version, about, long_about = None)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Args {
    /// TOML file with settings (keys are the flag names, e.g. `listen = "[::]:443"`).
    #[arg(long, short = 'c', value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Address for DERP and HTTP(S). [default: [::]:443, or 127.0.0.1:3340 with --dev]
    #[arg(long, short = 'a', value_name = "ADDR")]
    pub listen: Option<String>,

    /// Development mode: plain HTTP (no TLS), loopback defaults, throwaway key.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub dev: Option<bool>,

    /// TLS certificate chain (PEM). Required unless --dev.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM) for --tls-cert.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// File holding this server's private key; created (mode 0600) if missing.
    /// [default: /var/lib/relayd/relayd.key; with --dev a new key each start]
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,

    /// Host name shown on the home page.
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,

    /// Run the STUN server. [default: true]
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub stun: Option<bool>,

    /// UDP address of the STUN server. [default: [::]:3478, or 127.0.0.1:3478 with --dev]
    #[arg(long, value_name = "ADDR")]
    pub stun_listen: Option<String>,

    /// Other relays of this region to mesh with: `host[:port]` or URLs, comma separated.
    /// `host/dial-ip` dials dial-ip but verifies TLS for host.
    #[arg(long, value_delimiter = ',', value_name = "HOSTS")]
    pub mesh_with: Option<Vec<String>>,

    /// File with the region's mesh key (64 hex characters), shared by all its relays.
    #[arg(long, value_name = "FILE")]
    pub mesh_psk_file: Option<PathBuf>,

    /// Extra CA certificate (PEM) trusted for mesh peers (a private CA).
    #[arg(long, value_name = "FILE")]
    pub mesh_ca_cert: Option<PathBuf>,

    /// Wait before re-dialling a broken mesh link. [default: 5s]
    #[arg(long, value_name = "DURATION")]
    pub mesh_retry: Option<String>,

    /// URL asked whether a client may connect (Headscale's /verify, or compatible).
    #[arg(long, value_name = "URL")]
    pub verify_client_url: Option<String>,

    /// Admit clients when the verify URL cannot be reached. [default: true]
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub verify_client_url_fail_open: Option<bool>,

    /// How often connected clients are verified again. [default: 60s]
    #[arg(long, value_name = "DURATION")]
    pub verify_interval: Option<String>,

    /// Per-client receive limit in bytes per second; 0 = none. Mesh peers are exempt.
    #[arg(long, value_name = "BYTES")]
    pub client_rate_limit: Option<u64>,

    /// Burst for --client-rate-limit, in bytes (at least 65568). [default: 2 × the rate]
    #[arg(long, value_name = "BYTES")]
    pub client_rate_burst: Option<u64>,

    /// New connections accepted per second; over it they are closed at once. 0 = no limit.
    #[arg(long, value_name = "N")]
    pub accept_connection_limit: Option<f64>,

    /// Burst for --accept-connection-limit. [default: the limit]
    #[arg(long, value_name = "N")]
    pub accept_connection_burst: Option<f64>,

    /// A client whose socket accepts no data for this long is disconnected. [default: 2s]
    #[arg(long, value_name = "DURATION")]
    pub tcp_write_timeout: Option<String>,

    /// Most DERP connections at once. [default: 200000]
    #[arg(long, value_name = "N")]
    pub max_clients: Option<usize>,

    /// Log filter (error, warn, info, debug, trace, or a tracing filter). [default: info]
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
}

macro_rules! merge_fields {
    ($dst:ident, $src:ident, $($f:ident),+) => { $( if $dst.$f.is_none() { $dst.$f = $src.$f; } )+ };
}

impl Args {
    /// Fills every setting not given as a flag from the TOML file named by `--config`.
    pub fn merge_config_file(mut self) -> anyhow::Result<Self> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let file: Args = toml::from_str(&text)
            .with_context(|| format!("config file {} is not valid", path.display()))?;
        merge_fields!(
            self,
            file,
            listen,
            dev,
            tls_cert,
            tls_key,
            key_file,
            hostname,
            stun,
            stun_listen,
            mesh_with,
            mesh_psk_file,
            mesh_ca_cert,
            mesh_retry,
            verify_client_url,
            verify_client_url_fail_open,
            verify_interval,
            client_rate_limit,
            client_rate_burst,
            accept_connection_limit,
            accept_connection_burst,
            tcp_write_timeout,
            max_clients,
            log_level
        );
        Ok(self)
    }

    /// Turns the settings into a server configuration (reads keys and certificates).
    pub fn to_server_config(&self) -> anyhow::Result<ServerConfig> {
        let dev = self.dev.unwrap_or(false);
        let listen = parse_addr(self.listen.as_deref().unwrap_or(if dev {
            "127.0.0.1:3340"
        } else {
            "[::]:443"
        }))
        .context("bad --listen")?;
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(load_tls(cert, key)?),
            (None, None) if dev => None,
            (None, None) => bail!(
                "relayd needs --tls-cert and --tls-key (PEM files), or --dev for plain HTTP during development"
            ),
            _ => bail!("give both --tls-cert and --tls-key"),
        };
        let private_key = match (&self.key_file, dev) {
            (Some(p), _) => load_or_create_key(p)?,
            (None, true) => NodePrivate::generate(),
            (None, false) => load_or_create_key(Path::new("/var/lib/relayd/relayd.key"))?,
        };
        let mut cfg = ServerConfig::new(private_key, listen);
        cfg.tls = tls;
        cfg.hostname = self.hostname.clone().unwrap_or_default();
        if self.stun.unwrap_or(true) {
            let stun = self.stun_listen.as_deref().unwrap_or(if dev {
                "127.0.0.1:3478"
            } else {
                "[::]:3478"
            });
            cfg.stun_listen = Some(parse_addr(stun).context("bad --stun-listen")?);
        }
        if let Some(p) = &self.mesh_psk_file {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read mesh key file {}", p.display()))?;
            let key: MeshKey = text.parse().with_context(|| {
                format!("mesh key file {} must hold 64 hex characters", p.display())
            })?;
            cfg.mesh_key = Some(key);
        } else if let Ok(env) = std::env::var("RELAYD_MESH_KEY") {
            cfg.mesh_key = Some(
                env.parse()
                    .context("RELAYD_MESH_KEY must be 64 hex characters")?,
            );
        }
        let extra_roots = match &self.mesh_ca_cert {
            Some(p) => Some(netbase::tls::load_certs(p)?),
            None => None,
        };
        for entry in self.mesh_with.iter().flatten() {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            cfg.mesh_with
                .push(mesh_target(entry, dev, extra_roots.as_ref())?);
        }
        if !cfg.mesh_with.is_empty() && cfg.mesh_key.is_none() {
            bail!("--mesh-with needs --mesh-psk-file (the region's shared mesh key)");
        }
        if let Some(d) = &self.mesh_retry {
            cfg.mesh_retry = parse_duration(d).context("bad --mesh-retry")?;
        }
        if let Some(url) = &self.verify_client_url {
            cfg.verify = Some(VerifyConfig {
                url: url.clone(),
                fail_open: self.verify_client_url_fail_open.unwrap_or(true),
                interval: parse_duration(self.verify_interval.as_deref().unwrap_or("60s"))
                    .context("bad --verify-interval")?,
                timeout: Duration::from_secs(5),
            });
        }
        if let Some(rate) = self.client_rate_limit.filter(|r| *r > 0) {
            cfg.client_rate = Some(RateLimit {
                per_second: rate as f64,
                burst: self.client_rate_burst.unwrap_or(rate * 2) as f64,
            });
        }
        if let Some(rate) = self.accept_connection_limit.filter(|r| *r > 0.0) {
            cfg.accept_rate = Some(RateLimit {
                per_second: rate,
                burst: self.accept_connection_burst.unwrap_or(rate),
            });
        }
        if let Some(d) = &self.tcp_write_timeout {
            cfg.write_timeout = parse_duration(d).context("bad --tcp-write-timeout")?;
        }
        if let Some(n) = self.max_clients {
            cfg.max_clients = n;
        }
        Ok(cfg)
    }
}

/// `host:port`, `[v6]:port` or `:port` (all interfaces).
pub fn parse_addr(s: &str) -> anyhow::Result<SocketAddr> {
    let s = s.trim();
    if let Some(port) = s.strip_prefix(':') {
        return Ok(SocketAddr::new(
            std::net::Ipv6Addr::UNSPECIFIED.into(),
            port.parse().context("bad port")?,
        ));
    }
    s.to_socket_addrs()
        .with_context(|| format!("cannot resolve {s:?}"))?
        .next()
        .with_context(|| format!("{s:?} has no address"))
}

/// `500ms`, `5s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("bad duration {s:?}"))?;
    if !n.is_finite() || n < 0.0 {
        bail!("bad duration {s:?}");
    }
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => bail!("bad duration unit in {s:?} (use ms, s, m or h)"),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn mesh_target(
    entry: &str,
    dev: bool,
    extra_roots: Option<&Vec<CertificateDer<'static>>>,
) -> anyhow::Result<RelayTarget> {
    let mut target = if entry.contains("://") {
        RelayTarget::parse_url(entry)?
    } else {
        let (host, dial) = match entry.split_once('/') {
            Some((h, d)) => (h, Some(d)),
            None => (entry, None),
        };
        let scheme = if dev { "http" } else { "https" };
        let mut t = RelayTarget::parse_url(&format!("{scheme}://{host}"))?;
        if let Some(d) = dial {
            let ip: std::net::IpAddr = d
                .trim_matches(|c| c == '[' || c == ']')
                .parse()
                .with_context(|| format!("mesh dial address {d:?} must be an IP address"))?;
            t.dial_addrs = vec![SocketAddr::new(ip, t.port)];
            t.resolve = (false, false);
        }
        t
    };
    if let (Some(tls), Some(roots)) = (target.tls.as_mut(), extra_roots) {
        *tls = TlsSettings {
            server_name: tls.server_name.clone(),
            verify: TlsVerify::Roots(roots.clone()),
        };
    }
    Ok(target)
}

/// A TLS server configuration from PEM files.
pub fn load_tls(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    Ok(netbase::tls::load_server_config(cert, key, &[b"http/1.1"])?)
}

/// A TLS server configuration (TLS 1.2+, ring) from a chain and key.
pub fn tls_server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    Ok(netbase::tls::server_config(certs, key, &[b"http/1.1"])?)
}

/// Reads the server key, or creates it (mode 0600, written atomically) if missing.
pub fn load_or_create_key(path: &Path) -> anyhow::Result<NodePrivate> {
    let (key, created) = proto::secretfile::load_or_create(path, NodePrivate::generate)?;
    if created {
        tracing::info!(path = %path.display(), "created a new server key");
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn flags_override_file_and_file_fills_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relayd.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9999\"\ndev = true\nstun = false\nverify-client-url = \"http://127.0.0.1:1/verify\"\nverify-interval = \"10s\"\n",
        )
        .unwrap();
        let args = Args::parse_from([
            "relayd",
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--verify-client-url-fail-open=false",
        ])
        .merge_config_file()
        .unwrap();
        let cfg = args.to_server_config().unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:0".parse().unwrap());
        assert!(cfg.tls.is_none());
        assert!(cfg.stun_listen.is_none());
        let v = cfg.verify.unwrap();
        assert!(!v.fail_open);
        assert_eq!(v.interval, Duration::from_secs(10));
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relayd.toml");
        std::fs::write(&file, "lsten = \"x\"\n").unwrap();
        let err = Args::parse_from(["relayd", "-c", file.to_str().unwrap()])
            .merge_config_file()
            .unwrap_err();
        assert!(format!("{err:#}").contains("lsten"), "{err:#}");
    }

    #[test]
    fn tls_is_required_outside_dev_mode() {
        let err = Args::parse_from(["relayd", "--key-file", "/nonexistent/x"])
            .to_server_config()
            .unwrap_err();
        assert!(err.to_string().contains("--tls-cert"), "{err}");
    }

    #[test]
    fn key_file_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/relayd.key");
        let k1 = load_or_create_key(&path).unwrap();
        let k2 = load_or_create_key(&path).unwrap();
        assert_eq!(k1, k2);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn tls_offers_http1_for_the_derp_upgrade() {
        // Loading and its errors are netbase's (tested there); relayd adds the ALPN.
        let dir = tempfile::tempdir().unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, a.cert.pem()).unwrap();
        std::fs::write(&key, a.key_pair.serialize_pem()).unwrap();
        let c = load_tls(&cert, &key).unwrap();
        assert_eq!(c.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn mesh_entries_parse() {
        let t = mesh_target("derp2.example.com/192.0.2.7", false, None).unwrap();
        assert_eq!(t.host, "derp2.example.com");
        assert_eq!(t.dial_addrs, vec!["192.0.2.7:443".parse().unwrap()]);
        assert!(t.tls.is_some());
        let t = mesh_target("127.0.0.1:3341", true, None).unwrap();
        assert!(t.tls.is_none());
        assert_eq!(t.port, 3341);
    }
}
