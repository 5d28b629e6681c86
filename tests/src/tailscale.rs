//! Tailscale's own programs as lab peers (pinned versions built by `.ci/run` into a cache
//! outside the repository): `tailscaled` in userspace-networking mode with its state in
//! memory, one per namespace, and Headscale as a control server. The binaries are looked
//! up in `$AGENTD_TAILSCALE_BIN`, else `~/.cache/agentd-interop/bin`; without them the
//! tests skip on a developer machine and fail under `CI=true` (see [`testkit::interop`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{LabError, Result};
use crate::scenario::{Control, Region};
use crate::{ChildGuard, Host, Lab};

/// A Tailscale program, if it is here.
pub fn tool(name: &str) -> Option<PathBuf> {
    testkit::interop::tool(name)
}

/// Whether tailscaled and its CLI are here.
pub fn have_tailscaled() -> bool {
    tool("tailscaled").is_some() && tool("tailscale").is_some()
}

fn missing(name: &str) -> LabError {
    LabError::Unavailable(format!("{name} is not built (run .ci/run --deps-only)"))
}

/// A tailscaled in a lab host, logged in to a control server.
#[derive(Debug)]
pub struct Tailscaled {
    pub host: Host,
    pub ip: Ipv4Addr,
    cli: PathBuf,
    socket: String,
    _daemon: ChildGuard,
}

impl Tailscaled {
    /// Starts tailscaled in `host` and logs it in to `control` with its pre-auth key.
    pub fn start(lab: &Lab, host: &Host, name: &str, control: &Control) -> Result<Tailscaled> {
        Self::start_with_key(lab, host, name, &control.url, &control.auth_key)
    }

    /// Starts tailscaled in `host` and logs it in to `url` with `key`.
    pub fn start_with_key(
        lab: &Lab,
        host: &Host,
        name: &str,
        url: &str,
        key: &str,
    ) -> Result<Tailscaled> {
        let daemon_bin = tool("tailscaled").ok_or_else(|| missing("tailscaled"))?;
        let cli = tool("tailscale").ok_or_else(|| missing("tailscale"))?;
        let dir = lab.log_dir().join(format!("{name}-tailscaled"));
        std::fs::create_dir_all(&dir)
            .map_err(|e| LabError::io(format!("creating {}", dir.display()), e))?;
        let socket = dir.join("tailscaled.sock").display().to_string();
        let daemon = lab.spawn(
            host,
            daemon_bin,
            [
                "--tun=userspace-networking".to_string(),
                "--state=mem:".to_string(),
                format!("--statedir={}", dir.display()),
                format!("--socket={socket}"),
                "--port=41641".to_string(),
                "--no-logs-no-support".to_string(),
            ],
        )?;
        let t0 = Instant::now();
        while !Path::new(&socket).exists() {
            if t0.elapsed() > Duration::from_secs(20) {
                return Err(LabError::Timeout("tailscaled did not start".into()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = lab.exec(
            host,
            &cli,
            [
                format!("--socket={socket}"),
                "up".into(),
                format!("--login-server={url}"),
                format!("--auth-key={key}"),
                format!("--hostname={name}"),
                "--accept-dns=false".into(),
                "--timeout=30s".into(),
            ],
        )?;
        if !out.status.success() {
            return Err(LabError::Invalid(format!(
                "tailscale up: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let ip = lab.exec_ok(
            host,
            &cli,
            [format!("--socket={socket}"), "ip".into(), "-4".into()],
        )?;
        let ip = ip
            .trim()
            .parse()
            .map_err(|_| LabError::Invalid(format!("tailscale ip -4 printed {ip:?}")))?;
        Ok(Tailscaled {
            host: host.clone(),
            cli,
            socket,
            ip,
            _daemon: daemon,
        })
    }

    /// Runs `tailscale ARGS`; returns (success, stdout + stderr).
    pub fn run(&self, lab: &Lab, args: &[&str]) -> Result<(bool, String)> {
        let mut all = vec![format!("--socket={}", self.socket)];
        all.extend(args.iter().map(|s| s.to_string()));
        let out = lab.exec(&self.host, &self.cli, all)?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        ))
    }

    /// The host names `tailscale status --json` lists as peers.
    pub fn peer_names(&self, lab: &Lab) -> Result<Vec<String>> {
        let (ok, out) = self.run(lab, &["status", "--json"])?;
        if !ok {
            return Err(LabError::Invalid(format!("tailscale status --json: {out}")));
        }
        let status: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| LabError::Invalid(format!("tailscale status --json: {e}: {out}")))?;
        Ok(status["Peer"]
            .as_object()
            .map(|peers| {
                peers
                    .values()
                    .filter_map(|p| p["HostName"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// `tailscale ping` until a direct pong (at most 20 pings); (whether one came, output).
    pub fn ping_until_direct(&self, lab: &Lab, ip: Ipv4Addr) -> Result<(bool, String)> {
        self.run(
            lab,
            &["ping", "--c", "20", "--timeout", "3s", &ip.to_string()],
        )
    }
}

/// A running Headscale with its CLI, as a [`Control`] (its `auth_key` is a reusable key
/// of the user `lab`).
#[derive(Debug)]
pub struct Headscale {
    pub control: Control,
    bin: PathBuf,
    config: String,
}

impl Headscale {
    /// Starts Headscale on a new internet server with `region` as its relay map, and the
    /// policy file `policy` (Headscale's file mode) if given. None when Headscale is not
    /// built here (skip; `tool` fails the test under CI=true).
    pub fn start(lab: &Lab, region: &Region, policy: Option<&Path>) -> Result<Option<Headscale>> {
        let Some(bin) = tool("headscale") else {
            return Ok(None);
        };
        let host = lab.add_server("headscale")?;
        let dir = lab.log_dir().join("headscale");
        std::fs::create_dir_all(&dir)
            .map_err(|e| LabError::io(format!("creating {}", dir.display()), e))?;
        let ip = host.ip;
        let config = testkit::interop::HeadscaleConfig {
            dir: &dir,
            ip: ip.into(),
            port: 8080,
            metrics_port: 9090,
            grpc_port: 50443,
            region: (region.id, &format!("relay{}", region.id), region.host.ip),
            policy,
        }
        .write()
        .map_err(|e| LabError::io("writing Headscale's config", e))?;
        let config = config.display().to_string();
        let server = lab.spawn(&host, &bin, ["serve", "-c", &config])?;
        let mut hs = Headscale {
            control: Control {
                host,
                url: format!("http://{}", SocketAddr::from((ip, 8080))),
                db: dir.join("db.sqlite"),
                auth_key: String::new(),
                server,
            },
            bin,
            config,
        };
        // The CLI works once the server listens on its socket.
        let t0 = Instant::now();
        while hs.cli(lab, &["users", "list"]).is_err() {
            if t0.elapsed() > Duration::from_secs(30) {
                return Err(LabError::Timeout("headscale did not start".into()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        hs.control.auth_key = hs.user_key(lab, "lab")?;
        Ok(Some(hs))
    }

    /// Runs the Headscale CLI with JSON output.
    pub fn cli(&self, lab: &Lab, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["-c", self.config.as_str(), "-o", "json"];
        all.extend_from_slice(args);
        let out = lab.exec_ok(&self.control.host, &self.bin, all)?;
        serde_json::from_str(&out).map_err(|e| {
            LabError::Invalid(format!("headscale {args:?} printed non-JSON ({e}): {out}"))
        })
    }

    /// Creates user `user` and a reusable pre-auth key for it; returns the key.
    pub fn user_key(&self, lab: &Lab, user: &str) -> Result<String> {
        let u = self.cli(lab, &["users", "create", user])?;
        let id = u["id"]
            .as_u64()
            .ok_or_else(|| LabError::Invalid(format!("headscale users create: {u}")))?
            .to_string();
        let key = self.cli(lab, &["preauthkeys", "create", "--user", &id, "--reusable"])?;
        key["key"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| LabError::Invalid(format!("headscale preauthkeys create: {key}")))
    }
}
