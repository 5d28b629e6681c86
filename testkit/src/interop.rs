//! Where the interop suite finds its peers: Tailscale's and Headscale's programs, built by
//! `.ci/run` with `go install` into a cache outside the repository.

use std::path::PathBuf;

/// The program `name` from `$AGENTD_TAILSCALE_BIN`, else `~/.cache/agentd-interop/bin`.
/// `None` (the caller skips, saying so) on a developer machine without it, or when
/// `.ci/run` found no Go toolchain (`AGENTD_INTEROP=skip`). Under `CI=true` otherwise, a
/// missing program panics: the suite must run there.
#[allow(clippy::print_stderr)] // the skip notice is for the person running the tests
pub fn tool(name: &str) -> Option<PathBuf> {
    if std::env::var("AGENTD_INTEROP").as_deref() == Ok("skip") {
        eprintln!("SKIPPED: the interop suite is off (AGENTD_INTEROP=skip: no Go toolchain)");
        return None;
    }
    let dir = std::env::var_os("AGENTD_TAILSCALE_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/agentd-interop/bin"))
        })?;
    let p = dir.join(name);
    if p.is_file() {
        return Some(p);
    }
    assert!(
        !crate::in_ci(),
        "{name} not found in {}: .ci/run builds it (Tailscale v1.102.3, Headscale v0.29.0)",
        dir.display()
    );
    // Once per test program: one line says what to install.
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        eprintln!(
            "SKIPPED (not CI): interop tests here: {name} is not in {} (install Go 1.26 or newer, then `sudo .ci/run --deps-only` builds Tailscale's and Headscale's programs)",
            dir.display()
        )
    });
    None
}

/// Where a test's Headscale listens, keeps its files, and finds its one relay region.
#[derive(Debug, Clone)]
pub struct HeadscaleConfig<'a> {
    /// Its folder: config, database, Noise key, unix socket.
    pub dir: &'a std::path::Path,
    pub ip: std::net::IpAddr,
    pub port: u16,
    pub metrics_port: u16,
    pub grpc_port: u16,
    /// The relay region: ID, host name and IPv4 address of its one node.
    pub region: (i32, &'a str, std::net::Ipv4Addr),
    /// A policy file (Headscale's file mode).
    pub policy: Option<&'a std::path::Path>,
}

impl HeadscaleConfig<'_> {
    /// Writes `config.yaml` and the relay map `derp.yaml` into the folder; returns the
    /// config's path (for `headscale serve -c`).
    pub fn write(&self) -> std::io::Result<PathBuf> {
        let d = self.dir.display();
        let (id, host, ipv4) = self.region;
        std::fs::write(
            self.dir.join("derp.yaml"),
            format!(
                "regions:\n  {id}:\n    regionid: {id}\n    regioncode: r{id}\n    regionname: Region {id}\n    nodes:\n      - name: {id}a\n        regionid: {id}\n        hostname: {host}\n        ipv4: {ipv4}\n        ipv6: none\n        insecurefortests: true\n"
            ),
        )?;
        let listen = std::net::SocketAddr::new(self.ip, self.port);
        let metrics = std::net::SocketAddr::new(self.ip, self.metrics_port);
        let grpc = std::net::SocketAddr::new(self.ip, self.grpc_port);
        let policy = self
            .policy
            .map(|p| format!("policy:\n  mode: file\n  path: {}\n", p.display()))
            .unwrap_or_default();
        let config = self.dir.join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "server_url: http://{listen}\nlisten_addr: {listen}\n\
                 metrics_listen_addr: {metrics}\ngrpc_listen_addr: {grpc}\n\
                 noise:\n  private_key_path: {d}/noise_private.key\n\
                 prefixes:\n  v4: 100.64.0.0/10\n  v6: fd7a:115c:a1e0::/48\n\
                 derp:\n  server:\n    enabled: false\n  urls: []\n  paths:\n    - {d}/derp.yaml\n  auto_update_enabled: false\n\
                 disable_check_updates: true\n\
                 database:\n  type: sqlite\n  sqlite:\n    path: {d}/db.sqlite\n\
                 dns:\n  magic_dns: false\n  base_domain: example.com\n  override_local_dns: false\n  nameservers:\n    global: []\n\
                 unix_socket: {d}/headscale.sock\nunix_socket_permission: \"0770\"\n{policy}"
            ),
        )?;
        Ok(config)
    }
}
