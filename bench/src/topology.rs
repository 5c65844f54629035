//! `clustergate-bench topology up|down`: the benchmark network of
//! [`crate::layout`], in network namespaces of its own.
//!
//! - `up` builds PREFIX-cli, PREFIX-gw, PREFIX-lan (a bridge) and
//!   PREFIX-b1..bN, the veth pairs between them with the layout's addresses
//!   and MACs, and the routes: the client reaches the VIPs (198.19.0.0/16)
//!   through the gateway, and every backend's default route is the gateway,
//!   so replies come back through it. With more than one worker the client
//!   and gateway veths get that many queues (one AF_XDP socket per queue).
//!   Checksum and segmentation offloads are off on every veth, so the frames
//!   carry the checksums their senders wrote. The backend LAN (g1, the
//!   bridge, every e0) has an MTU of [`LAN_MTU`] (1520): room for a
//!   1500-byte packet inside DSR's outer header; the client side keeps 1500.
//!   The gateway does not forward in
//!   the kernel (ip_forward 0, IPv6 forwarding 0) until a dataplane that
//!   needs it turns it on.
//! - Every link is dual-stack: the IPv6 addresses of the layout (in
//!   2001:2::/48) are added with `nodad`, so they are usable at once, beside
//!   the IPv4 ones, with the same routes (the client reaches the IPv6 VIPs,
//!   2001:2:0:100::/64, through g0; the backends' IPv6 default route is g1).
//!   The bridge does no multicast snooping, so neighbour solicitations reach
//!   every backend whatever MLD state it has learnt.
//! - It is idempotent: `up` on a topology it built with the same shape does
//!   nothing; with another shape it rebuilds it. `down` removes what it built.
//! - It refuses to touch a namespace it did not create: each namespace's
//!   identity (the inode of its nsfs file) is recorded in
//!   `/run/clustergate-bench/PREFIX.json` when created, and a namespace with
//!   one of the topology's names that is not in that record, or is another
//!   namespace by now, stops `up` and `down` with an error naming it.
//!
//! This is a test harness, not the product: it drives iproute2 and ethtool
//! (as the e2e tests do) rather than netlink, so that what it does can be
//! replayed by hand from `--verbose` output.

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::layout::{
    backend_addr, backend_ip, backend_mac, Family, CLIENT_ADDR, CLIENT_ADDR6, CLIENT_MAC,
    GW_CLIENT_ADDR, GW_CLIENT_ADDR6, GW_CLIENT_MAC, GW_LAN_ADDR, GW_LAN_ADDR6, GW_LAN_MAC, LAN_MTU,
    MAX_BACKENDS, VIP_NET6,
};

/// Where ownership records live.
const RECORDS: &str = "/run/clustergate-bench";
/// Where `ip netns` keeps namespace files.
const NETNS_DIR: &str = "/run/netns";

/// Up or down.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Action {
    /// Build it (idempotent).
    Up,
    /// Remove what `up` built.
    Down,
}

/// Flags of `clustergate-bench topology`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// up or down.
    #[arg(value_enum)]
    pub action: Action,
    #[command(flatten)]
    pub shape: Shape,
    /// Print every command run.
    #[arg(long)]
    pub verbose: bool,
}

/// What the topology looks like.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
pub struct Shape {
    /// Namespace name prefix: 1 to 8 of a-z and 0-9.
    #[arg(long, default_value = "cgb", value_parser = parse_prefix)]
    pub prefix: String,
    /// Backend namespaces, 1..=16.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_BACKENDS)))]
    pub backends: u32,
    /// Gateway workers: the client and gateway veths get this many queues, 1..=16.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub workers: u32,
}

pub(crate) fn parse_prefix(s: &str) -> Result<String, String> {
    if (1..=8).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?}: 1 to 8 characters of a-z and 0-9"))
    }
}

/// The ownership record.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    shape: Shape,
    /// (namespace name, nsfs inode) of each namespace created.
    namespaces: Vec<(String, u64)>,
    /// The build ran to its end (a build cut short is rebuilt, not reused).
    #[serde(default)]
    complete: bool,
    /// The backend LAN's MTU it was built with (0: before there was one; a
    /// topology built otherwise is rebuilt, not reused).
    #[serde(default)]
    lan_mtu: u16,
    /// Its links have the IPv6 addresses too (a topology built before they
    /// did is rebuilt, not reused).
    #[serde(default)]
    ipv6: bool,
}

/// A built topology.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Its shape.
    pub shape: Shape,
    verbose: bool,
}

impl Topology {
    /// A handle on `shape` (nothing is built yet).
    #[must_use]
    pub fn new(shape: Shape, verbose: bool) -> Self {
        Self { shape, verbose }
    }

    /// The namespace `role` ("cli", "gw", "lan", "b1", …).
    #[must_use]
    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.shape.prefix)
    }

    /// Every namespace name, in creation order.
    #[must_use]
    pub fn namespaces(&self) -> Vec<String> {
        let mut v = vec![self.ns("cli"), self.ns("gw"), self.ns("lan")];
        v.extend((1..=self.shape.backends).map(|i| self.ns(&format!("b{i}"))));
        v
    }

    fn record_path(&self) -> PathBuf {
        Path::new(RECORDS).join(format!("{}.json", self.shape.prefix))
    }

    fn read_record(&self) -> Result<Option<Record>> {
        let path = self.record_path();
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
                format!("ownership record {} is not valid", path.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Namespaces named like ours that exist now: (name, inode).
    fn existing(prefix: &str) -> Result<Vec<(String, u64)>> {
        let mut v = Vec::new();
        let dir = match std::fs::read_dir(NETNS_DIR) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(v),
            Err(e) => return Err(e).with_context(|| format!("listing {NETNS_DIR}")),
        };
        for entry in dir {
            let entry = entry.with_context(|| format!("listing {NETNS_DIR}"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{prefix}-")) {
                v.push((name, inode(&entry.path())?));
            }
        }
        Ok(v)
    }

    /// Fails naming any namespace of ours that the record does not vouch for.
    fn check_ownership(&self, record: Option<&Record>) -> Result<()> {
        let owned = record.map(|r| r.namespaces.as_slice()).unwrap_or_default();
        for (name, ino) in Self::existing(&self.shape.prefix)? {
            if !owned.iter().any(|(n, i)| *n == name && *i == ino) {
                bail!(
                    "namespace {name} exists but was not created by clustergate-bench topology \
                     (no matching entry in {}); refusing to touch it — remove it yourself or pick another --prefix",
                    self.record_path().display()
                );
            }
        }
        Ok(())
    }

    /// Builds the topology; a no-op when it is already up with this shape.
    ///
    /// # Errors
    /// A foreign namespace in the way, or a command that fails (what was
    /// built so far is removed again).
    pub fn up(&self) -> Result<()> {
        let record = self.read_record()?;
        self.check_ownership(record.as_ref())?;
        if let Some(r) = &record {
            let all_there = Self::existing(&self.shape.prefix)?.len() == r.namespaces.len();
            if r.shape == self.shape && all_there && r.complete && r.lan_mtu == LAN_MTU && r.ipv6 {
                eprintln!("topology {} is already up", self.shape.prefix);
                return Ok(());
            }
            self.remove(r)?;
        }
        let r = self.build();
        if r.is_err() {
            if let Ok(Some(rec)) = self.read_record() {
                let _ = self.remove(&rec);
            }
        }
        r
    }

    /// Removes what `up` built (nothing when it is not up).
    ///
    /// # Errors
    /// A namespace of ours that is not the one created.
    pub fn down(&self) -> Result<()> {
        let record = self.read_record()?;
        self.check_ownership(record.as_ref())?;
        if let Some(r) = record {
            self.remove(&r)?;
        }
        Ok(())
    }

    fn remove(&self, r: &Record) -> Result<()> {
        for (name, ino) in &r.namespaces {
            let path = Path::new(NETNS_DIR).join(name);
            match inode(&path) {
                Ok(i) if i == *ino => self.run("ip", &["netns", "del", name])?,
                Ok(_) => bail!("namespace {name} was replaced by another; refusing to delete it"),
                Err(_) => {} // already gone
            }
        }
        let path = self.record_path();
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => Ok(()),
        }
    }

    fn write_record(&self, namespaces: &[(String, u64)], complete: bool) -> Result<()> {
        std::fs::create_dir_all(RECORDS).with_context(|| format!("creating {RECORDS}"))?;
        let rec = Record {
            shape: self.shape.clone(),
            namespaces: namespaces.to_vec(),
            complete,
            lan_mtu: LAN_MTU,
            ipv6: true,
        };
        let path = self.record_path();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&rec)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    fn build(&self) -> Result<()> {
        let q = self.shape.workers.to_string();
        let mut created = Vec::new();
        for name in self.namespaces() {
            self.run("ip", &["netns", "add", &name])?;
            created.push((name.clone(), inode(&Path::new(NETNS_DIR).join(&name))?));
            // Recorded after each one, so a failure part-way is cleaned up.
            self.write_record(&created, false)?;
            self.ipn(&name, &["link", "set", "lo", "up"])?;
        }
        let (cli, gw, lan) = (self.ns("cli"), self.ns("gw"), self.ns("lan"));
        self.ipn(&lan, &["link", "add", "br0", "type", "bridge"])?;
        self.ipn(
            &lan,
            &[
                "link",
                "set",
                "br0",
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ],
        )?;
        self.ipn(&lan, &["link", "set", "br0", "up"])?;

        // Client ↔ gateway: Q queues each way.
        self.veth((&cli, "c0", CLIENT_MAC), (&gw, "g0", GW_CLIENT_MAC), &q)?;
        self.addr_up(&cli, "c0", &format!("{CLIENT_ADDR}/24"))?;
        self.addr_up(&gw, "g0", &format!("{GW_CLIENT_ADDR}/24"))?;
        self.ipn(
            &cli,
            &[
                "route",
                "add",
                "198.19.0.0/16",
                "via",
                &GW_CLIENT_ADDR.to_string(),
            ],
        )?;
        self.addr6(&cli, "c0", &format!("{CLIENT_ADDR6}/64"))?;
        self.addr6(&gw, "g0", &format!("{GW_CLIENT_ADDR6}/64"))?;
        self.ipn(
            &cli,
            &[
                "-6",
                "route",
                "add",
                VIP_NET6,
                "via",
                &GW_CLIENT_ADDR6.to_string(),
            ],
        )?;

        // Gateway ↔ LAN bridge.
        self.veth(
            (&gw, "g1", GW_LAN_MAC),
            (&lan, "l0", [0x02, 0xcb, 0x03, 0, 0, 0]),
            &q,
        )?;
        let mtu = LAN_MTU.to_string();
        self.ipn(&gw, &["link", "set", "g1", "mtu", &mtu])?;
        self.ipn(&lan, &["link", "set", "l0", "mtu", &mtu])?;
        self.addr_up(&gw, "g1", &format!("{GW_LAN_ADDR}/24"))?;
        self.addr6(&gw, "g1", &format!("{GW_LAN_ADDR6}/64"))?;
        self.ipn(&lan, &["link", "set", "l0", "master", "br0", "up"])?;

        for i in 1..=self.shape.backends {
            let b = self.ns(&format!("b{i}"));
            let l = format!("l{i}");
            self.veth(
                (&b, "e0", backend_mac(i)),
                (&lan, &l, [0x02, 0xcb, 0x03, 0, 0, i as u8]),
                "1",
            )?;
            self.ipn(&b, &["link", "set", "e0", "mtu", &mtu])?;
            self.ipn(&lan, &["link", "set", &l, "mtu", &mtu])?;
            self.addr_up(&b, "e0", &format!("{}/24", backend_addr(i)))?;
            self.ipn(
                &b,
                &["route", "add", "default", "via", &GW_LAN_ADDR.to_string()],
            )?;
            self.ipn(&lan, &["link", "set", &l, "master", "br0", "up"])?;
            // With the link's carrier up, so the address and route take.
            self.addr6(&b, "e0", &format!("{}/64", backend_ip(Family::V6, i)))?;
            self.ipn(
                &b,
                &[
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &GW_LAN_ADDR6.to_string(),
                ],
            )?;
        }
        self.ipn(&lan, &["link", "set", "br0", "mtu", &mtu])?;
        // Only the dataplane under test forwards.
        self.sysctl(&gw, "net.ipv4.ip_forward", "0")?;
        self.sysctl(&gw, "net.ipv6.conf.all.forwarding", "0")?;
        self.write_record(&created, true)
    }

    /// A veth pair between two namespaces with fixed MACs, `queues` each
    /// way, offloads off on both ends.
    fn veth(&self, a: (&str, &str, [u8; 6]), b: (&str, &str, [u8; 6]), queues: &str) -> Result<()> {
        let (ma, mb) = (mac(a.2), mac(b.2));
        self.run(
            "ip",
            &[
                "link",
                "add",
                a.1,
                "netns",
                a.0,
                "address",
                &ma,
                "numtxqueues",
                queues,
                "numrxqueues",
                queues,
                "type",
                "veth",
                "peer",
                b.1,
                "netns",
                b.0,
                "address",
                &mb,
                "numtxqueues",
                queues,
                "numrxqueues",
                queues,
            ],
        )?;
        for (ns, dev) in [(a.0, a.1), (b.0, b.1)] {
            self.run(
                "ip",
                &[
                    "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off", "rx", "off", "tso",
                    "off", "gso", "off", "gro", "off",
                ],
            )?;
        }
        Ok(())
    }

    /// An IPv6 address, usable at once (no duplicate address detection).
    fn addr6(&self, ns: &str, dev: &str, cidr: &str) -> Result<()> {
        self.ipn(ns, &["-6", "addr", "add", cidr, "dev", dev, "nodad"])
    }

    fn addr_up(&self, ns: &str, dev: &str, cidr: &str) -> Result<()> {
        self.ipn(ns, &["addr", "add", cidr, "dev", dev])?;
        self.ipn(ns, &["link", "set", dev, "up"])
    }

    /// `ip -n NS …`.
    pub fn ipn(&self, ns: &str, args: &[&str]) -> Result<()> {
        let mut v = vec!["-n", ns];
        v.extend_from_slice(args);
        self.run("ip", &v)
    }

    /// Sets a sysctl inside namespace `ns`.
    ///
    /// # Errors
    /// The write fails.
    pub fn sysctl(&self, ns: &str, key: &str, value: &str) -> Result<()> {
        self.run(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                &format!("{key}={value}"),
            ],
        )
    }

    /// Runs a command to completion; fails with its stderr.
    ///
    /// # Errors
    /// It cannot start or exits non-zero.
    pub fn run(&self, prog: &str, args: &[&str]) -> Result<()> {
        if self.verbose {
            let mut line = prog.to_owned();
            for a in args {
                let _ = write!(line, " {a}");
            }
            eprintln!("+ {line}");
        }
        let out = Command::new(prog)
            .args(args)
            .output()
            .with_context(|| format!("running {prog} (scripts/install-deps.sh installs it)"))?;
        ensure!(
            out.status.success(),
            "`{prog} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn inode(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("{} is not there", path.display()))?
        .ino())
}

/// Runs `clustergate-bench topology`.
///
/// # Errors
/// Not root, a foreign namespace in the way, or a failing command.
pub fn run(args: &Args) -> Result<()> {
    ensure!(
        rustix::process::geteuid().is_root(),
        "clustergate-bench topology needs root (network namespaces)"
    );
    let t = Topology::new(args.shape.clone(), args.verbose);
    match args.action {
        Action::Up => {
            t.up()?;
            eprintln!(
                "topology {} up: {} ({} backends, {} queue(s) on c0/g0/g1)",
                args.shape.prefix,
                t.namespaces().join(" "),
                args.shape.backends,
                args.shape.workers
            );
        }
        Action::Down => {
            t.down()?;
            eprintln!("topology {} down", args.shape.prefix);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_checked() {
        assert!(parse_prefix("cgb").is_ok());
        assert!(parse_prefix("a1").is_ok());
        for bad in ["", "toolongname", "Cgb", "c-b", "c b", "../x"] {
            assert!(parse_prefix(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn macs_print_as_ip_wants_them() {
        assert_eq!(mac(CLIENT_MAC), "02:cb:01:00:00:02");
    }
}
