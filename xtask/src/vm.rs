//! `cargo xtask vm-test`: the data-plane suites inside KVM guests running other kernels.
//!
//! For every Debian kernel installed under `/boot` (setup installs `linux-image-amd64`, 6.1
//! LTS on bookworm) a guest boots with `qemu-system-x86_64 -enable-kvm`. Its root file system
//! is this machine's own, shared read-only over virtio-9p (with tmpfs over the few places the
//! tests write), so the guest runs exactly the test binaries and tools built and installed
//! here. A minimal initramfs (busybox and the kernel's own 9p/virtio modules) mounts it and
//! switches to it; a second stage mounts bpffs, runs each suite and powers off. Results come
//! back over the serial console and are reported per kernel.

use std::{
    collections::HashSet,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

/// The suites run in each guest: packet fixtures through `BPF_PROG_TEST_RUN`, packet fuzzing
/// through the real programs (XDP and TC), and the network-namespace integration tests (TC on
/// container veths, XDP behind a NIC, and both).
const SUITES: &[&str] = &["packet", "fuzz_packets", "netns"];

/// The modules the initramfs loads to reach the 9p root (with their dependencies).
const BOOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];

/// A guest gets this long for all suites.
const GUEST_LIMIT: Duration = Duration::from_secs(25 * 60);

pub struct KernelResult {
    pub version: String,
    /// `kvm`, or `tcg` when KVM guests cannot boot on this host.
    pub accel: &'static str,
    pub suites: Vec<(String, u64, u64, bool)>,
    pub error: Option<String>,
}

fn step(msg: &str) {
    eprintln!("==> {msg}");
}

/// Kernels at hand: `/boot/vmlinuz-V` with `/lib/modules/V`, other than the running one.
fn kernels() -> Result<Vec<(String, PathBuf)>> {
    let running = std::fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/boot").context("reading /boot")? {
        let name = e?.file_name().to_string_lossy().into_owned();
        let Some(v) = name.strip_prefix("vmlinuz-") else {
            continue;
        };
        if v != running && Path::new("/lib/modules").join(v).is_dir() {
            out.push((v.to_string(), Path::new("/boot").join(&name)));
        }
    }
    out.sort();
    if out.is_empty() {
        bail!("no guest kernel: /boot has no vmlinuz-* with modules in /lib/modules (setup installs linux-image-amd64)");
    }
    Ok(out)
}

/// `modules.dep` paths of `names` and their dependencies, dependencies first.
fn module_order(version: &str, names: &[&str]) -> Result<Vec<String>> {
    let dir = Path::new("/lib/modules").join(version);
    let dep = std::fs::read_to_string(dir.join("modules.dep"))?;
    let builtin = std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    let deps: Vec<(String, Vec<String>)> = dep
        .lines()
        .filter_map(|l| {
            let (m, d) = l.split_once(':')?;
            Some((
                m.to_string(),
                d.split_whitespace().map(str::to_string).collect(),
            ))
        })
        .collect();
    let stem = |p: &str| {
        let f = p.rsplit('/').next().unwrap_or(p);
        f.split(".ko").next().unwrap_or(f).replace('-', "_")
    };
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    fn visit(
        m: &str,
        deps: &[(String, Vec<String>)],
        order: &mut Vec<String>,
        seen: &mut HashSet<String>,
    ) {
        if !seen.insert(m.to_string()) {
            return;
        }
        if let Some((_, ds)) = deps.iter().find(|(p, _)| p == m) {
            // modules.dep lists the deepest dependency last.
            for d in ds.iter().rev() {
                visit(d, deps, order, seen);
            }
        }
        order.push(m.to_string());
    }
    for n in names {
        let want = n.replace('-', "_");
        match deps.iter().find(|(p, _)| stem(p) == want) {
            Some((p, _)) => visit(p, &deps, &mut order, &mut seen),
            None if builtin.lines().any(|l| stem(l) == want) => {}
            None => bail!("kernel {version} has no module {n} (needed to mount the 9p root)"),
        }
    }
    Ok(order)
}

fn tool(name: &str, package: &str) -> Result<PathBuf> {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("{name} is missing (Debian package {package}; `cargo xtask setup` installs it)")
}

/// The initramfs: busybox, the boot modules, `/init` and the second stage.
fn initramfs(version: &str, work: &Path, stage2: &str, workspace: &Path) -> Result<PathBuf> {
    let root = workspace.display();
    let dir = work.join(format!("initramfs-{version}"));
    let _ = std::fs::remove_dir_all(&dir);
    for d in ["bin", "proc", "sys", "dev", "newroot", "modules"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy(tool("busybox", "busybox-static")?, dir.join("bin/busybox"))?;
    let mut insmods = String::new();
    for m in module_order(version, BOOT_MODULES)? {
        let src = Path::new("/lib/modules").join(version).join(&m);
        let name = m.rsplit('/').next().unwrap().to_string();
        if !name.ends_with(".ko") {
            bail!("{m}: compressed modules are not handled (the initramfs uses busybox insmod)");
        }
        std::fs::copy(&src, dir.join("modules").join(&name))
            .with_context(|| format!("copying {}", src.display()))?;
        insmods.push_str(&format!(
            "insmod /modules/{name} || fail \"insmod {name}\"\n"
        ));
    }
    let init = format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
echo VM-INIT
fail() {{ echo "VM-FAIL $1"; echo o > /proc/sysrq-trigger; sleep 5; }}
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
{insmods}
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /newroot || fail "mounting the 9p root"
# The workspace may live under a directory the tmpfs mounts below hide (a CI clone in /tmp):
# keep a view of it aside and put it back on top.
mount --bind /newroot{root} /newroot/mnt || fail "binding the workspace"
for d in tmp run var/tmp var/log root; do
  mount -t tmpfs -o mode=1777 tmpfs /newroot/$d || fail "tmpfs on /$d"
done
mkdir -p /newroot{root} 2>/dev/null
mount --move /newroot/mnt /newroot{root} || fail "moving the workspace back"
cp /stage2.sh /newroot/tmp/stage2.sh
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
exec switch_root /newroot /bin/sh /tmp/stage2.sh
"#
    );
    std::fs::write(dir.join("init"), init)?;
    std::fs::write(dir.join("stage2.sh"), stage2)?;
    Command::new("chmod")
        .args(["755"])
        .arg(dir.join("init"))
        .status()?;
    let out = work.join(format!("initramfs-{version}.cpio"));
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio -o -H newc -R 0:0 --quiet > {}",
            dir.display(),
            out.display()
        ))
        .status()?;
    if !st.success() {
        bail!("building the initramfs with cpio failed");
    }
    Ok(out)
}

/// The test executables of `SUITES`, built by cargo (`--no-run`).
fn executables(root: &Path, suites: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let mut c = Command::new("cargo");
    // The whole workspace, as `cargo xtask test` builds it: the same features, so nothing is
    // rebuilt after a test run.
    c.args(["test", "--release", "--workspace", "--no-run"])
        .args(["--message-format", "json"]);
    let out = c
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test suites failed");
    }
    let mut exes = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str())
        else {
            continue;
        };
        if suites.contains(&name) {
            exes.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    if exes.len() != suites.len() {
        bail!("expected test executables for {suites:?}, cargo built {exes:?}");
    }
    Ok(exes)
}

fn stage2(exes: &[(String, PathBuf)], root: &Path) -> String {
    let mut s = format!(
        r#"#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root RUST_BACKTRACE=1 RUST_TEST_THREADS=2
# An eighth of the host's million fuzzed packets per program (XDP and TC): an emulated guest
# is many times slower.
export AMB_FUZZ_PACKETS=125000
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
ip link set lo up
echo "VM-KERNEL $(uname -r)"
cd {}
"#,
        root.join("tests").display()
    );
    for (name, exe) in exes {
        s.push_str(&format!(
            "echo \"VM-SUITE-START {name}\"\n{} 2>&1\necho \"VM-SUITE {name} rc=$?\"\n",
            exe.display()
        ));
    }
    // Wait for the power-off with shell builtins only: once it starts, exec'ing `sleep` can fail,
    // and init (this shell) exiting then panics the guest ("Attempted to kill init") in the log.
    s.push_str("echo VM-DONE\necho o > /proc/sysrq-trigger\nwhile :; do :; done\n");
    s
}

/// A KVM guest that has not reached the initramfs's first line by then is taken as hung.
const PROBE: Duration = Duration::from_secs(30);

/// Boot one kernel and run the suites; the console is passed through with the kernel's tag.
/// None when the guest never reached `/init` (checked within [`PROBE`]).
fn run_guest(
    version: &str,
    kernel: &Path,
    initrd: &Path,
    log: &Path,
    accel: &'static str,
) -> Result<Option<KernelResult>> {
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    };
    let qemu = tool("qemu-system-x86_64", "qemu-system-x86")?;
    let (machine, cpu) = match accel {
        // IA32_ARCH_CAPABILITIES cannot be set under nested KVM on some hosts.
        "kvm" => ("q35,accel=kvm", "host,-arch-capabilities"),
        _ => ("q35,accel=tcg", "max"),
    };
    let mut child = Command::new(qemu)
        .args(["-machine", machine, "-cpu", cpu, "-m", "4096", "-smp", "2"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3"])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu")?;
    let started = Instant::now();
    let stdout = child.stdout.take().expect("piped");
    let seen_init = Arc::new(AtomicBool::new(false));
    // A watchdog: a guest that never reaches /init, or hangs later, is killed.
    let pid = child.id();
    let seen = seen_init.clone();
    let watchdog = std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return None;
        }
        let why = if !seen.load(Ordering::SeqCst) && started.elapsed() > PROBE {
            "probe"
        } else if started.elapsed() > GUEST_LIMIT {
            "limit"
        } else {
            continue;
        };
        let _ = Command::new("kill").arg(pid.to_string()).status();
        return Some(why);
    });
    let mut logf = std::fs::File::create(log)?;
    let mut r = KernelResult {
        version: version.to_string(),
        accel,
        suites: Vec::new(),
        error: None,
    };
    let (mut passed, mut failed) = (0u64, 0u64);
    let mut done = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_default();
        let line = line.trim_end_matches('\r');
        use std::io::Write as _;
        let _ = writeln!(logf, "{line}");
        println!("[{version} {accel}] {line}");
        if line.contains("VM-INIT") {
            seen_init.store(true, Ordering::SeqCst);
        }
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += crate::count(rest, " passed");
            failed += crate::count(rest, " failed");
        } else if line.starts_with("VM-SUITE-START ") {
            (passed, failed) = (0, 0);
        } else if let Some(rest) = line.strip_prefix("VM-SUITE ") {
            let (name, rc) = rest.split_once(" rc=").unwrap_or((rest, "?"));
            r.suites
                .push((name.to_string(), passed, failed, rc.trim() == "0"));
        } else if let Some(why) = line.strip_prefix("VM-FAIL ") {
            r.error = Some(format!("guest setup failed: {why}"));
        } else if line == "VM-DONE" {
            done = true;
        }
    }
    let _ = child.wait();
    match watchdog.join().unwrap_or(None) {
        Some("probe") => return Ok(None),
        Some(_) => r.error = Some(format!("the guest did not finish within {GUEST_LIMIT:?}")),
        None if !done && r.error.is_none() => {
            r.error =
                Some("the guest stopped before running every suite (see the console above)".into())
        }
        None => {}
    }
    Ok(Some(r))
}

pub fn vm_test(root: &Path, only: &[String]) -> Result<Vec<KernelResult>> {
    let suites: Vec<&str> = if only.is_empty() {
        SUITES.to_vec()
    } else {
        only.iter().map(String::as_str).collect()
    };
    if !Path::new("/dev/kvm").exists() {
        bail!("vm-test needs KVM and /dev/kvm is missing: run on a host (or a VM with nested virtualisation) that exposes /dev/kvm");
    }
    tool("qemu-system-x86_64", "qemu-system-x86")?;
    tool("cpio", "cpio")?;
    let kernels = kernels()?;
    step("building the ambassador binary and the suites the guests run");
    crate::run(Command::new("cargo").args(["build", "--release", "--workspace"]))?;
    let exes = executables(root, &suites)?;
    let work = root.join("target/vm");
    std::fs::create_dir_all(&work)?;
    let script = stage2(&exes, root);
    let mut results = Vec::new();
    for (version, kernel) in kernels {
        step(&format!("booting {version} under KVM: {suites:?}"));
        let initrd = initramfs(&version, &work, &script, root)?;
        let log = work.join(format!("console-{version}.log"));
        let r = match run_guest(&version, &kernel, &initrd, &log, "kvm")? {
            Some(r) => r,
            None => {
                step(&format!(
                    "the KVM guest did not reach /init within {PROBE:?} (nested KVM on this host stops at kernel entry): booting {version} again under TCG emulation"
                ));
                run_guest(&version, &kernel, &initrd, &log, "tcg")?.with_context(|| {
                    format!(
                        "{version} did not reach /init under TCG either (see {})",
                        log.display()
                    )
                })?
            }
        };
        results.push(r);
    }
    Ok(results)
}

/// Print the per-kernel table; an error when any suite failed on any kernel.
pub fn report(results: &[KernelResult]) -> Result<()> {
    println!("\nvm-test: per kernel");
    let mut bad = Vec::new();
    for k in results {
        for (name, p, f, ok) in &k.suites {
            println!(
                "  {:<20} {:<4} {:<14} {p:>4} passed {f:>3} failed {}",
                k.version,
                k.accel,
                name,
                if *ok { "ok" } else { "FAILED" }
            );
            if !ok {
                bad.push(format!("{} {name}", k.version));
            }
        }
        if let Some(e) = &k.error {
            println!("  {:<20} {e}", k.version);
            bad.push(format!("{}: {e}", k.version));
        }
    }
    if !bad.is_empty() {
        bail!("vm-test failed: {}", bad.join("; "));
    }
    Ok(())
}
