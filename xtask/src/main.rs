//! `cargo xtask`: the project's own commands. Everything a fresh machine needs is installed by
//! `setup`, which `test`, `demo` and `bench` run first.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod report;
mod vm;

#[derive(Parser)]
#[command(about = "ambassador's build, test, demo and benchmark tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent).
    Setup,
    /// Setup, then fmt check, clippy, and every test (unit, packet, network-namespace).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Setup, then the data-plane suites inside KVM guests on Debian's kernel (6.1 LTS).
    VmTest {
        /// Only these suites (default: packet, fuzz_packets, netns).
        suites: Vec<String>,
    },
    /// Setup, then run the reliability tests and write docs/RELIABILITY.md from their figures.
    Report,
    /// Setup, build, and run the 90/10 sticky split in a throw-away netns topology.
    Demo,
    /// Benchmarks that print ratios against peers measured in the same run.
    Bench {
        #[arg(value_parser = ["xdp", "forward", "tls", "l4", "redis", "control", "gitsync", "connect"])]
        which: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Test { args } => {
            setup()?;
            test(&args)
        }
        Cmd::VmTest { suites } => {
            setup()?;
            vm::report(&vm::vm_test(&root(), &suites)?)
        }
        Cmd::Report => {
            setup()?;
            report::report(&root())
        }
        Cmd::Demo => {
            setup()?;
            run_harness_bin("demo", &[])
        }
        Cmd::Bench { which } => {
            setup()?;
            run_harness_bin(&format!("bench-{which}"), &[])
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn step(msg: &str) {
    eprintln!("==> {msg}");
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("starting {shown}"))?;
    if !st.success() {
        bail!("{shown} failed ({st})");
    }
    Ok(())
}

fn ok(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Debian packages: LLVM 22 to build bpf-linker; iproute2/ethtool for the network-namespace
/// tests; nginx as the real HTTP backend; openssl for the TLS interop tests; wrk and nftables
/// for `bench forward`; stunnel4, hitch and haproxy as the peers of `bench tls` / `bench l4`;
/// nutcracker and redis-server for the Redis placement golden tests; curl and chromium (headless)
/// for the admin API and dashboard tests; git for gitsync (fetching, `git daemon`, the tests'
/// repositories); dnsmasq-base as the DNS server of the discovery tests; MariaDB behind the
/// broker; qemu, Debian's kernel (6.1 LTS), busybox and cpio for `vm-test`.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "iproute2",
    "ethtool",
    "util-linux",
    "nginx-light",
    "wrk",
    "nftables",
    "procps",
    "openssl",
    "stunnel4",
    "hitch",
    "haproxy",
    "nutcracker",
    "redis-server",
    "redis-tools",
    "memcached",
    "curl",
    "chromium",
    "git",
    "dnsmasq-base",
    "mariadb-server",
    "mariadb-client",
    "qemu-system-x86",
    "linux-image-amd64",
    "busybox-static",
    "cpio",
];

fn setup() -> Result<()> {
    if output("id", &["-u"]).trim() != "0" {
        bail!("setup installs packages and the tests load BPF programs: run as root");
    }
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output("dpkg-query", &["-W", "-f=${Status}", p]).contains("install ok installed")
        })
        .collect();
    if missing.is_empty() {
        step("system packages: present");
    } else {
        step(&format!(
            "installing system packages: {}",
            missing.join(" ")
        ));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    // Packages may start services on install; the tests start their own instances.
    let _ = Command::new("sh")
        .args([
            "-c",
            "pkill -x nginx; pkill -x haproxy; pkill -x hitch; pkill -x memcached; pkill -x mariadbd; true",
        ])
        .status();

    let installed = output(
        "rustup",
        &["component", "list", "--installed", "--toolchain", "nightly"],
    );
    if installed.contains("rust-src") {
        step("nightly rust-src: present");
    } else {
        step("installing rust-src for the nightly toolchain (builds the eBPF program)");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    if ok("bpf-linker", &["--version"]) {
        step("bpf-linker: present");
    } else {
        step("building bpf-linker against Debian's LLVM 22 (about 2 minutes)");
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }

    if output("stat", &["-f", "-c", "%T", "/sys/fs/bpf"]).trim() == "bpf_fs" {
        step("bpffs: mounted");
    } else {
        step("mounting bpffs at /sys/fs/bpf");
        std::fs::create_dir_all("/sys/fs/bpf").ok();
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    step("cargo fmt --check");
    run(Command::new("cargo").args(["fmt", "--all", "--", "--check"]))?;
    step("cargo clippy -D warnings");
    run(Command::new("cargo").args([
        "clippy",
        "--release",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("building the ambassador binary the integration tests drive");
    run(Command::new("cargo").args(["build", "--release", "--workspace"]))?;
    step("cargo test (unit, packet fixtures, network namespaces)");
    let mut child = Command::new("cargo")
        // Every test binary runs even after a failure, so one run shows every failure.
        .args(["test", "--release", "--workspace", "--no-fail-fast"])
        .args(extra)
        // Tests that create namespaces and time traffic are bounded; two cores: two at a time.
        .env("RUST_TEST_THREADS", "2")
        .current_dir(root())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    // Pass the output through and total the per-binary results, so the run closes with one
    // line that counts every test (cargo's own last lines are often doc-test runs with none).
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count(rest, " passed");
            failed += count(rest, " failed");
        }
    }
    let st = child.wait()?;
    println!("tests: {passed} passed, {failed} failed");
    if !st.success() {
        bail!("cargo test failed ({st})");
    }
    // The guests run under TCG here (nested KVM stops at kernel entry), which costs minutes;
    // `cargo xtask vm-test` runs them on their own until it joins this command.
    step("the suites on other kernels: `cargo xtask vm-test`");
    Ok(())
}

/// The number before `what` in a cargo "test result" line.
fn count(line: &str, what: &str) -> u64 {
    line.split(';')
        .find_map(|part| {
            part.trim()
                .strip_suffix(what.trim())
                .and_then(|n| n.split_whitespace().last()?.parse().ok())
        })
        .unwrap_or(0)
}

fn run_harness_bin(name: &str, args: &[&str]) -> Result<()> {
    step(&format!("building and running {name}"));
    run(Command::new("cargo").args(["build", "--release", "-p", "ambassador"]))?;
    run(Command::new("cargo")
        .args([
            "run",
            "--release",
            "-p",
            "ambassador-tests",
            "--bin",
            name,
            "--",
        ])
        .args(args))
}
