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
    /// Setup, then fmt, clippy, every test (unit, packet, network-namespace), the dependency audit,
    /// 60 s per fuzz target, and the VM suites when /dev/kvm exists.
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
    /// Setup, then run the cargo-fuzz (libFuzzer) targets, each for a bounded time.
    Fuzz {
        /// Only these targets (default: every target in fuzz/Cargo.toml).
        targets: Vec<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Setup, then the dependency audit: licenses, bans and sources (`deny.toml`).
    Deny,
    /// Setup, build, and run the 90/10 sticky split in a throw-away netns topology.
    Demo,
    /// Benchmarks that print ratios against peers measured in the same run.
    Bench {
        #[arg(value_parser = ["xdp", "forward", "tls", "l4", "redis", "control", "gitsync", "connect"])]
        which: String,
        /// Passed to the benchmark (e.g. `bench xdp -- --only new-flow` to profile one path).
        #[arg(last = true)]
        args: Vec<String>,
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
        Cmd::Fuzz { targets, seconds } => {
            setup()?;
            fuzz(&targets, seconds)
        }
        Cmd::Deny => {
            setup()?;
            deny()
        }
        Cmd::Demo => {
            setup()?;
            run_harness_bin("demo", &[])
        }
        Cmd::Bench { which, args } => {
            setup()?;
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_harness_bin(&format!("bench-{which}"), &args)
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
        // Packages must not start their services on install (nginx, redis, memcached, mariadb,
        // haproxy, hitch would each take a port): the tests start their own instances. A
        // policy-rc.d that refuses every start is Debian's way to say so; one already there is
        // the machine owner's and is left alone.
        let policy = Path::new("/usr/sbin/policy-rc.d");
        let ours = !policy.exists();
        if ours {
            std::fs::write(
                policy,
                "#!/bin/sh\n# cargo xtask setup: no service starts on install\nexit 101\n",
            )
            .context("writing /usr/sbin/policy-rc.d")?;
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))?;
        }
        let installed = run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"));
        if ours {
            let _ = std::fs::remove_file(policy);
        }
        installed?;
    }

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

    // Fuzzing and the dependency audit, pinned so a fresh machine gets what CI was tested with.
    for (bin, krate, version) in [
        ("cargo-fuzz", "cargo-fuzz", "0.13.2"),
        ("cargo-deny", "cargo-deny", "0.20.2"),
    ] {
        if ok(bin, &["--version"]) {
            step(&format!("{krate}: present"));
        } else {
            step(&format!("installing {krate} {version} from crates.io"));
            run(Command::new("cargo").args(["install", "--locked", krate, "--version", version]))?;
        }
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
    deny()?;
    fuzz(&[], FUZZ_SECONDS)?;
    if Path::new("/dev/kvm").exists() {
        step("the data-plane suites inside VMs on other kernels (`cargo xtask vm-test`)");
        vm::report(&vm::vm_test(&root(), &[])?)?;
    } else {
        step("no /dev/kvm: the VM suites (`cargo xtask vm-test`) need KVM and are not part of this run");
    }
    Ok(())
}

/// Seconds each fuzz target runs in `cargo xtask test`.
pub const FUZZ_SECONDS: u64 = 60;

/// The dependency audit. Licenses, bans (duplicates, wildcards) and sources run offline; the
/// RustSec advisory database is fetched from GitHub, which these machines cannot reach, so
/// advisories run only where `AMB_DENY_ADVISORIES=1` says the network allows it.
pub fn deny() -> Result<()> {
    let mut checks = vec!["licenses", "bans", "sources"];
    if std::env::var("AMB_DENY_ADVISORIES").as_deref() == Ok("1") {
        checks.push("advisories");
    }
    step(&format!("cargo deny check {}", checks.join(" ")));
    run(Command::new("cargo")
        .args(["deny", "--workspace", "--all-features", "check"])
        .args(&checks))
}

/// The cargo-fuzz targets (names of the `[[bin]]`s in fuzz/Cargo.toml).
fn fuzz_targets() -> Result<Vec<String>> {
    let manifest = std::fs::read_to_string(root().join("fuzz/Cargo.toml"))?;
    Ok(manifest
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|n| *n != "ambassador-fuzz")
        .map(str::to_owned)
        .collect())
}

/// What one fuzz target did: whether it ran its time without a crash, how many inputs it
/// executed, and the size of its corpus at the end (libFuzzer's final stats).
pub struct FuzzRun {
    pub target: String,
    pub ok: bool,
    pub execs: u64,
    pub corpus: u64,
}

/// Each target runs `seconds` from its kept corpus (`fuzz/corpus/<target>`, read only) plus a
/// working corpus under fuzz/target that grows between runs. Safe Rust needs no address
/// sanitizer; debug assertions stay on so an overflow is a crash.
pub fn fuzz_runs(only: &[String], seconds: u64) -> Result<Vec<FuzzRun>> {
    let all = fuzz_targets()?;
    for t in only {
        if !all.contains(t) {
            bail!("no fuzz target {t}: the targets are {}", all.join(", "));
        }
    }
    let targets = if only.is_empty() { &all } else { only };
    let fuzz_cmd = |sub: &str| {
        let mut c = Command::new("cargo");
        c.args([
            "+nightly",
            "fuzz",
            sub,
            "--sanitizer",
            "none",
            "--debug-assertions",
        ]);
        c
    };
    step(&format!(
        "building the fuzz targets: {}",
        targets.join(", ")
    ));
    run(&mut fuzz_cmd("build"))?;
    let mut runs = Vec::new();
    for t in targets {
        step(&format!("fuzzing {t} for {seconds} s"));
        let work = root().join("fuzz/target/corpus").join(t);
        std::fs::create_dir_all(&work)?;
        let mut child = fuzz_cmd("run")
            .arg(t)
            .arg(&work)
            .arg(format!("fuzz/corpus/{t}"))
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-timeout=10",
                "-rss_limit_mb=2048",
                "-print_final_stats=1",
            ])
            .current_dir(root())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting cargo fuzz run {t}"))?;
        let (mut execs, mut corpus) = (0, 0);
        for line in BufReader::new(child.stderr.take().expect("piped")).lines() {
            let line = line?;
            eprintln!("{line}");
            if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
                execs = n.trim().parse().unwrap_or(0);
            }
            // "#N DONE cov: .. ft: .. corp: 123/45Kb ..": the corpus at the end.
            if line.contains("\tDONE ") || line.contains(" DONE ") {
                if let Some(c) = line.split("corp: ").nth(1) {
                    corpus = c
                        .split('/')
                        .next()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                }
            }
        }
        let ok = child.wait()?.success();
        if !ok {
            eprintln!("fuzz target {t} found a crash: the input is in fuzz/artifacts/{t}/");
        }
        runs.push(FuzzRun {
            target: t.clone(),
            ok,
            execs,
            corpus,
        });
    }
    Ok(runs)
}

fn fuzz(only: &[String], seconds: u64) -> Result<()> {
    let runs = fuzz_runs(only, seconds)?;
    for r in &runs {
        println!(
            "fuzz {}: {} ({} inputs in {seconds} s, corpus {})",
            r.target,
            if r.ok { "no crash" } else { "CRASH" },
            r.execs,
            r.corpus
        );
    }
    let bad: Vec<&str> = runs
        .iter()
        .filter(|r| !r.ok)
        .map(|r| r.target.as_str())
        .collect();
    if !bad.is_empty() {
        bail!(
            "fuzz targets crashed: {} (inputs in fuzz/artifacts/)",
            bad.join(", ")
        );
    }
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
