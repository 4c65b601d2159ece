//! The kernel data plane: loads the XDP and TC programs (one object, one set of maps), attaches
//! them ([`super::attach`] says which goes where), and writes [`Plan`]s into their maps (layout
//! documented in `ambassador_ebpf`). This module, `attach` and the eBPF crate are the only
//! places that touch the kernel boundary.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
};

use ambassador_ebpf::{
    filter_index, Backend, Counters, Frontend, ReplyNat, Service, ServiceKey, Stat, BACKEND_SHARED,
    BACKEND_VALID, FILTER_BACKEND, FILTER_SERVICE, FILTER_SIZE, LAYOUT_VERSION, MAX_BACKENDS,
    MAX_FRONTENDS, MAX_REPLY_NAT, MAX_SERVICES, NO_BACKEND, STAT_COUNT, TABLE_SIZE,
};
use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap as BpfHashMap, Map, MapData, MapType, PerCpuArray},
    programs::{SchedClassifier, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};

use super::{
    attach::{self, AttachMode, Attachment, Program, TC_PROGRAM},
    Plan,
};
use crate::select::wire_addr;

/// The compiled eBPF object, embedded at build time.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ambassador-xdp"));

pub const PROGRAM: &str = "ambassador_xdp";
/// The same decisions for socket buffers (clsact ingress): see [`super::attach`].
pub const PROGRAM_TC: &str = TC_PROGRAM;
/// The program that reads the kernel's jiffies for userspace (test-run, never attached).
pub const CLOCK_PROBE: &str = "clock_probe";

/// Names of the maps, as pinned under the pin directory.
pub const MAPS: [&str; 10] = [
    "SERVICES",
    "BACKENDS",
    "RINGS",
    "FLOWS",
    "FLOOD_FLOWS",
    "REPLY_NAT",
    "XDP_EGRESS",
    "ADDR_FILTER",
    "BACKEND_STATS",
    "GLOBAL_STATS",
];

/// Maps a restarted daemon adopts from the pin directory instead of creating: the connection
/// and flood tables, the address filter and the backends' service addresses (replies of flows
/// to removed backends still need both) and the counters. `SERVICES`, `BACKENDS` and `RINGS`
/// are built fresh beside the live ones and take over with the new program in one atomic link
/// update.
pub const ADOPTED: [&str; 6] = [
    "FLOWS",
    "FLOOD_FLOWS",
    "REPLY_NAT",
    "ADDR_FILTER",
    "BACKEND_STATS",
    "GLOBAL_STATS",
];

/// The kernel's view of an adopted map: (type, key size, value size, max entries).
fn adopted_layout(name: &str) -> (MapType, u32, u32, u32) {
    use std::mem::size_of;
    match name {
        "FLOWS" => (
            MapType::LruHash,
            size_of::<ambassador_ebpf::FlowKey>() as u32,
            size_of::<ambassador_ebpf::Flow>() as u32,
            ambassador_ebpf::FLOW_TABLE_SIZE,
        ),
        "FLOOD_FLOWS" => (
            MapType::LruHash,
            size_of::<ambassador_ebpf::FlowKey>() as u32,
            size_of::<ambassador_ebpf::Flow>() as u32,
            flood_table_size(ambassador_ebpf::FLOW_TABLE_SIZE),
        ),
        "REPLY_NAT" => (
            MapType::Hash,
            size_of::<ServiceKey>() as u32,
            size_of::<ReplyNat>() as u32,
            MAX_REPLY_NAT,
        ),
        "ADDR_FILTER" => (MapType::Array, 4, 4, FILTER_SIZE),
        "BACKEND_STATS" => (
            MapType::PerCpuArray,
            4,
            size_of::<Counters>() as u32,
            MAX_BACKENDS,
        ),
        "GLOBAL_STATS" => (MapType::PerCpuArray, 4, 8, STAT_COUNT),
        _ => unreachable!("{name} is not adopted"),
    }
}

/// The marker directory naming the layout of the maps pinned beside it.
fn layout_marker(dir: &Path) -> PathBuf {
    dir.join(format!("layout-{LAYOUT_VERSION}"))
}

/// What a daemon found in its pin directory at start.
#[derive(Debug, Default, Clone, Copy)]
pub struct Adoption {
    /// The connection table (and counters) of a previous daemon were adopted.
    pub adopted: bool,
    /// Entries in the adopted connection table (one per flow, two for a shared backend).
    pub flows: usize,
}

/// Refuse maps this binary would misread: another layout version, or another shape. The
/// connection table's size when there is one to adopt (any size is adoptable).
pub fn check_adoptable(dir: &Path) -> Result<Option<u32>> {
    let present: Vec<&str> = ADOPTED
        .iter()
        .copied()
        .filter(|n| dir.join(n).exists())
        .collect();
    if present.is_empty() {
        return Ok(None);
    }
    let fix = format!(
        "run `ambassador detach --pin-dir {}` to remove them (connections open through XDP are \
         then dropped), or run the ambassador binary that pinned them",
        dir.display()
    );
    if !layout_marker(dir).exists() {
        let found: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .filter(|n| n.starts_with("layout-"))
                    .collect()
            })
            .unwrap_or_default();
        bail!(
            "the maps pinned in {} have map layout {}, and this binary uses layout {LAYOUT_VERSION}: \
             it cannot adopt their tracked flows. {fix}",
            dir.display(),
            if found.is_empty() {
                "unknown (no layout marker)".to_string()
            } else {
                found.join(", ")
            }
        );
    }
    let mut flows_size = None;
    for name in present {
        let path = dir.join(name);
        let info = MapData::from_pin(&path)
            .and_then(|d| d.info())
            .with_context(|| format!("reading pinned map {}", path.display()))?;
        let (ty, key, value, mut max) = adopted_layout(name);
        if name == "FLOWS" {
            // The connection table's size is the operator's choice (--flow-table-size).
            max = info.max_entries();
            flows_size = Some(max);
        }
        if name == "FLOOD_FLOWS" {
            // Sized from the connection table (checked in ADOPTED order, FLOWS first).
            max = flood_table_size(flows_size.unwrap_or(ambassador_ebpf::FLOW_TABLE_SIZE));
        }
        let have = (
            info.map_type().ok(),
            info.key_size(),
            info.value_size(),
            info.max_entries(),
        );
        if have != (Some(ty), key, value, max) {
            bail!(
                "pinned map {} is {:?} with key {} B, value {} B, {} entries; this binary needs \
                 {ty:?} with key {key} B, value {value} B, {max} entries. {fix}",
                path.display(),
                have.0,
                have.1,
                have.2,
                have.3
            );
        }
    }
    Ok(flows_size.or(Some(ambassador_ebpf::FLOW_TABLE_SIZE)))
}

/// Remove everything a daemon pinned under `dir`: its attachments (which takes the programs
/// off their interfaces), maps and the layout marker. Returns what was removed.
pub fn detach(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    // Attachments first, so no program runs on maps being removed.
    entries.sort_by_key(|p| {
        !p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("link-"))
    });
    for p in entries {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if attach::remove(dir, name)?.is_some() {
            removed.push(p);
            continue;
        }
        let ours = name.starts_with("prog-") || name.starts_with("layout-") || MAPS.contains(&name);
        if !ours {
            continue;
        }
        let r = if p.is_dir() {
            std::fs::remove_dir(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.with_context(|| format!("removing {}", p.display()))?;
        removed.push(p);
    }
    let _ = std::fs::remove_dir(dir);
    Ok(removed)
}

/// Identity of a backend in the kernel: a new address is a new backend id, so flows tracked to
/// the old address keep their (stored) destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BackendIdentity {
    service: String,
    id: String,
    address: SocketAddr,
}

#[derive(Debug, Clone)]
struct LiveService {
    id: u32,
    key: ServiceKey,
    ring: u32,
}

/// Ids the kernel knows a plan by; what `status` reads back.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Ids {
    /// service name → service id
    pub services: Vec<(String, u32)>,
    /// (service name, backend name) → backend id
    pub backends: Vec<(String, String, u32)>,
}

pub struct KernelDataplane {
    ebpf: Ebpf,
    links: Vec<Attachment>,
    /// Interfaces already warned about XDP on a veth.
    warned_veth: HashSet<String>,
    services: HashMap<String, LiveService>,
    backends: HashMap<BackendIdentity, u32>,
    /// What each ring holds, so a reload writes only the slots that change.
    rings: HashMap<u32, Vec<u32>>,
    /// Backend-address filter bits are never cleared: flows to a removed backend still need
    /// their replies translated until they end.
    backend_filter: HashSet<u32>,
    filter: Vec<u32>,
    /// What each `BACKENDS` slot was last written with, so unchanged ones are not rewritten.
    written_backends: HashMap<u32, Backend>,
    /// What `REPLY_NAT` holds: each backend address:port's service addresses. Kept after a
    /// backend leaves a service (its flows' replies still need it) until the table is full.
    reply_nat: HashMap<ServiceKey, ReplyNat>,
    pinned: Option<PathBuf>,
    /// Ids a previous daemon gave services and backends: reused so adopted flows' counters
    /// and the tables stay consistent across a restart.
    preferred: Ids,
}

/// `BPF_MAP_UPDATE_BATCH` of u32 keys and values into an array map (aya 0.14 has no batch
/// API). Fails as a whole on kernels without it; the caller then writes element by element.
fn update_batch(map: &MapData, keys: &[u32], values: &[u32]) -> std::io::Result<()> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    if keys.is_empty() {
        return Ok(());
    }
    /// `union bpf_attr`'s `batch` member (include/uapi/linux/bpf.h).
    #[repr(C)]
    #[derive(Default)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: the attr points at `keys`/`values`, live and of `count` u32 elements each (the
    // map's key and value size) for the duration of the call; the kernel only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if attr.count as usize != keys.len() {
        return Err(std::io::Error::other("partial batch update"));
    }
    Ok(())
}

/// A free id: `preferred` when it is free, else the lowest free one from `next`.
fn take_id(
    used: &mut HashSet<u32>,
    next: &mut u32,
    preferred: Option<u32>,
    max: u32,
    what: &str,
) -> Result<u32> {
    if let Some(p) = preferred.filter(|p| *p < max && !used.contains(p)) {
        used.insert(p);
        return Ok(p);
    }
    while used.contains(next) {
        *next += 1;
    }
    if *next >= max {
        bail!("no free {what} slot in the kernel (max {max})");
    }
    used.insert(*next);
    Ok(*next)
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Map> {
    ebpf.map_mut(name).with_context(|| map_err(name))
}

fn map_err(name: &str) -> String {
    format!("the eBPF object has no map {name}: the binary and its eBPF program are out of step")
}

impl KernelDataplane {
    /// Load the program and its maps into the kernel (the verifier runs here).
    pub fn load() -> Result<KernelDataplane> {
        Self::load_with(
            &mut EbpfLoader::new(),
            ambassador_ebpf::FLOW_TABLE_SIZE,
            None,
        )
    }

    /// Load with the caller's loader settings (the benchmark sizes its own maps this way), a
    /// connection table of `flows` entries, and the new flows each CPU may start per tick
    /// before new flows go to the flood table (default: [`flood_inserts_per_tick`]).
    pub fn load_with_loader(
        loader: &mut EbpfLoader,
        flows: u32,
        flood_limit: Option<u32>,
    ) -> Result<KernelDataplane> {
        Self::load_with(loader, flows, flood_limit)
    }

    /// Load with every map pinned under `dir`, adopting the connection table and counters a
    /// previous daemon left there (after checking their layout), so a restart keeps every
    /// tracked flow. `attach` then replaces the pinned program atomically.
    ///
    /// `flow_table_size` sizes a new connection table; an adopted one keeps its size (a
    /// warning says so when they differ).
    pub fn load_pinned(dir: &Path, flow_table_size: u32) -> Result<(KernelDataplane, Adoption)> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating pin directory {}", dir.display()))?;
        let pinned_size = check_adoptable(dir)?;
        let adopt = pinned_size.is_some();
        let size = match pinned_size {
            Some(p) if p != flow_table_size => {
                tracing::warn!(
                    "the pinned connection table holds {p} entries, not {flow_table_size}: it is adopted as it is; the new size takes effect after `ambassador detach`"
                );
                p
            }
            Some(p) => p,
            None => flow_table_size,
        };
        let paths: Vec<(&str, PathBuf)> = ADOPTED.iter().map(|&n| (n, dir.join(n))).collect();
        let mut loader = EbpfLoader::new();
        loader.map_max_entries("FLOWS", size);
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut dp = Self::load_with(&mut loader, size, None)?;
        std::fs::create_dir_all(layout_marker(dir))
            .with_context(|| format!("creating {}", layout_marker(dir).display()))?;
        // The fresh tables replace the old pins (the running program keeps its own references).
        for name in MAPS.iter().filter(|n| !ADOPTED.contains(n)) {
            let path = dir.join(name);
            let _ = std::fs::remove_file(&path);
            dp.ebpf
                .map(name)
                .with_context(|| map_err(name))?
                .pin(&path)
                .with_context(|| format!("pinning map {name} at {}", path.display()))?;
        }
        // The program too, so bpftool and operators see what runs (the pinned links keep it
        // attached either way); a restart pins its own program over the old one's.
        let prog_pin = dir.join(format!("prog-{PROGRAM}"));
        let _ = std::fs::remove_file(&prog_pin);
        dp.program()
            .pin(&prog_pin)
            .with_context(|| format!("pinning the XDP program at {}", prog_pin.display()))?;
        let tc_pin = dir.join(format!("prog-{PROGRAM_TC}"));
        let _ = std::fs::remove_file(&tc_pin);
        dp.tc_program()
            .pin(&tc_pin)
            .with_context(|| format!("pinning the TC program at {}", tc_pin.display()))?;
        // And the clock probe, so `status` reads flow ages in the program's clock.
        let probe_pin = dir.join(format!("prog-{CLOCK_PROBE}"));
        let _ = std::fs::remove_file(&probe_pin);
        dp.clock_probe()
            .pin(&probe_pin)
            .with_context(|| format!("pinning the clock probe at {}", probe_pin.display()))?;
        dp.pinned = Some(dir.to_owned());
        let mut adoption = Adoption::default();
        if adopt {
            // Filter bits set by the previous daemon stay set (they are never cleared).
            let arr: Array<_, u32> =
                Array::try_from(dp.ebpf.map("ADDR_FILTER").context(map_err("ADDR_FILTER"))?)?;
            for i in 0..FILTER_SIZE {
                let v = arr.get(&i, 0).context("reading ADDR_FILTER")?;
                dp.filter[i as usize] = v;
                if v & FILTER_BACKEND != 0 {
                    dp.backend_filter.insert(i);
                }
            }
            let m: BpfHashMap<_, ServiceKey, ReplyNat> =
                BpfHashMap::try_from(dp.ebpf.map("REPLY_NAT").context(map_err("REPLY_NAT"))?)?;
            for r in m.iter() {
                let (k, v) = r.context("reading REPLY_NAT")?;
                dp.reply_nat.insert(k, v);
            }
            adoption = Adoption {
                adopted: true,
                flows: dp.flow_entries()?,
            };
        }
        Ok((dp, adoption))
    }

    /// Prefer these ids for services and backends not yet live (a previous daemon's).
    pub fn prefer_ids(&mut self, ids: Ids) {
        self.preferred = ids;
    }

    fn load_with(
        loader: &mut EbpfLoader,
        flows: u32,
        flood_limit: Option<u32>,
    ) -> Result<KernelDataplane> {
        raise_memlock_limit();
        loader.map_max_entries("FLOWS", flows);
        loader.map_max_entries("FLOOD_FLOWS", flood_table_size(flows));
        // The program's aya-log statements write only when they would be shown: at debug for
        // its target (`RUST_LOG=ambassador=debug`), nothing otherwise.
        static DEBUG: u8 = 4; // aya_log_common::Level::Debug
        static OFF: u8 = 0;
        let level = if tracing::enabled!(target: "ambassador::xdp", tracing::Level::DEBUG) {
            &DEBUG
        } else {
            &OFF
        };
        loader.override_global("AYA_LOG_LEVEL", level, false);
        // Route-cache lifetime: one second of jiffies.
        loader.override_global("FIB_CACHE_JIFFIES", kernel_hz(), true);
        // New flows each CPU may start per tick before it is flooded (see FLOOD_FLOWS in the
        // program).
        // The loader borrows the value until it loads; four bytes leaked a load.
        let limit = flood_limit.unwrap_or_else(|| flood_inserts_per_tick(flows));
        let limit: &'static u32 = Box::leak(Box::new(limit));
        loader.override_global("FLOOD_INSERTS_PER_TICK", limit, true);
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(|e| {
            anyhow::anyhow!(
                "loading the eBPF object failed: {e} (needs root or CAP_BPF+CAP_NET_ADMIN, \
                 and a kernel with BPF and BTF)"
            )
        })?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .context("the eBPF object has no XDP program")?
            .try_into()?;
        prog.load()
            .map_err(|e| anyhow::anyhow!("the kernel rejected the XDP program: {e:#?}"))?;
        let tc: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM_TC)
            .context("the eBPF object has no TC program")?
            .try_into()?;
        tc.load()
            .map_err(|e| anyhow::anyhow!("the kernel rejected the TC program: {e:#?}"))?;
        let probe: &mut Xdp = ebpf
            .program_mut(CLOCK_PROBE)
            .context("the eBPF object has no clock probe")?
            .try_into()?;
        probe
            .load()
            .map_err(|e| anyhow::anyhow!("the kernel rejected the clock probe: {e:#?}"))?;
        Ok(KernelDataplane {
            ebpf,
            links: Vec::new(),
            warned_veth: HashSet::new(),
            services: HashMap::new(),
            backends: HashMap::new(),
            rings: HashMap::new(),
            backend_filter: HashSet::new(),
            filter: vec![0; FILTER_SIZE as usize],
            written_backends: HashMap::new(),
            reply_nat: HashMap::new(),
            pinned: None,
            preferred: Ids::default(),
        })
    }

    /// Read the program's log messages (aya-log) as they arrive on its ring buffer, in a task
    /// of the current tokio runtime; they go to `log`, which tracing-subscriber bridges into
    /// tracing (target `ambassador::xdp`). Once per object.
    pub fn spawn_log_reader(&mut self) -> Result<()> {
        let logger = aya_log::EbpfLogger::init(&mut self.ebpf)
            .map_err(|e| anyhow::anyhow!("the XDP program's log ring buffer: {e}"))?;
        // SAFETY: the AsyncFd owns the logger, which owns the ring buffer's fd: it stays open,
        // and is the same fd, for the AsyncFd's whole life.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        }
        .map_err(|e| anyhow::anyhow!("watching the XDP program's log ring buffer: {e}"))?;
        let mut fd = fd;
        tokio::spawn(async move {
            while let Ok(mut ready) = fd.readable_mut().await {
                ready.get_inner_mut().flush();
                ready.clear_ready();
            }
        });
        Ok(())
    }

    /// The loaded program, for `BPF_PROG_TEST_RUN` in tests and benchmarks.
    pub fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM)
            .expect("program present since load")
            .try_into()
            .expect("program is XDP")
    }

    /// The loaded TC program, for `BPF_PROG_TEST_RUN` in tests and benchmarks.
    pub fn tc_program(&mut self) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(PROGRAM_TC)
            .expect("program present since load")
            .try_into()
            .expect("program is SCHED_CLS")
    }

    /// The loaded clock probe.
    fn clock_probe(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(CLOCK_PROBE)
            .expect("probe present since load")
            .try_into()
            .expect("probe is XDP")
    }

    /// The program's flow clock now ([`ambassador_ebpf::fib_clock`] of jiffies).
    pub fn clock_now(&mut self) -> Result<u32> {
        read_jiffies(self.clock_probe()).map(ambassador_ebpf::fib_clock)
    }

    /// The loaded object, for benchmarks that load its helper programs.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Attach the program `mode` calls for to an interface: with [`AttachMode::Auto`], native
    /// XDP where the driver has it and the device is not a veth, TC otherwise. `xdp_mode`
    /// (None: the kernel chooses) applies to [`AttachMode::Xdp`].
    ///
    /// With a pin directory the attachment is pinned there so the program stays attached (and
    /// keeps forwarding) while no daemon runs; one a previous daemon pinned is taken over by
    /// replacing its program atomically, so no packet sees the interface without one.
    pub fn attach(
        &mut self,
        iface: &str,
        mode: AttachMode,
        xdp_mode: Option<XdpMode>,
    ) -> Result<Program> {
        check_interface(iface)?;
        let dir = self.pinned.clone();
        let veth = attach::driver(iface).as_deref() == Some("veth");
        let program = match mode {
            AttachMode::Tc => Program::Tc,
            AttachMode::Xdp => Program::Xdp,
            AttachMode::Auto if veth => Program::Tc,
            AttachMode::Auto => {
                self.allow_xdp_egress(iface)?;
                match attach::attach_xdp(self.program(), iface, XdpMode::Driver, dir.as_deref()) {
                    Ok(()) => {
                        self.links.push(Attachment {
                            interface: iface.to_string(),
                            program: Program::Xdp,
                        });
                        return Ok(Program::Xdp);
                    }
                    Err(e) => {
                        self.forbid_xdp_egress(iface)?;
                        tracing::info!(
                            "{iface}: no native XDP ({e:#}); attaching the TC program instead of generic XDP"
                        );
                        Program::Tc
                    }
                }
            }
        };
        match program {
            Program::Xdp => {
                if veth && self.warned_veth.insert(iface.to_string()) {
                    tracing::warn!(
                        "{iface} is a veth: XDP on it forwards only what its peer can take. The \
                         peer needs GRO on (`ethtool -K PEER gro on`), or redirected frames are \
                         dropped, and TX checksum offload off (`ethtool -K PEER tx off`), or \
                         what it sends (CHECKSUM_PARTIAL) is forwarded with a wrong checksum. \
                         `--attach auto` (or tc) runs the TC program, which needs neither"
                    );
                }
                // Before the program is: a program taking over a pinned link must find it.
                self.allow_xdp_egress(iface)?;
                attach::attach_xdp(
                    self.program(),
                    iface,
                    xdp_mode.unwrap_or_default(),
                    dir.as_deref(),
                )?
            }
            Program::Tc => attach::attach_tc(self.tc_program(), iface, dir.as_deref())?,
        }
        self.links.push(Attachment {
            interface: iface.to_string(),
            program,
        });
        Ok(program)
    }

    /// Let the XDP program redirect packets to `iface` (`XDP_EGRESS`): it has the XDP program,
    /// so its driver takes XDP frames. Toward other interfaces XDP lets the stack forward.
    pub fn allow_xdp_egress(&mut self, iface: &str) -> Result<()> {
        let idx = ifindex(iface)?;
        let mut m: BpfHashMap<_, u32, u32> =
            BpfHashMap::try_from(map_mut(&mut self.ebpf, "XDP_EGRESS")?)?;
        m.insert(idx, 1, 0)
            .with_context(|| format!("adding {iface} to XDP_EGRESS"))
    }

    fn forbid_xdp_egress(&mut self, iface: &str) -> Result<()> {
        let idx = ifindex(iface)?;
        let mut m: BpfHashMap<_, u32, u32> =
            BpfHashMap::try_from(map_mut(&mut self.ebpf, "XDP_EGRESS")?)?;
        let _ = m.remove(&idx);
        Ok(())
    }

    /// Detach what a previous daemon pinned and this one does not use any more: interfaces no
    /// longer configured, and the other program on an interface that changed programs.
    pub fn release_other_links(&self) -> Result<Vec<Attachment>> {
        let Some(dir) = &self.pinned else {
            return Ok(Vec::new());
        };
        let mut released = Vec::new();
        for e in std::fs::read_dir(dir)?.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(a) = attach::pinned(&name) else {
                continue;
            };
            if !self.links.contains(&a) {
                attach::remove(dir, &name)?;
                released.push(a);
            }
        }
        Ok(released)
    }

    /// Attach the connect-time ambassador (`connect4/6`, `getpeername4/6`) to a cgroup v2
    /// directory. The links live as long as this object.
    pub fn attach_connect_time(&mut self, cgroup: &Path) -> Result<()> {
        use aya::programs::{CgroupAttachMode, CgroupSockAddr};
        for name in [
            "ambassador_connect4",
            "ambassador_getpeername4",
            "ambassador_connect6",
            "ambassador_getpeername6",
            "ambassador_sendmsg4",
            "ambassador_recvmsg4",
            "ambassador_sendmsg6",
            "ambassador_recvmsg6",
        ] {
            let dir = std::fs::File::open(cgroup)
                .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()?;
            if prog.fd().is_err() {
                prog.load().map_err(|e| {
                    anyhow::anyhow!(
                        "loading {name}: {e} (cgroup sock_addr BPF needs CONFIG_CGROUP_BPF)"
                    )
                })?;
            }
            prog.attach(dir, CgroupAttachMode::Single).map_err(|e| {
                anyhow::anyhow!(
                    "attaching {name} to {}: {e} (it must be a cgroup v2 directory; mount one with `mount -t cgroup2 none DIR`)",
                    cgroup.display()
                )
            })?;
        }
        Ok(())
    }

    /// Where each program is attached.
    pub fn attachments(&self) -> Vec<Attachment> {
        self.links.clone()
    }

    /// Program a plan. Every table is written beside the live one and switched with a single
    /// `SERVICES` update, so no packet ever sees a half-written table; flows already tracked keep
    /// their backend whatever the plan says.
    pub fn apply(&mut self, plan: &Plan) -> Result<Ids> {
        // 1. Ids: keep existing ones, take new ones from those free in both old and new plans.
        let mut used_svc: HashSet<u32> = self.services.values().map(|s| s.id).collect();
        let mut used_be: HashSet<u32> = self.backends.values().copied().collect();
        let mut svc_ids = Vec::new();
        let mut be_ids: Vec<Vec<u32>> = Vec::new();
        let mut next_svc = 0u32;
        let mut next_be = 0u32;
        for s in &plan.services {
            let id = match self.services.get(&s.name) {
                Some(l) => l.id,
                None => {
                    let pref = self
                        .preferred
                        .services
                        .iter()
                        .find(|(n, _)| n == &s.name)
                        .map(|&(_, id)| id);
                    take_id(&mut used_svc, &mut next_svc, pref, MAX_SERVICES, "service")?
                }
            };
            svc_ids.push(id);
            let mut ids = Vec::new();
            for b in &s.backends {
                let ident = BackendIdentity {
                    service: s.name.clone(),
                    id: b.id(),
                    address: b.address,
                };
                let id = match self.backends.get(&ident) {
                    Some(&id) => id,
                    None => {
                        let pref = self
                            .preferred
                            .backends
                            .iter()
                            .find(|(sn, bn, _)| sn == &s.name && bn == &ident.id)
                            .map(|&(_, _, id)| id);
                        take_id(&mut used_be, &mut next_be, pref, MAX_BACKENDS, "backend")?
                    }
                };
                ids.push(id);
            }
            be_ids.push(ids);
        }

        // 2. Each backend address:port's service addresses, which replies are found by, before
        //    any table can send a flow there; then the backends the new tables point at.
        self.program_reply_nat(plan)?;
        {
            let mut backends: Array<_, Backend> =
                Array::try_from(map_mut(&mut self.ebpf, "BACKENDS")?)?;
            for (s, ids) in plan.services.iter().zip(&be_ids) {
                for (b, &id) in s.backends.iter().zip(ids) {
                    let ep = endpoint_key(b.address, s.listen.proto.number());
                    let shared = self
                        .reply_nat
                        .get(&ep)
                        .is_some_and(|r| r.flags & BACKEND_SHARED as u32 != 0);
                    let v = Backend {
                        addr: ep.addr,
                        port: ep.port,
                        family: ep.family,
                        flags: BACKEND_VALID | if shared { BACKEND_SHARED } else { 0 },
                    };
                    let addr = ep.addr;
                    // Only what changed: a set-weight rewrites no backend.
                    if self.written_backends.get(&id) != Some(&v) {
                        backends.set(id, v, 0).context("writing BACKENDS")?;
                        self.written_backends.insert(id, v);
                    }
                    self.backend_filter.insert(filter_index(&addr));
                }
            }
        }

        // 3. Tables, each into its service's idle ring.
        let mut new_live = HashMap::new();
        for ((s, &id), ids) in plan.services.iter().zip(&svc_ids).zip(&be_ids) {
            let ring = match self.services.get(&s.name) {
                Some(l) if l.id == id => l.ring ^ 1,
                _ => 2 * id,
            };
            let want: Vec<u32> = s
                .selector
                .table
                .slots
                .iter()
                .map(|&m| {
                    if m == NO_BACKEND {
                        NO_BACKEND
                    } else {
                        ids[m as usize]
                    }
                })
                .collect();
            self.write_ring(ring, want)?;
            let (addr, family) = wire_addr(s.listen.addr.ip());
            let key = ServiceKey {
                addr,
                port: ambassador_ebpf::wire_port(s.listen.addr.port()),
                proto: s.listen.proto.number(),
                family,
            };
            new_live.insert(s.name.clone(), LiveService { id, key, ring });
        }

        // 4. The address pre-filter: set bits before the services appear.
        let mut filter = vec![0u32; FILTER_SIZE as usize];
        for &i in &self.backend_filter {
            filter[i as usize] |= FILTER_BACKEND;
        }
        for l in new_live.values() {
            filter[filter_index(&l.key.addr) as usize] |= FILTER_SERVICE;
        }
        {
            let old = self.filter.clone();
            let mut arr: Array<_, u32> = Array::try_from(map_mut(&mut self.ebpf, "ADDR_FILTER")?)?;
            for (i, (&n, &o)) in filter.iter().zip(&old).enumerate() {
                if n | o != o {
                    arr.set(i as u32, n | o, 0).context("writing ADDR_FILTER")?;
                }
            }
        }

        // 5. The switch: one SERVICES update per service.
        {
            let mut services: BpfHashMap<_, ServiceKey, Service> =
                BpfHashMap::try_from(map_mut(&mut self.ebpf, "SERVICES")?)?;
            for (s, l) in plan.services.iter().map(|s| (s, &new_live[&s.name])) {
                let v = Service {
                    id: l.id,
                    ring: l.ring,
                    seed: s.selector.seed,
                    key_mode: s.selector.key_mode,
                    flags: if s.userspace {
                        ambassador_ebpf::SERVICE_PASS_TO_STACK
                    } else {
                        0
                    } | if s.connect_time {
                        ambassador_ebpf::SERVICE_CONNECT_TIME
                    } else {
                        0
                    },
                };
                services.insert(l.key, v, 0).context("writing SERVICES")?;
            }
            // Services that moved address or went away.
            for (name, old) in &self.services {
                match new_live.get(name) {
                    Some(n) if n.key == old.key => {}
                    _ => {
                        if !new_live.values().any(|n| n.key == old.key) {
                            let _ = services.remove(&old.key);
                        }
                    }
                }
            }
        }

        // 6. The exact filter, now that removed services are gone: clear the bits only the old
        //    filter had (step 4 left every entry at old | new).
        {
            let mut arr: Array<_, u32> = Array::try_from(map_mut(&mut self.ebpf, "ADDR_FILTER")?)?;
            for (i, (&n, &o)) in filter.iter().zip(&self.filter).enumerate() {
                if n | o != n {
                    arr.set(i as u32, n, 0).context("writing ADDR_FILTER")?;
                }
            }
        }
        self.filter = filter;

        // 7. Backends no table points at any more: free their slots (tracked flows keep their
        //    stored destination, so they are unaffected).
        let mut new_backends = HashMap::new();
        for (s, ids) in plan.services.iter().zip(&be_ids) {
            for (b, &id) in s.backends.iter().zip(ids) {
                new_backends.insert(
                    BackendIdentity {
                        service: s.name.clone(),
                        id: b.id(),
                        address: b.address,
                    },
                    id,
                );
            }
        }
        {
            let keep: HashSet<u32> = new_backends.values().copied().collect();
            let mut backends: Array<_, Backend> =
                Array::try_from(map_mut(&mut self.ebpf, "BACKENDS")?)?;
            for (_, &id) in self.backends.iter() {
                if !keep.contains(&id) {
                    backends.set(id, Backend::default(), 0)?;
                    self.written_backends.remove(&id);
                }
            }
        }
        // Rings of removed services are dropped from the cache (they are rewritten in full if
        // the id is reused).
        let live_ids: HashSet<u32> = new_live.values().map(|l| l.id).collect();
        self.rings.retain(|r, _| live_ids.contains(&(r / 2)));
        self.backends = new_backends;
        self.services = new_live;

        Ok(Ids {
            services: plan
                .services
                .iter()
                .zip(&svc_ids)
                .map(|(s, &id)| (s.name.clone(), id))
                .collect(),
            backends: plan
                .services
                .iter()
                .zip(&be_ids)
                .flat_map(|(s, ids)| {
                    s.backends
                        .iter()
                        .zip(ids)
                        .map(|(b, &id)| (s.name.clone(), b.id(), id))
                })
                .collect(),
        })
    }

    fn write_ring(&mut self, ring: u32, want: Vec<u32>) -> Result<()> {
        let have = self.rings.remove(&ring);
        let base = ring * TABLE_SIZE;
        let (keys, values): (Vec<u32>, Vec<u32>) = want
            .iter()
            .enumerate()
            .filter(|(slot, &v)| have.as_ref().map(|h| h[*slot]) != Some(v))
            .map(|(slot, &v)| (base + slot as u32, v))
            .unzip();
        let map = map_mut(&mut self.ebpf, "RINGS")?;
        // One BPF_MAP_UPDATE_BATCH instead of a syscall per slot (a weight change moves
        // thousands); element by element where the kernel lacks it (before 5.6).
        let batched = match map {
            Map::Array(d) => update_batch(d, &keys, &values).is_ok(),
            _ => false,
        };
        if !batched {
            let mut rings: Array<_, u32> = Array::try_from(map)?;
            for (&k, &v) in keys.iter().zip(&values) {
                rings.set(k, v, 0).context("writing RINGS")?;
            }
        }
        self.rings.insert(ring, want);
        Ok(())
    }

    /// Add each backend's service address to its `REPLY_NAT` entry. Entries are kept after a
    /// backend leaves a service, so replies of its live flows are still found; when the map
    /// would overflow, entries no configured backend and no tracked flow uses are dropped.
    fn program_reply_nat(&mut self, plan: &Plan) -> Result<()> {
        let mut want = self.reply_nat.clone();
        let mut configured = HashSet::new();
        for s in &plan.services {
            let (addr, _) = wire_addr(s.listen.addr.ip());
            let fe = Frontend {
                addr,
                port: ambassador_ebpf::wire_port(s.listen.addr.port()),
                _pad: 0,
            };
            for b in &s.backends {
                let ep = endpoint_key(b.address, s.listen.proto.number());
                configured.insert(ep);
                let r = want.entry(ep).or_default();
                let n = r.count as usize;
                if r.frontends[..n].contains(&fe) {
                    continue;
                }
                if n < MAX_FRONTENDS {
                    r.frontends[n] = fe;
                    r.count += 1;
                } else {
                    r.flags |= BACKEND_SHARED as u32;
                }
            }
        }
        if want.len() > MAX_REPLY_NAT as usize {
            let used = self.flow_endpoints()?;
            want.retain(|k, _| configured.contains(k) || used.contains(k));
            if want.len() > MAX_REPLY_NAT as usize {
                bail!(
                    "{} backend address:port pairs are configured or have live flows; the kernel holds {MAX_REPLY_NAT}",
                    want.len()
                );
            }
        }
        let mut m: BpfHashMap<_, ServiceKey, ReplyNat> =
            BpfHashMap::try_from(map_mut(&mut self.ebpf, "REPLY_NAT")?)?;
        for k in self.reply_nat.keys().filter(|k| !want.contains_key(k)) {
            let _ = m.remove(k);
        }
        for (k, v) in &want {
            if self.reply_nat.get(k) != Some(v) {
                m.insert(k, v, 0).context("writing REPLY_NAT")?;
            }
        }
        self.reply_nat = want;
        Ok(())
    }

    /// The backend address:port pairs tracked flows point at (walks both flow tables).
    fn flow_endpoints(&self) -> Result<HashSet<ServiceKey>> {
        use ambassador_ebpf::{Flow, FlowKey, FLOW_FORWARD};
        let mut used = HashSet::new();
        for name in ["FLOWS", "FLOOD_FLOWS"] {
            let m = self.ebpf.map(name).with_context(|| map_err(name))?;
            let flows: BpfHashMap<_, FlowKey, Flow> = BpfHashMap::try_from(m)?;
            for (k, f) in flows.iter().filter_map(|r| r.ok()) {
                if f.direction == FLOW_FORWARD {
                    used.insert(ServiceKey {
                        addr: f.nat_addr,
                        port: f.nat_port,
                        proto: k.proto,
                        family: k.family,
                    });
                }
            }
        }
        Ok(used)
    }

    pub fn stats(&self) -> Result<Stats> {
        Stats::read(|name| {
            self.ebpf
                .map(name)
                .with_context(|| map_err(name))
                .and_then(clone_map)
        })
    }

    /// Number of tracked flow entries (one per flow, two for a shared backend); walks the whole table.
    pub fn flow_entries(&self) -> Result<usize> {
        let m = self.ebpf.map("FLOWS").with_context(|| map_err("FLOWS"))?;
        let flows: BpfHashMap<_, ambassador_ebpf::FlowKey, ambassador_ebpf::Flow> =
            BpfHashMap::try_from(m)?;
        Ok(flows.keys().filter(|k| k.is_ok()).count())
    }

    /// Every tracked entry's last-seen stamp ([`ambassador_ebpf::seen_clock`] ticks).
    pub fn flow_stamps(&self) -> Result<Vec<u32>> {
        let m = self.ebpf.map("FLOWS").with_context(|| map_err("FLOWS"))?;
        let flows: BpfHashMap<_, ambassador_ebpf::FlowKey, ambassador_ebpf::Flow> =
            BpfHashMap::try_from(m)?;
        Ok(flows
            .iter()
            .filter_map(|r| r.ok())
            .map(|(_, f)| f.last_seen)
            .collect())
    }
}

/// Maps are read through a fresh handle (a pinned one in `status`, the loader's own in the
/// daemon); this reopens a map by id so both paths share one reader.
fn clone_map(m: &Map) -> Result<Map> {
    let info = match m {
        Map::PerCpuArray(d) | Map::Array(d) | Map::HashMap(d) | Map::LruHashMap(d) => d.info()?,
        _ => bail!("unexpected map type"),
    };
    let data = MapData::from_id(info.id())?;
    Ok(Map::from_map_data(data)?)
}

/// Kernel counters, summed over CPUs (a service's totals are the sums of its backends').
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Stats {
    pub backends: Vec<Counters2>,
    pub global: Vec<(String, u64)>,
}

/// [`Counters`] in a serde-friendly form.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Counters2 {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

pub const STAT_NAMES: [(Stat, &str); STAT_COUNT as usize] = [
    (Stat::PassNotOurs, "pass_not_ours"),
    (Stat::PassUnparsed, "pass_unparsed"),
    (Stat::PassFragment, "pass_fragment"),
    (Stat::PassToStack, "pass_to_stack"),
    (Stat::NatThenStack, "nat_then_stack"),
    (Stat::Forwarded, "forwarded"),
    (Stat::NewFlow, "new_flow"),
    (Stat::ReverseNat, "reverse_nat"),
    (Stat::IcmpTranslated, "icmp_translated"),
    (Stat::NoBackend, "no_backend"),
    (Stat::FlowInsertFailed, "flow_insert_failed"),
    (Stat::FlowCacheFill, "flow_cache_fill"),
    (Stat::FlowReplaced, "flow_replaced"),
    (Stat::FloodDiverted, "flood_diverted"),
    (Stat::FlowRepicked, "flow_repicked"),
];

impl Stats {
    /// Read counters through `open(map name)`.
    pub fn read(open: impl Fn(&str) -> Result<Map>) -> Result<Stats> {
        let sum = |m: Map, n: u32| -> Result<Vec<Counters2>> {
            let arr: PerCpuArray<_, Counters> = PerCpuArray::try_from(m)?;
            (0..n)
                .map(|i| {
                    let v = arr.get(&i, 0)?;
                    Ok(v.iter().fold(Counters2::default(), |a, c| Counters2 {
                        packets: a.packets + c.packets,
                        bytes: a.bytes + c.bytes,
                        new_flows: a.new_flows + c.new_flows,
                    }))
                })
                .collect()
        };
        let backends = sum(open("BACKEND_STATS")?, MAX_BACKENDS)?;
        let g: PerCpuArray<_, u64> = PerCpuArray::try_from(open("GLOBAL_STATS")?)?;
        let global = STAT_NAMES
            .iter()
            .map(|(s, n)| Ok((n.to_string(), g.get(&(*s as u32), 0)?.iter().sum())))
            .collect::<Result<_>>()?;
        Ok(Stats { backends, global })
    }

    /// Read counters from maps pinned under `dir` by a running daemon.
    pub fn read_pinned(dir: &Path) -> Result<Stats> {
        Stats::read(|name| {
            let path = dir.join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("opening pinned map {}", path.display()))?;
            Ok(Map::from_map_data(data)?)
        })
    }

    pub fn global(&self, name: &str) -> u64 {
        self.global
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .unwrap_or(0)
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; lift it so maps fit.
fn raise_memlock_limit() {
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid pointer to a stack value; failure is harmless on ≥ 5.11.
    unsafe {
        libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim);
    }
}

/// `iface`'s index in this network namespace.
fn ifindex(iface: &str) -> Result<u32> {
    let c = std::ffi::CString::new(iface).context("interface name has a NUL byte")?;
    // SAFETY: if_nametoindex reads a valid C string; it resolves in our network namespace.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => bail!("interface {iface} does not exist (see `ip link show`); fix `interfaces:` or --interface"),
        i => Ok(i),
    }
}

/// Whether `iface` exists in this network namespace.
pub fn interface_exists(iface: &str) -> bool {
    ifindex(iface).is_ok()
}

/// Fail with a fix when `iface` does not exist in this network namespace.
pub fn check_interface(iface: &str) -> Result<()> {
    ifindex(iface).map(|_| ())
}

/// Checks that make `run` fail early with a fix instead of a kernel error code, and the bpf
/// filesystem the pins need: mounted where it is missing, as Cilium's agent does.
pub fn preflight(pin_dir: &Path) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "ambassador run needs root (or CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON): run it with sudo"
        );
    }
    let bpffs = pin_dir.parent().unwrap_or(Path::new("/sys/fs/bpf"));
    if !is_bpffs(bpffs) {
        std::fs::create_dir_all(bpffs)
            .with_context(|| format!("creating {} to mount bpffs on", bpffs.display()))?;
        nix::mount::mount(
            Some("bpf"),
            bpffs,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| {
            format!(
                "{} is not a bpf filesystem and mounting one there failed: mount it with `mount -t bpf bpf {}`",
                bpffs.display(),
                bpffs.display()
            )
        })?;
        tracing::info!("mounted a bpf filesystem at {}", bpffs.display());
        // A mount made in a mount namespace of our own (as `ip netns exec` gives, remounting
        // /sys and so hiding the host's bpffs) is seen only by this process.
        if private_mount_namespace() {
            tracing::warn!(
                "this process has a mount namespace of its own, without the host's bpf \
                 filesystem (as `ip netns exec` gives, remounting /sys): the pins under {} are \
                 seen only inside it, so pinned state will not outlive this process and a \
                 restart cannot adopt its flows. Enter the network namespace with `nsenter \
                 --net=/run/netns/NAME` instead, which keeps the host's mounts",
                pin_dir.display()
            );
        }
    }
    Ok(())
}

/// Whether this process's mount namespace differs from init's (pid 1's, where one can tell).
fn private_mount_namespace() -> bool {
    match (
        std::fs::read_link("/proc/self/ns/mnt"),
        std::fs::read_link("/proc/1/ns/mnt"),
    ) {
        (Ok(ours), Ok(init)) => ours != init,
        _ => false,
    }
}

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs with a valid C string and a zeroed out-struct.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// How long a TCP flow with no FIN or RST stays counted open without packets (Cilium's
/// established-TCP lifetime); a peer that vanished without closing leaves after this.
pub const TCP_IDLE_SECS: u64 = 6 * 3600;
/// How long a UDP flow stays counted open without packets.
pub const UDP_IDLE_SECS: u64 = 60;

/// The kernel's `HZ` (jiffies a second, the unit of the program's flow clocks): the resolution
/// of `CLOCK_MONOTONIC_COARSE` is one jiffy. 250 if the clock reports something implausible.
pub fn kernel_hz() -> &'static u32 {
    static HZ: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    HZ.get_or_init(|| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_getres writes the timespec we own.
        let rc = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
        let ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
        match ambassador_ebpf::hz_from_coarse_resolution(ns) {
            hz @ 24..=10_000 if rc == 0 => hz,
            _ => 250,
        }
    })
}

/// The kernel's jiffies, read by test-running the clock probe (userspace has no other exact
/// reading of the clock the program stamps flows with).
fn read_jiffies(probe: &Xdp) -> Result<u64> {
    use aya::programs::{TestRun as _, TestRunOptions};
    let pkt = [0u8; 64];
    let mut out = [0u8; 64];
    probe
        .test_run(TestRunOptions {
            data_in: Some(&pkt),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        })
        .context("test-running the clock probe (BPF_PROG_TEST_RUN)")?;
    Ok(u64::from_le_bytes(out[..8].try_into().expect("8 bytes")))
}

/// The flow clock now, from the clock probe pinned under `dir`, in [`ambassador_ebpf::seen_clock`]
/// ticks.
fn seen_now_pinned(dir: &Path) -> Result<u32> {
    let path = dir.join(format!("prog-{CLOCK_PROBE}"));
    let probe = Xdp::from_pin(&path, aya_obj::programs::XdpAttachType::Interface)
        .with_context(|| format!("opening the pinned clock probe {}", path.display()))?;
    let jiffies = read_jiffies(&probe)?;
    Ok(ambassador_ebpf::seen_clock(ambassador_ebpf::fib_clock(
        jiffies,
    )))
}

/// `REPLY_NAT`'s key for a backend address:port of a protocol.
fn endpoint_key(address: SocketAddr, proto: u8) -> ServiceKey {
    let (addr, family) = wire_addr(address.ip());
    ServiceKey {
        addr,
        port: ambassador_ebpf::wire_port(address.port()),
        proto,
        family,
    }
}

/// Entries of the flood table beside a connection table of `flows` entries: a quarter of it.
pub fn flood_table_size(flows: u32) -> u32 {
    (flows / 4).max(1024)
}

/// New flows each CPU may start in one tick before it is flooded (and sends new flows to the
/// flood table while it is): a quarter of the table over the possible CPUs, so a flood puts at
/// most a quarter of the table into it, at its start.
pub fn flood_inserts_per_tick(flows: u32) -> u32 {
    let cpus = aya::util::nr_cpus().map(|n| n.max(1)).unwrap_or(1) as u32;
    (flows / 4 / cpus).max(1)
}

/// Seconds to [`ambassador_ebpf::seen_clock`] ticks at `hz`.
fn seen_ticks(secs: u64, hz: u32) -> u32 {
    ((secs * hz as u64) >> ambassador_ebpf::SEEN_SHIFT) as u32
}

/// Open flows per backend address, from the connection table pinned under `dir`: forward
/// entries that saw no FIN or RST (the program marks those of either direction on the forward
/// entry) and had a packet within [`TCP_IDLE_SECS`] / [`UDP_IDLE_SECS`]. Walks the whole table
/// once, holding nothing but the counts.
pub fn open_flows_pinned(dir: &Path) -> Result<HashMap<SocketAddr, u64>> {
    use ambassador_ebpf::{Flow, FlowKey, FLOW_FORWARD};
    let now = seen_now_pinned(dir)?;
    let hz = *kernel_hz();
    let (tcp_idle, udp_idle) = (seen_ticks(TCP_IDLE_SECS, hz), seen_ticks(UDP_IDLE_SECS, hz));
    let mut open = HashMap::new();
    // Both tables: flows started during a flood live in the flood table.
    let mut maps = Vec::new();
    for name in ["FLOWS", "FLOOD_FLOWS"] {
        let path = dir.join(name);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        maps.push(Map::from_map_data(data)?);
    }
    for m in &maps {
        let flows: BpfHashMap<_, FlowKey, Flow> = BpfHashMap::try_from(m)?;
        for (k, f) in flows.iter().filter_map(|r| r.ok()) {
            if f.direction != FLOW_FORWARD || f.closing != 0 {
                continue;
            }
            let idle = if k.proto == ambassador_ebpf::PROTO_TCP {
                tcp_idle
            } else {
                udp_idle
            };
            if now.wrapping_sub(f.last_seen) > idle {
                continue;
            }
            let ip = unwire_addr(&f.nat_addr, k.family);
            let port = u16::from_be(f.nat_port);
            *open.entry(SocketAddr::new(ip, port)).or_insert(0) += 1;
        }
    }
    Ok(open)
}

/// An address as the maps hold it (wire words), back to an `IpAddr`.
fn unwire_addr(a: &[u32; 4], family: u8) -> std::net::IpAddr {
    if family == ambassador_ebpf::FAMILY_V4 {
        std::net::IpAddr::from(a[0].to_ne_bytes())
    } else {
        let mut o = [0u8; 16];
        for (i, w) in a.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        std::net::IpAddr::from(o)
    }
}
