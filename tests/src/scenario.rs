//! Building blocks of end-to-end scenarios: relay regions (the real `relayd` with a
//! self-signed certificate, STUN and HTTPS), the relay map that lists them, a `controld`
//! with a user and a pre-auth key, and `agentd` devices joining it.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{LabError, Result};
use crate::lab::{Host, Lab};
use crate::link::LinkParams;
use crate::process::{self, ChildGuard};

fn write(path: impl AsRef<Path>, data: impl AsRef<[u8]>) -> Result<()> {
    let path = path.as_ref();
    std::fs::write(path, data).map_err(|e| LabError::io(format!("writing {}", path.display()), e))
}

/// One relay region: a single relayd on its own server (HTTPS on 443, STUN on 3478).
#[derive(Debug)]
pub struct Region {
    pub id: i32,
    pub host: Host,
    pub relayd: ChildGuard,
}

/// A self-signed certificate for `names` (host names or IP addresses) written to the
/// lab's folder as `<file>.crt` and `<file>.key`; returns both paths.
pub fn write_cert(lab: &Lab, file: &str, names: &[String]) -> Result<(PathBuf, PathBuf)> {
    let ck = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| LabError::Invalid(format!("certificate: {e}")))?;
    let dir = lab.log_dir();
    let cert = dir.join(format!("{file}.crt"));
    let key = dir.join(format!("{file}.key"));
    write(&cert, ck.cert.pem())?;
    write(&key, ck.key_pair.serialize_pem())?;
    Ok((cert, key))
}

/// Starts relayd on `host`, with a fresh self-signed certificate.
pub fn start_relayd(lab: &Lab, host: &Host, name: &str) -> Result<ChildGuard> {
    let (cert, key) = write_cert(lab, name, &[name.to_string()])?;
    start_relayd_with(lab, host, name, &cert, &key, &[])
}

/// Starts relayd on `host` (HTTPS on 443, STUN on 3478) with the given certificate and
/// extra flags (mesh settings, say).
pub fn start_relayd_with(
    lab: &Lab,
    host: &Host,
    name: &str,
    cert: &Path,
    key: &Path,
    extra: &[String],
) -> Result<ChildGuard> {
    let dir = lab.log_dir().to_path_buf();
    // A host with IPv6 gets dual-stack listeners (relayd's own defaults): IPv4 clients
    // arrive there as ::ffff:a.b.c.d.
    let any = |port: u16| match host.ip6 {
        Some(_) => format!("[::]:{port}"),
        None => format!("{}:{port}", host.ip),
    };
    let mut args = vec![
        "--listen".to_string(),
        any(443),
        "--stun-listen".to_string(),
        any(3478),
        "--tls-cert".to_string(),
        cert.display().to_string(),
        "--tls-key".to_string(),
        key.display().to_string(),
        "--hostname".to_string(),
        name.to_string(),
        "--key-file".to_string(),
        dir.join(format!("{name}.relaykey")).display().to_string(),
    ];
    args.extend(extra.iter().cloned());
    let mut relayd = lab.spawn(host, process::relayd()?, args)?;
    relayd.wait_for_output("STUN listening", Duration::from_secs(20))?;
    Ok(relayd)
}

/// A region `id` on a server whose link has `one_way_delay_ms` each way (0: plain veth).
pub fn start_region(lab: &Lab, id: i32, one_way_delay_ms: u64) -> Result<Region> {
    let name = format!("relay{id}");
    let host = if one_way_delay_ms > 0 {
        lab.add_server_with_link(&name, LinkParams::delay_ms(one_way_delay_ms))?
    } else {
        lab.add_server(&name)?
    };
    let relayd = start_relayd(lab, &host, &name)?;
    Ok(Region { id, host, relayd })
}

/// A region `id` on a server with IPv6 too (plain veth): relayd listens dual-stack and
/// the relay map lists both addresses.
pub fn start_region_v6(lab: &Lab, id: i32) -> Result<Region> {
    let name = format!("relay{id}");
    let host = lab.add_server_with_ipv6(&name)?;
    let relayd = start_relayd(lab, &host, &name)?;
    Ok(Region { id, host, relayd })
}

/// The relay-map JSON node for a relay on `ip` (and `ip6`).
fn node_json(
    region: i32,
    suffix: &str,
    ip: Ipv4Addr,
    ip6: Option<std::net::Ipv6Addr>,
) -> serde_json::Value {
    serde_json::json!({
        "Name": format!("{region}{suffix}"),
        "RegionID": region,
        "HostName": format!("relay{region}"),
        "IPv4": ip.to_string(),
        "IPv6": ip6.map_or_else(|| "none".to_string(), |a| a.to_string()),
        "InsecureForTests": true,
    })
}

/// Writes a relay map listing `regions` (each with one node, or several: `extra` adds
/// more nodes to a region) into the lab's folder and returns its path.
pub fn write_relay_map(
    lab: &Lab,
    regions: &[&Region],
    extra: &[(i32, Ipv4Addr)],
) -> Result<PathBuf> {
    let mut map = serde_json::Map::new();
    for r in regions {
        let mut nodes = vec![node_json(r.id, "a", r.host.ip, r.host.ip6)];
        for (i, (id, ip)) in extra.iter().filter(|(id, _)| *id == r.id).enumerate() {
            let suffix = ((b'b' + i as u8) as char).to_string();
            nodes.push(node_json(*id, &suffix, *ip, None));
        }
        map.insert(
            r.id.to_string(),
            serde_json::json!({
                "RegionID": r.id,
                "RegionCode": format!("r{}", r.id),
                "RegionName": format!("Region {}", r.id),
                "Nodes": nodes,
            }),
        );
    }
    let path = lab.log_dir().join("relaymap.json");
    write(&path, serde_json::json!({ "Regions": map }).to_string())?;
    Ok(path)
}

/// A running controld with one user and a reusable pre-auth key.
#[derive(Debug)]
pub struct Control {
    pub host: Host,
    pub url: String,
    pub db: PathBuf,
    pub auth_key: String,
    pub server: ChildGuard,
}

fn controld_cli(lab: &Lab, host: &Host, db: &Path, args: &[&str]) -> Result<String> {
    let mut all = vec!["--db".to_string(), db.display().to_string()];
    all.extend(args.iter().map(|s| s.to_string()));
    lab.exec_ok(host, process::controld()?, all)
}

/// Starts controld (plain HTTP on port 8080) on a new internet server, serving `map`.
pub fn start_control(lab: &Lab, map: &Path) -> Result<Control> {
    start_control_with(lab, map, &[])
}

/// [`start_control`] with more `controld serve` flags (`--policy FILE`).
pub fn start_control_with(lab: &Lab, map: &Path, extra: &[&str]) -> Result<Control> {
    start_control_named(lab, "control", map, extra)
}

/// [`start_control_with`] on a server named `name` (a second controld in one lab).
pub fn start_control_named(lab: &Lab, name: &str, map: &Path, extra: &[&str]) -> Result<Control> {
    let host = lab.add_server(name)?;
    let db = lab.log_dir().join(format!("{name}-controld.db"));
    controld_cli(lab, &host, &db, &["users", "create", "lab"])?;
    let auth_key = controld_cli(
        lab,
        &host,
        &db,
        &[
            "keys",
            "create",
            "--user",
            "lab",
            "--reusable",
            "--expiration",
            "1h",
        ],
    )?
    .trim()
    .to_string();
    let listen = SocketAddr::from((host.ip, 8080));
    let mut server = lab.spawn(
        &host,
        process::controld()?,
        [
            "--db".to_string(),
            db.display().to_string(),
            "serve".to_string(),
            "--dev".to_string(),
            "--listen".to_string(),
            listen.to_string(),
            "--relay-map".to_string(),
            map.display().to_string(),
        ]
        .into_iter()
        .chain(extra.iter().map(|s| s.to_string())),
    )?;
    server.wait_for_output("listening", Duration::from_secs(20))?;
    Ok(Control {
        url: format!("http://{listen}"),
        host,
        db,
        auth_key,
        server,
    })
}

impl Control {
    /// Runs a controld admin command (`users …`, `keys …`, `nodes …`) on its database.
    pub fn cli(&self, lab: &Lab, args: &[&str]) -> Result<String> {
        controld_cli(lab, &self.host, &self.db, args)
    }

    /// Creates user `user` and a reusable pre-auth key for it (with `tags`, if any);
    /// returns the key.
    pub fn user_key(&self, lab: &Lab, user: &str, tags: &[&str]) -> Result<String> {
        if !self
            .cli(lab, &["users", "list"])?
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(user))
        {
            self.cli(lab, &["users", "create", user])?;
        }
        let tags = tags.join(",");
        let mut args = vec![
            "keys",
            "create",
            "--user",
            user,
            "--reusable",
            "--expiration",
            "1h",
        ];
        if !tags.is_empty() {
            args.extend(["--tags", tags.as_str()]);
        }
        Ok(self.cli(lab, &args)?.trim().to_string())
    }

    /// The ID of the node named `name` (from `controld nodes list`).
    pub fn node_id(&self, lab: &Lab, name: &str) -> Result<String> {
        let list = self.cli(lab, &["nodes", "list"])?;
        list.lines()
            .find(|l| {
                l.split_whitespace()
                    .any(|w| w == name || w.starts_with(&format!("{name}.")))
            })
            .and_then(|l| l.split_whitespace().next())
            .map(str::to_string)
            .ok_or_else(|| LabError::Invalid(format!("no node {name} in:\n{list}")))
    }
}

/// A running agentd.
#[derive(Debug)]
pub struct Device {
    pub name: String,
    pub host: Host,
    pub agentd: ChildGuard,
    /// Its tunnel address, once known.
    pub ip: Ipv4Addr,
    /// Its local API socket.
    pub socket: PathBuf,
}

impl Device {
    /// Runs `agentctl ARGS` against this device's agentd; returns (success, stdout, stderr).
    pub fn agentctl(&self, lab: &Lab, args: &[&str]) -> Result<(bool, String, String)> {
        let mut all = vec!["--socket".to_string(), self.socket.display().to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        let out = lab.exec(&self.host, process::agentctl()?, all)?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Polls `agentctl status --json` (every 100 ms, up to `within`) until the entry of
    /// the peer named `name` satisfies `ok`; returns that entry.
    pub fn wait_peer(
        &self,
        lab: &Lab,
        name: &str,
        within: Duration,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let t0 = Instant::now();
        loop {
            if let Some(p) = self.peer(lab, name)?.filter(|p| ok(p)) {
                return Ok(p);
            }
            if t0.elapsed() >= within {
                return Err(LabError::Timeout(format!(
                    "{name} never matched within {within:?} in {}'s status:\n{:#}",
                    self.name,
                    self.status(lab)?
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The entry for the peer whose name starts with `name` in `agentctl status --json`.
    pub fn peer(&self, lab: &Lab, name: &str) -> Result<Option<serde_json::Value>> {
        let s = self.status(lab)?;
        Ok(s["peers"].as_array().and_then(|ps| {
            ps.iter()
                .find(|p| p["name"].as_str().is_some_and(|n| n.starts_with(name)))
                .cloned()
        }))
    }

    /// `agentctl status --json`, parsed.
    pub fn status(&self, lab: &Lab) -> Result<serde_json::Value> {
        let (ok, out, err) = self.agentctl(lab, &["status", "--json"])?;
        if !ok {
            return Err(LabError::Invalid(format!("agentctl status failed: {err}")));
        }
        serde_json::from_str(&out).map_err(|e| {
            LabError::Invalid(format!(
                "agentctl status --json printed non-JSON ({e}):\n{out}"
            ))
        })
    }
}

/// Starts `agentd up` on `host` and waits until its TUN device is up; returns the
/// device with its 100.x address.
pub fn start_agentd(lab: &Lab, host: &Host, name: &str, control: &Control) -> Result<Device> {
    start_agentd_with_key(lab, host, name, &control.url, &control.auth_key)
}

/// [`start_agentd`] against `url` with the pre-auth key `key`.
pub fn start_agentd_with_key(
    lab: &Lab,
    host: &Host,
    name: &str,
    url: &str,
    key: &str,
) -> Result<Device> {
    let mut dev = spawn_agentd(lab, host, name, url, Some(key))?;
    let out = dev
        .agentd
        .wait_for_output("TUN device up", Duration::from_secs(20))?;
    dev.ip = out
        .lines()
        .find(|l| l.contains("TUN device up"))
        .and_then(|l| l.split("v4=Some(").nth(1))
        .and_then(|s| s.split(')').next())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| LabError::Invalid(format!("no tunnel address in agentd's log:\n{out}")))?;
    Ok(dev)
}

impl Device {
    /// Starts `agentd up --login-server URL` without a key and waits only for its local
    /// API: for a control server that will not let it in. Its `ip` is unspecified.
    pub fn start_unregistered(lab: &Lab, host: &Host, name: &str, url: &str) -> Result<Device> {
        let mut dev = spawn_agentd(lab, host, name, url, None)?;
        dev.agentd
            .wait_for_output("local API listening", Duration::from_secs(20))?;
        Ok(dev)
    }
}

/// Starts `agentd up` on `host` against `url`, with the pre-auth key (if any) in a file,
/// as the README says to run agentd: on the command line every local user could read it.
fn spawn_agentd(
    lab: &Lab,
    host: &Host,
    name: &str,
    url: &str,
    auth_key: Option<&str>,
) -> Result<Device> {
    let state = lab.log_dir().join(format!("{name}-state"));
    let socket = lab.log_dir().join(format!("{name}.sock"));
    let mut args = vec![
        "up".to_string(),
        "--login-server".to_string(),
        url.to_string(),
        "--hostname".to_string(),
        name.to_string(),
        "--state-dir".to_string(),
        state.display().to_string(),
        "--socket".to_string(),
        socket.display().to_string(),
        "--log-level".to_string(),
        "info,agent=debug".to_string(),
    ];
    if let Some(key) = auth_key {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let key_file = lab.log_dir().join(format!("{name}-auth-key"));
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key_file)
            .and_then(|mut f| f.write_all(key.as_bytes()))
            .map_err(|e| LabError::io(format!("writing {}", key_file.display()), e))?;
        args.push("--auth-key-file".to_string());
        args.push(key_file.display().to_string());
    }
    let agentd = lab.spawn(host, process::agentd()?, args)?;
    Ok(Device {
        name: name.to_string(),
        host: host.clone(),
        agentd,
        ip: Ipv4Addr::UNSPECIFIED,
        socket,
    })
}

/// Pings `to` from `from` once, waiting up to `wait`; returns the round trip.
pub fn ping_once(lab: &Lab, from: &Host, to: Ipv4Addr, wait: Duration) -> Option<Duration> {
    let secs = wait.as_secs().max(1).to_string();
    let start = Instant::now();
    let out = lab
        .exec(
            from,
            "ping",
            ["-c", "1", "-W", &secs, "-n", &to.to_string()],
        )
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("time=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|ms| ms.parse::<f64>().ok())
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .or(Some(start.elapsed()))
}

/// Pings `to` from `from` until the first answer (each try waits up to a second); returns
/// how long that took, or fails after `within`.
pub fn wait_for_ping(lab: &Lab, from: &Host, to: Ipv4Addr, within: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if ping_once(lab, from, to, Duration::from_secs(1)).is_some() {
            return Ok(t0.elapsed());
        }
    }
    Err(LabError::Timeout(format!(
        "{} could not ping {to} within {within:?}",
        from.node.name()
    )))
}

/// `relayd` flags that mesh a node with `other` (its name and address), under the shared
/// key in `psk`, trusting the region's certificate `ca`.
pub fn mesh_flags(other: &str, ip: Ipv4Addr, psk: &Path, ca: &Path) -> Vec<String> {
    vec![
        "--mesh-with".into(),
        format!("{other}/{ip}"),
        "--mesh-psk-file".into(),
        psk.display().to_string(),
        "--mesh-ca-cert".into(),
        ca.display().to_string(),
    ]
}

/// Relay region 901 (10 ms away) and a controld serving it: the smallest world agentd
/// can run in.
pub fn one_region_and_control(lab: &Lab) -> Result<(Region, Control)> {
    let region = start_region(lab, 901, 10)?;
    let map = write_relay_map(lab, &[&region], &[])?;
    let control = start_control(lab, &map)?;
    Ok((region, control))
}
