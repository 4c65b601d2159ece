//! Which kernel program runs on which interface, and attaching it so that it outlives the
//! daemon: XDP on NICs with native XDP, TC (clsact ingress) on container veths and on drivers
//! without it. Both programs come from one object and share its maps.
//!
//! Why not XDP everywhere: frames a container (or any local socket) sends through a veth are
//! `CHECKSUM_PARTIAL`, which XDP cannot see, so its checksum update is wrong for them; and
//! frames redirected by XDP into a veth are dropped unless its peer has GRO or an XDP program.
//! The TC program updates checksums with the skb helpers and forwards socket buffers.
//!
//! Pins under the pin directory keep an attachment while no daemon runs:
//! - `link-xdp-IF`: an XDP BPF link (Linux ≥ 5.9);
//! - `link-tc-IF`: a TCX BPF link (Linux ≥ 6.6);
//! - `link-tcnl-IF` (a directory, as bpffs holds no files): a `cls_bpf` filter attached by
//!   netlink (older kernels), which the kernel keeps until it is removed; the directory says
//!   it is ours to replace or remove.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use aya::programs::{
    links::{FdLink, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    xdp::XdpLink,
    LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
};
use serde::{Deserialize, Serialize};

pub use crate::config::AttachMode;

/// The program attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Program {
    Xdp,
    Tc,
}

impl Program {
    pub fn label(self) -> &'static str {
        match self {
            Program::Xdp => "XDP",
            Program::Tc => "TC",
        }
    }
}

/// One interface and the program on it (what `status` shows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub interface: String,
    pub program: Program,
}

/// `XDP on eth0 · TC on veth1, veth2`.
pub fn describe(attachments: &[Attachment]) -> String {
    let mut parts = Vec::new();
    for p in [Program::Xdp, Program::Tc] {
        let ifs: Vec<&str> = attachments
            .iter()
            .filter(|a| a.program == p)
            .map(|a| a.interface.as_str())
            .collect();
        if !ifs.is_empty() {
            parts.push(format!("{} on {}", p.label(), ifs.join(", ")));
        }
    }
    parts.join(" · ")
}

/// The cls_bpf filter's place on clsact ingress: a fixed priority and handle, so a restarted
/// daemon finds and replaces the filter a previous one left.
const TC_PRIORITY: u16 = 0xa4b;
const TC_HANDLE: TcHandle = TcHandle::new(0, 1);
/// The TC program's name, as netlink lists the filter.
pub const TC_PROGRAM: &str = "ambassador_tc";

fn pin(dir: &Path, kind: &str, iface: &str) -> PathBuf {
    dir.join(format!("link-{kind}-{iface}"))
}

/// The driver of `iface` as ethtool reports it (`veth`, `virtio_net`, `mlx5_core`, ...).
pub fn driver(iface: &str) -> Option<String> {
    // struct ethtool_drvinfo: cmd, then driver[32], version[32], ... (196 bytes in all).
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    const ETHTOOL_GDRVINFO: u32 = 3;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    let name = iface.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    // SAFETY: all-zero is a valid ifreq; the name fits (checked above) and stays NUL-terminated;
    // the ioctl writes at most sizeof(ethtool_drvinfo) bytes into `info`, which outlives it.
    unsafe {
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(name) {
            *d = *s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let rc = libc::ioctl(fd, SIOCETHTOOL as _, &mut ifr);
        libc::close(fd);
        if rc != 0 {
            return None;
        }
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// Attach XDP to `iface` (pinned under `dir` when given), taking over a link a previous daemon
/// pinned by replacing its program atomically.
pub fn attach_xdp(prog: &mut Xdp, iface: &str, mode: XdpMode, dir: Option<&Path>) -> Result<()> {
    let Some(dir) = dir else {
        prog.attach(iface, mode)
            .with_context(|| format!("attaching XDP to {iface}"))?;
        return Ok(());
    };
    let pin = pin(dir, "xdp", iface);
    if pin.exists() {
        let replaced = PinnedLink::from_pin(&pin)
            .map_err(anyhow::Error::from)
            .and_then(|l| Ok(XdpLink::try_from(FdLink::from(l))?))
            .and_then(|l| Ok(prog.attach_to_link(l)?));
        match replaced {
            Ok(_) => return Ok(()),
            Err(e) => {
                // A link whose interface went away cannot be updated: start afresh.
                tracing::warn!(
                    "taking over the XDP link pinned for {iface} failed ({e:#}); attaching anew"
                );
                let _ = std::fs::remove_file(&pin);
            }
        }
    }
    let id = prog
        .attach(iface, mode)
        .with_context(|| format!("attaching XDP to {iface}"))?;
    let link = prog.take_link(id)?;
    match FdLink::try_from(link) {
        Ok(fd) => {
            fd.pin(&pin)
                .with_context(|| format!("pinning the XDP link at {}", pin.display()))?;
        }
        // Netlink attachments (kernels before 5.9) cannot be pinned; the program then
        // detaches when this process exits.
        Err(e) => bail!(
            "the kernel attached XDP to {iface} without a BPF link ({e}); a pinned, restartable attachment needs Linux 5.9 or later"
        ),
    }
    Ok(())
}

/// Whether the kernel has TCX (BPF links for TC, Linux 6.6).
fn has_tcx() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
}

/// Attach the TC program to `iface`'s clsact ingress (pinned under `dir` when given): a TCX
/// link where the kernel has it, else a cls_bpf filter at a fixed priority. Either way a
/// previous daemon's attachment is taken over by replacing its program, never removed first.
pub fn attach_tc(prog: &mut SchedClassifier, iface: &str, dir: Option<&Path>) -> Result<()> {
    if has_tcx() {
        return attach_tcx(prog, iface, dir);
    }
    // The clsact qdisc may be there already (ours from before, or a CNI's).
    if let Err(e) = tc::qdisc_add_clsact(iface) {
        let exists =
            matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST));
        if !exists {
            return Err(anyhow::Error::from(e))
                .with_context(|| format!("adding the clsact qdisc to {iface}"));
        }
    }
    let marker = dir.map(|d| pin(d, "tcnl", iface));
    let ours = marker.as_ref().is_some_and(|m| m.exists());
    let options = NlOptions {
        priority: TC_PRIORITY,
        handle: TC_HANDLE,
        ..Default::default()
    };
    let attached = if ours {
        let link = SchedClassifierLink::attached(
            iface,
            TcAttachType::Ingress,
            TC_PRIORITY,
            TC_HANDLE,
            None,
        )?;
        match prog.attach_to_link(link) {
            Ok(id) => Ok(id),
            Err(e) => {
                tracing::warn!("taking over the TC filter on {iface} failed ({e}); attaching anew");
                prog.attach_with_options(
                    iface,
                    TcAttachType::Ingress,
                    TcAttachOptions::Netlink(options),
                )
            }
        }
    } else {
        prog.attach_with_options(
            iface,
            TcAttachType::Ingress,
            TcAttachOptions::Netlink(options),
        )
    }
    .with_context(|| format!("attaching TC to {iface}"))?;
    if let Some(m) = marker {
        // The kernel keeps a netlink filter until it is removed: keep it past our exit.
        std::mem::forget(prog.take_link(attached)?);
        std::fs::create_dir_all(&m).with_context(|| format!("creating {}", m.display()))?;
    }
    Ok(())
}

fn attach_tcx(prog: &mut SchedClassifier, iface: &str, dir: Option<&Path>) -> Result<()> {
    let Some(dir) = dir else {
        prog.attach_with_options(
            iface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .with_context(|| format!("attaching TC to {iface}"))?;
        return Ok(());
    };
    let pin = pin(dir, "tc", iface);
    if pin.exists() {
        let replaced = PinnedLink::from_pin(&pin)
            .map_err(anyhow::Error::from)
            .and_then(|l| Ok(SchedClassifierLink::try_from(FdLink::from(l))?))
            .and_then(|l| Ok(prog.attach_to_link(l)?));
        match replaced {
            Ok(_) => return Ok(()),
            Err(e) => {
                tracing::warn!(
                    "taking over the TC link pinned for {iface} failed ({e:#}); attaching anew"
                );
                let _ = std::fs::remove_file(&pin);
            }
        }
    }
    let id = prog
        .attach_with_options(
            iface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .with_context(|| format!("attaching TC to {iface}"))?;
    let link: FdLink = prog.take_link(id)?.try_into()?;
    link.pin(&pin)
        .with_context(|| format!("pinning the TC link at {}", pin.display()))?;
    Ok(())
}

/// Remove one pinned attachment: `name` is a `link-*` entry of the pin directory. Returns the
/// interface it was on, or `None` for an entry that is not an attachment.
pub fn remove(dir: &Path, name: &str) -> Result<Option<String>> {
    let path = dir.join(name);
    if let Some(iface) = name.strip_prefix("link-tcnl-") {
        // Gone with its interface, or removed by hand: nothing to detach.
        match tc::qdisc_detach_program(iface, TcAttachType::Ingress, TC_PROGRAM) {
            Ok(()) => {}
            Err(tc::TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                if crate::dataplane::kernel::interface_exists(iface) {
                    return Err(anyhow::Error::from(e))
                        .with_context(|| format!("removing the TC filter from {iface}"));
                }
            }
        }
        std::fs::remove_dir(&path).with_context(|| format!("removing {}", path.display()))?;
        return Ok(Some(iface.to_string()));
    }
    let iface = name
        .strip_prefix("link-xdp-")
        .or_else(|| name.strip_prefix("link-tc-"));
    if let Some(iface) = iface {
        // Unpinning the last reference to a link detaches its program.
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        return Ok(Some(iface.to_string()));
    }
    Ok(None)
}

/// The attachment a `link-*` pin stands for.
pub fn pinned(name: &str) -> Option<Attachment> {
    let (program, iface) = if let Some(i) = name.strip_prefix("link-xdp-") {
        (Program::Xdp, i)
    } else if let Some(i) = name
        .strip_prefix("link-tcnl-")
        .or_else(|| name.strip_prefix("link-tc-"))
    {
        (Program::Tc, i)
    } else {
        return None;
    };
    Some(Attachment {
        interface: iface.to_string(),
        program,
    })
}
