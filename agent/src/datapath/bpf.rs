//! The kernel programs and their maps, pinned under `<bpffs>/static-egress` so that a restarted
//! agent adopts them: maps are reused as they are, and each pinned TCX link gets the freshly
//! loaded program swapped in atomically, so packets never see a moment without a program.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::{
    Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues, lpm_trie::Key,
};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use static_egress_common::{
    Config, Counters, DestKey, EgressEntry, GatewayEntry, Guard, Heard, Lease, MAPS_LAYOUT,
    PodEntry, Prober, names,
};

use super::DatapathError;
use super::maps::MapContents;

/// The kernel object built by `cargo xtask build`; empty when built without it.
static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/static-egress.bpf.o"));

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    PodIngress,
    /// The uplink's ingress, and the tunnel device's: packets of other nodes' pods arrive on
    /// either.
    UplinkIngress,
    UplinkEgress,
    TunnelEgress,
}

impl Hook {
    const ALL: [Hook; 4] = [
        Hook::PodIngress,
        Hook::UplinkIngress,
        Hook::UplinkEgress,
        Hook::TunnelEgress,
    ];

    fn prefix(self) -> &'static str {
        match self {
            Hook::PodIngress => "ingress-",
            Hook::UplinkIngress => "uplink-ingress-",
            Hook::UplinkEgress => "egress-",
            Hook::TunnelEgress => "tunnel-egress-",
        }
    }
    fn program(self) -> &'static str {
        match self {
            Hook::PodIngress => names::PROG_POD_INGRESS,
            Hook::UplinkIngress => names::PROG_UPLINK_INGRESS,
            Hook::UplinkEgress => names::PROG_UPLINK_EGRESS,
            Hook::TunnelEgress => names::PROG_TUNNEL_EGRESS,
        }
    }
    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::PodIngress | Hook::UplinkIngress => TcAttachType::Ingress,
            Hook::UplinkEgress | Hook::TunnelEgress => TcAttachType::Egress,
        }
    }
}

/// Pin directory of our objects under a bpffs mount.
pub fn pin_root(bpffs: &Path) -> PathBuf {
    bpffs.join("static-egress")
}

pub struct Bpf {
    ebpf: Ebpf,
    links_dir: PathBuf,
    /// Links this process holds, by hook and interface index.
    links: BTreeMap<(Hook, u32), PinnedLink>,
    pods: HashMap<MapData, u32, PodEntry>,
    dests: LpmTrie<MapData, DestKey, u8>,
    gateways: HashMap<MapData, u32, GatewayEntry>,
    egress: HashMap<MapData, u32, EgressEntry>,
    counters: PerCpuHashMap<MapData, u32, Counters>,
    config: Array<MapData, Config>,
    ranges: LpmTrie<MapData, u32, u8>,
    peers: LpmTrie<MapData, u32, u32>,
    guard: PerCpuArray<MapData, Guard>,
    lease: Array<MapData, Lease>,
    heard: Array<MapData, Heard>,
    // An LRU hash in the kernel: aya reads it as a plain hash map.
    probers: HashMap<MapData, u32, Prober>,
    senders: HashMap<MapData, [u8; 6], u8>,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, DatapathError> {
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    T::try_from(map).map_err(|source| DatapathError::Map { map: name, source })
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

impl Bpf {
    /// Loads the programs, creating or reusing the pinned maps (the mark bit in `SE_CONFIG`
    /// stays as an earlier agent left it until [`Bpf::set_mark`]).
    pub fn load(bpffs: &Path, log: Option<aya_log::Level>) -> Result<Self, DatapathError> {
        check_bpffs(bpffs)?;
        if OBJECT.is_empty() {
            return Err(DatapathError::NoKernelObject);
        }
        let root = pin_root(bpffs);
        let maps_dir = root.join(format!("maps-v{MAPS_LAYOUT}"));
        let links_dir = root.join("links");
        for dir in [&maps_dir, &links_dir] {
            fs::create_dir_all(dir).map_err(|source| DatapathError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        // The programs' log calls check this level first: 0 keeps them all quiet.
        let level = log.map_or(0u8, |level| level as u8);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .override_global(aya_log::LEVEL, &level, true)
            .load(OBJECT)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        if let Some(level) = log {
            tracing::info!(?level, "the kernel programs log into this log");
            follow_kernel_log(&mut ebpf);
        }
        for hook in Hook::ALL {
            program(&mut ebpf, hook)?
                .load()
                .map_err(|e| DatapathError::Program {
                    program: hook.program(),
                    source: Box::new(e),
                })?;
        }
        Ok(Self {
            config: take(&mut ebpf, names::CONFIG)?,
            ranges: take(&mut ebpf, names::RANGES)?,
            peers: take(&mut ebpf, names::PEERS)?,
            guard: take(&mut ebpf, names::GUARD)?,
            lease: take(&mut ebpf, names::LEASE)?,
            heard: take(&mut ebpf, names::HEARD)?,
            probers: take(&mut ebpf, names::PROBERS)?,
            senders: take(&mut ebpf, names::SENDERS)?,
            pods: take(&mut ebpf, names::PODS)?,
            dests: take(&mut ebpf, names::DESTS)?,
            gateways: take(&mut ebpf, names::GATEWAYS)?,
            egress: take(&mut ebpf, names::EGRESS)?,
            counters: take(&mut ebpf, names::COUNTERS)?,
            ebpf,
            links_dir,
            links: BTreeMap::new(),
        })
    }

    /// What the programs need to know of this node: our fwmark bit, its address and the
    /// probe port.
    pub fn set_config(&mut self, config: Config) -> Result<(), DatapathError> {
        if self.config.get(&0, 0).ok() != Some(config) {
            self.config
                .set(0, config, 0)
                .map_err(map_err(names::CONFIG))?;
        }
        Ok(())
    }

    /// The other nodes' link-layer addresses that pods' packets on their way out may come
    /// from (see `SE_SENDERS`). Added before the rest of an apply, so that a node taking over
    /// does not drop its new senders' first packets; the ones no longer wanted go.
    pub fn sync_senders(&mut self, macs: &BTreeSet<[u8; 6]>) -> Result<(), DatapathError> {
        for mac in macs {
            if self.senders.get(mac, 0).is_err() {
                self.senders
                    .insert(mac, 1, 0)
                    .map_err(map_err(names::SENDERS))?;
            }
        }
        let stale: Vec<[u8; 6]> = self
            .senders
            .keys()
            .filter_map(Result::ok)
            .filter(|m| !macs.contains(m))
            .collect();
        for mac in stale {
            self.senders.remove(&mac).map_err(map_err(names::SENDERS))?;
        }
        Ok(())
    }

    /// What the programs know of this node now (zeros before the first write).
    pub fn config(&self) -> Config {
        self.config.get(&0, 0).unwrap_or_default()
    }

    /// The lease as the programs see it.
    pub fn lease(&self) -> Lease {
        self.lease.get(&0, 0).unwrap_or_default()
    }

    pub fn set_lease(&mut self, lease: Lease) -> Result<(), DatapathError> {
        self.lease.set(0, lease, 0).map_err(map_err(names::LEASE))
    }

    /// What the program answering probes saw of them.
    pub fn heard(&self) -> Heard {
        self.heard.get(&0, 0).unwrap_or_default()
    }

    /// The addresses that probed this node, with when they last did.
    pub fn probers(&self) -> impl Iterator<Item = (Ipv4Addr, u64)> + '_ {
        self.probers
            .iter()
            .filter_map(Result::ok)
            .map(|(ip, p)| (Ipv4Addr::from(u32::from_be(ip)), p.last_ns))
    }

    /// Brings the maps to `want`. Entries a pod entry points at are written before the pod
    /// entry and removed after it, so the programs never see a pod without its gateway.
    pub fn sync_maps(&mut self, want: &MapContents) -> Result<(), DatapathError> {
        let nr_cpus = aya::util::nr_cpus().map_err(|(_, source)| DatapathError::Io {
            path: "/sys/devices/system/cpu/possible".into(),
            source,
        })?;
        for (id, entry) in &want.gateways {
            if self.gateways.get(id, 0).ok().as_ref() != Some(entry) {
                self.gateways
                    .insert(id, entry, 0)
                    .map_err(map_err(names::GATEWAYS))?;
            }
            if self.counters.get(id, 0).is_err() {
                let zero = PerCpuValues::try_from(vec![Counters::default(); nr_cpus]).map_err(
                    |source| DatapathError::Io {
                        path: "/sys/devices/system/cpu/possible".into(),
                        source,
                    },
                )?;
                self.counters
                    .insert(id, zero, 0)
                    .map_err(map_err(names::COUNTERS))?;
            }
        }
        for (ip, entry) in &want.egress {
            if self.egress.get(ip, 0).ok().as_ref() != Some(entry) {
                self.egress
                    .insert(ip, entry, 0)
                    .map_err(map_err(names::EGRESS))?;
            }
        }
        sync_prefixes(&mut self.peers, &want.peers, names::PEERS)?;
        for ((len, key), verdict) in &want.dests {
            let k = Key::new(*len, *key);
            if self.dests.get(&k, 0).ok() != Some(*verdict) {
                self.dests
                    .insert(&k, verdict, 0)
                    .map_err(map_err(names::DESTS))?;
            }
        }
        sync_prefixes(&mut self.ranges, &want.ranges, names::RANGES)?;
        for (ip, entry) in &want.pods {
            if self.pods.get(ip, 0).ok().as_ref() != Some(entry) {
                self.pods
                    .insert(ip, entry, 0)
                    .map_err(map_err(names::PODS))?;
            }
        }
        let stale: Vec<u32> = self
            .pods
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want.pods.contains_key(k))
            .collect();
        for ip in stale {
            self.pods.remove(&ip).map_err(map_err(names::PODS))?;
        }
        let stale: Vec<Key<DestKey>> = self
            .dests
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want.dests.contains_key(&(k.prefix_len(), k.data())))
            .collect();
        for key in stale {
            self.dests.remove(&key).map_err(map_err(names::DESTS))?;
        }
        let stale: Vec<u32> = self
            .egress
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want.egress.contains_key(k))
            .collect();
        for ip in stale {
            self.egress.remove(&ip).map_err(map_err(names::EGRESS))?;
        }
        let stale: Vec<u32> = self
            .gateways
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want.gateways.contains_key(k))
            .collect();
        for id in stale {
            self.gateways
                .remove(&id)
                .map_err(map_err(names::GATEWAYS))?;
            // Removing a key that is not there is fine: counters may predate a crash.
            let _ = self.counters.remove(&id);
        }
        Ok(())
    }

    /// Attaches `hook` to exactly the interfaces in `want` (index -> name), adopting pinned
    /// links left by an earlier agent and detaching the rest.
    pub fn sync_links(
        &mut self,
        hook: Hook,
        want: &BTreeMap<u32, String>,
    ) -> Result<(), DatapathError> {
        let pinned = self.pinned_indices(hook)?;
        for index in pinned.iter().filter(|i| !want.contains_key(i)) {
            self.detach(hook, *index)?;
        }
        for (index, name) in want {
            if self.links.contains_key(&(hook, *index)) {
                continue;
            }
            let path = self.pin_path(hook, *index);
            let link = match self.adopt(hook, &path) {
                Ok(Some(link)) => link,
                Ok(None) => self.attach(hook, name, &path)?,
                Err(e) => {
                    // A link whose interface went away cannot take a program any more.
                    tracing::warn!(interface = %name, error = %e, "replacing a pinned link that could not be adopted");
                    remove_pin(&path)?;
                    self.attach(hook, name, &path)?
                }
            };
            self.links.insert((hook, *index), link);
        }
        Ok(())
    }

    /// Forgets the links of `hook` on `interfaces` (index -> name) whose interface no longer
    /// runs our program, because someone detached the link: the next [`Bpf::sync_links`]
    /// attaches them again. Returns the names of those interfaces.
    pub fn forget_detached(
        &mut self,
        hook: Hook,
        interfaces: &BTreeMap<u32, String>,
    ) -> Result<Vec<String>, DatapathError> {
        let ours = program(&mut self.ebpf, hook)?
            .info()
            .map_err(|e| DatapathError::Program {
                program: hook.program(),
                source: Box::new(e),
            })?
            .id();
        let mut lost = Vec::new();
        for (index, name) in interfaces {
            if !self.links.contains_key(&(hook, *index)) {
                continue;
            }
            // An interface that went away meanwhile is not attached either.
            let attached = tcx_program_ids(*index, hook).is_ok_and(|ids| ids.contains(&ours));
            if !attached {
                self.links.remove(&(hook, *index));
                lost.push(name.clone());
            }
        }
        Ok(lost)
    }

    fn adopt(&mut self, hook: Hook, path: &Path) -> Result<Option<PinnedLink>, DatapathError> {
        let pinned = match PinnedLink::from_pin(path) {
            Ok(p) => p,
            Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {
                return Ok(None);
            }
            Err(e) => {
                return Err(DatapathError::Link {
                    path: path.to_owned(),
                    source: Box::new(e),
                });
            }
        };
        let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| {
            DatapathError::Link {
                path: path.to_owned(),
                source: Box::new(e),
            }
        })?;
        let prog = program(&mut self.ebpf, hook)?;
        let id = prog
            .attach_to_link(link)
            .map_err(|e| DatapathError::Program {
                program: hook.program(),
                source: Box::new(e),
            })?;
        self.keep(hook, id, path).map(Some)
    }

    fn attach(
        &mut self,
        hook: Hook,
        ifname: &str,
        path: &Path,
    ) -> Result<PinnedLink, DatapathError> {
        let prog = program(&mut self.ebpf, hook)?;
        // First in the chain: marking must happen before another program can redirect the
        // packet past the routing that reads the mark, and a program after ours still sees
        // every packet we do not drop or redirect (ours return TCX_NEXT).
        let id = prog
            .attach_with_options(
                ifname,
                hook.attach_type(),
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .map_err(|e| DatapathError::Attach {
                interface: ifname.to_owned(),
                source: Box::new(e),
            })?;
        self.keep(hook, id, path)
    }

    /// Takes the link out of aya's bookkeeping (which would detach it on drop) and pins it.
    fn keep(
        &mut self,
        hook: Hook,
        id: aya::programs::tc::SchedClassifierLinkId,
        path: &Path,
    ) -> Result<PinnedLink, DatapathError> {
        let prog = program(&mut self.ebpf, hook)?;
        let link = prog.take_link(id).map_err(|e| DatapathError::Program {
            program: hook.program(),
            source: Box::new(e),
        })?;
        let fd = FdLink::try_from(link).map_err(|e| DatapathError::Link {
            path: path.to_owned(),
            source: Box::new(e),
        })?;
        // Re-pinning an adopted link: the old pin names the same link, replace it.
        if path.exists() {
            remove_pin(path)?;
        }
        fd.pin(path).map_err(|e| DatapathError::Link {
            path: path.to_owned(),
            source: Box::new(e),
        })
    }

    fn detach(&mut self, hook: Hook, index: u32) -> Result<(), DatapathError> {
        self.links.remove(&(hook, index));
        remove_pin(&self.pin_path(hook, index))
    }

    fn pin_path(&self, hook: Hook, index: u32) -> PathBuf {
        self.links_dir.join(format!("{}{index}", hook.prefix()))
    }

    fn pinned_indices(&self, hook: Hook) -> Result<BTreeSet<u32>, DatapathError> {
        pinned_link_indices(&self.links_dir, hook)
    }

    /// Removes the pins of maps of earlier layouts (`maps`, `maps-v<N>`): once every link runs
    /// the programs loaded with the current maps, nothing uses them any more.
    pub fn forget_old_maps(&self) -> Result<(), DatapathError> {
        let Some(root) = self.links_dir.parent() else {
            return Ok(());
        };
        let current = format!("maps-v{MAPS_LAYOUT}");
        let entries = fs::read_dir(root).map_err(|source| DatapathError::Io {
            path: root.to_owned(),
            source,
        })?;
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if (name == "maps" || name.starts_with("maps-v")) && name != current {
                tracing::info!(pins = %entry.path().display(), "removing maps of an earlier layout");
                fs::remove_dir_all(entry.path()).map_err(|source| DatapathError::Io {
                    path: entry.path(),
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// Sum over CPUs of what the uplink programs did to guard selected traffic.
    pub fn guard(&self) -> Guard {
        sum_guard(&self.guard)
    }

    /// Sum over CPUs of each gateway's counters.
    pub fn counters(&self) -> BTreeMap<u32, Counters> {
        sum_counters(&self.counters)
    }
}

/// Passes the programs' log records on to the agent's log (`--kernel-log`), from a task of
/// its own; without it they are only lost.
fn follow_kernel_log(ebpf: &mut aya::Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf)
        .map_err(std::io::Error::other)
        .and_then(|logger| {
            // SAFETY: the logger owns its ring buffer's descriptor, open and the same for as
            // long as the logger lives, which is as long as the `AsyncFd` that owns it.
            unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    logger,
                    tokio::io::Interest::READABLE,
                )
            }
            .map_err(std::io::Error::from)
        }) {
        Ok(logger) => logger,
        Err(error) => {
            tracing::warn!(%error, "cannot follow the kernel programs' log");
            return;
        }
    };
    tokio::spawn(async move {
        let mut logger = logger;
        loop {
            let Ok(mut ready) = logger.readable_mut().await else {
                return;
            };
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    });
}

/// The counters in the maps pinned under `bpffs`, as [`Bpf::counters`] and [`Bpf::guard`]
/// give them, read without loading anything: for `static-egress status`, while an agent runs
/// or after it stopped (the maps stay pinned, and the programs keep counting).
pub fn pinned_counters(bpffs: &Path) -> Result<(BTreeMap<u32, Counters>, Guard), DatapathError> {
    let dir = pin_root(bpffs).join(format!("maps-v{MAPS_LAYOUT}"));
    let open = |name: &'static str| {
        MapData::from_pin(dir.join(name))
            .and_then(aya::maps::Map::from_map_data)
            .map_err(map_err(name))
    };
    let counters: PerCpuHashMap<MapData, u32, Counters> = open(names::COUNTERS)?
        .try_into()
        .map_err(map_err(names::COUNTERS))?;
    let guard: PerCpuArray<MapData, Guard> = open(names::GUARD)?
        .try_into()
        .map_err(map_err(names::GUARD))?;
    Ok((sum_counters(&counters), sum_guard(&guard)))
}

/// Brings a map keyed by IPv4 prefixes to `want` ((prefix length, address) -> value): changed
/// entries written, then the ones no longer wanted removed.
fn sync_prefixes<V: aya::Pod + PartialEq>(
    map: &mut LpmTrie<MapData, u32, V>,
    want: &BTreeMap<(u32, u32), V>,
    name: &'static str,
) -> Result<(), DatapathError> {
    for (&(len, addr), value) in want {
        let key = Key::new(len, addr);
        if map.get(&key, 0).ok().as_ref() != Some(value) {
            map.insert(&key, value, 0).map_err(map_err(name))?;
        }
    }
    let stale: Vec<Key<u32>> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !want.contains_key(&(k.prefix_len(), k.data())))
        .collect();
    for key in stale {
        map.remove(&key).map_err(map_err(name))?;
    }
    Ok(())
}

fn sum_guard(guard: &PerCpuArray<MapData, Guard>) -> Guard {
    guard.get(&0, 0).map_or(Guard::default(), |per_cpu| {
        per_cpu.iter().fold(Guard::default(), |acc, g| Guard {
            transit: acc.transit + g.transit,
            dropped: acc.dropped + g.dropped,
            fenced: acc.fenced + g.fenced,
            probes: acc.probes + g.probes,
            foreign: acc.foreign + g.foreign,
            tunnel_out: acc.tunnel_out + g.tunnel_out,
            tunnel_in: acc.tunnel_in + g.tunnel_in,
        })
    })
}

fn sum_counters(counters: &PerCpuHashMap<MapData, u32, Counters>) -> BTreeMap<u32, Counters> {
    counters
        .iter()
        .filter_map(Result::ok)
        .map(|(id, per_cpu)| {
            let sum = per_cpu.iter().fold(Counters::default(), |acc, c| Counters {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
                dropped: acc.dropped + c.dropped,
            });
            (id, sum)
        })
        .collect()
}

/// The ids of the programs in an interface's TCX chain, in order, by `BPF_PROG_QUERY` alone:
/// that needs `CAP_NET_ADMIN`, where aya's `query_tcx` also opens every program by id, which
/// needs `CAP_SYS_ADMIN` (the DaemonSet does not have it).
fn tcx_program_ids(ifindex: u32, hook: Hook) -> io::Result<Vec<u32>> {
    /// The `query` member of `union bpf_attr` (`include/uapi/linux/bpf.h`).
    #[repr(C)]
    #[derive(Default)]
    struct Query {
        target_ifindex: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_TCX_INGRESS: u32 = 46;
    const BPF_TCX_EGRESS: u32 = 47;
    let attach_type = match hook.attach_type() {
        TcAttachType::Ingress => BPF_TCX_INGRESS,
        _ => BPF_TCX_EGRESS,
    };
    let mut ids = vec![0u32; 64];
    loop {
        let mut query = Query {
            target_ifindex: ifindex,
            attach_type,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: u32::try_from(ids.len()).unwrap_or(u32::MAX),
            ..Query::default()
        };
        // SAFETY: `query` is a valid `bpf_attr` prefix of the size passed, and `prog_ids` points
        // at `prog_cnt` writable u32s that outlive the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_QUERY,
                &raw mut query,
                size_of::<Query>(),
            )
        };
        let count = query.prog_cnt as usize;
        if ret == 0 {
            ids.truncate(count);
            return Ok(ids);
        }
        let error = io::Error::last_os_error();
        // More programs than room: the kernel said how many.
        if error.raw_os_error() != Some(libc::ENOSPC) || count <= ids.len() {
            return Err(error);
        }
        ids.resize(count, 0);
    }
}

fn program(ebpf: &mut Ebpf, hook: Hook) -> Result<&mut SchedClassifier, DatapathError> {
    let name = hook.program();
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?
        .try_into()
        .map_err(|e| DatapathError::Program {
            program: name,
            source: Box::new(e),
        })
}

fn pinned_link_indices(dir: &Path, hook: Hook) -> Result<BTreeSet<u32>, DatapathError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(source) => {
            return Err(DatapathError::Io {
                path: dir.to_owned(),
                source,
            });
        }
    };
    Ok(entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix(hook.prefix())?
                .parse()
                .ok()
        })
        .collect())
}

fn remove_pin(path: &Path) -> Result<(), DatapathError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DatapathError::Io {
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Pinning needs a bpf filesystem; a plain directory would fail later with a vague error.
fn check_bpffs(dir: &Path) -> Result<(), DatapathError> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| DatapathError::NotBpffs(dir.to_owned()))?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a writable statfs buffer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(DatapathError::Io {
            path: dir.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        return Err(DatapathError::NotBpffs(dir.to_owned()));
    }
    Ok(())
}

/// Removes every pinned object of ours: links detach and maps go once no program uses them.
pub fn remove_pins(bpffs: &Path) -> Result<bool, DatapathError> {
    let root = pin_root(bpffs);
    match fs::remove_dir_all(&root) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(DatapathError::Io { path: root, source }),
    }
}
