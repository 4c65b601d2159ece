//! `cargo xtask bench xdp`: ns/packet of the XDP and TC programs by `BPF_PROG_TEST_RUN`, against
//! floors measured in the same run (a program that only returns XDP_PASS, and one that only
//! returns TC_ACT_OK; one that parses Ethernet/IPv4/TCP and does one hash lookup; one that
//! parses and inserts one flow).
//!
//! `repeat` does not restore the packet between iterations, so paths that rewrite it are timed
//! through `bench_restore*`, which copy the original headers back and tail-call the program
//! under test; the wrapper's own cost (measured with `bench_pass` as its target) is subtracted.

use std::path::Path;

use ambassador::{
    config::Config,
    dataplane::{kernel::KernelDataplane, Plan},
};
use ambassador_ebpf::{Flow, FlowKey, FLOW_TABLE_SIZE};
use ambassador_tests::{
    fixture::{allow_fixture_egress, forwarding_netns},
    packets::{ingress_skb, Spec, ACK, PSH},
};
use aya::{
    maps::{Array, HashMap, ProgramArray},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
    EbpfLoader,
};

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 9;
/// New flows per run into an emptied flow table (262,144 entries, one per flow): it has room.
const NEW_FLOWS: u32 = 50_000;
/// New flows per run in the steady state of a full table, where every insert evicts.
const NEW_FLOWS_FULL: u32 = 400_000;
const RESTORE_LEN: usize = 64;

const CONFIG: &str = "
services:
  - name: frontend
    listen: 10.200.0.100:80/tcp
    split:
      key: src-ip
      backends:
        - { name: web,        address: 10.200.2.2:8080, weight: 9 }
        - { name: experiment, address: 10.200.3.2:8080, weight: 1 }
";

fn xdp<'a>(dp: &'a mut KernelDataplane, name: &str) -> &'a mut Xdp {
    dp.ebpf_mut()
        .program_mut(name)
        .unwrap_or_else(|| panic!("program {name}"))
        .try_into()
        .expect("XDP program")
}

/// ns/iteration of one run of `prog` over `repeat` iterations.
fn run(dp: &mut KernelDataplane, prog: &str, pkt: &[u8], repeat: u32) -> f64 {
    let mut out = vec![0u8; pkt.len() + 64];
    let r = xdp(dp, prog)
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::new()
        })
        .expect("BPF_PROG_TEST_RUN");
    assert_ne!(
        r.return_value, 0,
        "{prog} aborted: wrapper or tail call failed"
    );
    r.duration.as_nanos() as f64
}

fn tc<'a>(dp: &'a mut KernelDataplane, name: &str) -> &'a mut SchedClassifier {
    dp.ebpf_mut()
        .program_mut(name)
        .unwrap_or_else(|| panic!("program {name}"))
        .try_into()
        .expect("SCHED_CLS program")
}

/// [`run`] for a TC program: the test run's socket buffer arrived on `lo` (the FIB lookup
/// needs an interface).
fn run_tc(dp: &mut KernelDataplane, prog: &str, pkt: &[u8], repeat: u32) -> f64 {
    let mut out = vec![0u8; pkt.len() + 64];
    let skb = ingress_skb(1);
    let r = tc(dp, prog)
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ctx_in: Some(&skb),
            repeat,
            ..TestRunOptions::new()
        })
        .expect("BPF_PROG_TEST_RUN");
    // TC_ACT_SHOT: the wrapper's restore or tail call failed.
    assert_ne!(r.return_value, 2, "{prog}: wrapper or tail call failed");
    r.duration.as_nanos() as f64
}

fn set_tc_target(dp: &mut KernelDataplane, prog: &str) {
    let fd = tc(dp, prog).fd().expect("loaded").try_clone().expect("fd");
    let mut arr =
        ProgramArray::try_from(dp.ebpf_mut().map_mut("BENCH_TC_TARGET").unwrap()).unwrap();
    arr.set(0, &fd, 0).expect("set tail-call target");
}

/// [`wrapped`] for TC programs, net of the TC wrapper (measured with `bench_tc_ok` as target).
fn wrapped_tc(
    dp: &mut KernelDataplane,
    wrapper: &str,
    target: &str,
    pkt: &[u8],
    repeat: u32,
) -> f64 {
    set_tc_target(dp, "bench_tc_ok");
    let w = run_tc(dp, wrapper, pkt, repeat);
    set_tc_target(dp, target);
    run_tc(dp, wrapper, pkt, repeat) - w
}

/// Mean ns of `n` one-shot runs (repeat 1: the kernel hands the program a fresh copy of the
/// packet each time); `pkt(i)` may vary the packet per run.
fn one_shot(
    dp: &mut KernelDataplane,
    prog: &str,
    n: u32,
    mut pkt: impl FnMut(u32) -> Vec<u8>,
) -> f64 {
    let mut total = 0.0;
    for i in 0..n {
        total += run(dp, prog, &pkt(i), 1);
    }
    total / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Median over ROUNDS runs of REPEAT iterations.
fn time(dp: &mut KernelDataplane, prog: &str, pkt: &[u8]) -> f64 {
    median((0..ROUNDS).map(|_| run(dp, prog, pkt, REPEAT)).collect())
}

/// One round: every path timed back to back (ns per packet).
struct Round {
    pass: f64,
    parse: f64,
    non_service: f64,
    est: f64,
    est_miss: f64,
    new_flow: f64,
    insert: f64,
    insert_nc: f64,
    wrap: f64,
    wrap_new: f64,
    tc_ok: f64,
    tc_non_service: f64,
    tc_est: f64,
    tc_new_flow: f64,
}

/// Cost of `target` behind `wrapper`, net of the wrapper: (wrapper → target) − (wrapper →
/// bench_pass), measured back to back. Returns (net, wrapper's own cost).
fn wrapped(
    dp: &mut KernelDataplane,
    wrapper: &str,
    target: &str,
    pkt: &[u8],
    repeat: u32,
) -> (f64, f64) {
    set_target(dp, "bench_pass");
    let w = run(dp, wrapper, pkt, repeat);
    set_target(dp, target);
    let t = run(dp, wrapper, pkt, repeat);
    (t - w, w)
}

/// [`wrapped`], median over ROUNDS (for `--only`).
fn time_wrapped(
    dp: &mut KernelDataplane,
    wrapper: &str,
    target: &str,
    pkt: &[u8],
    repeat: u32,
    mut before_round: impl FnMut(&mut KernelDataplane),
) -> (f64, f64) {
    let (mut net, mut own) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        before_round(dp);
        let (n, w) = wrapped(dp, wrapper, target, pkt, repeat);
        net.push(n);
        own.push(w);
    }
    (median(net), median(own))
}

/// Empty a flow table (the established flow is re-created by its next packet).
fn clear(dp: &mut KernelDataplane, map: &str) {
    let mut flows: HashMap<_, FlowKey, Flow> =
        HashMap::try_from(dp.ebpf_mut().map_mut(map).unwrap()).unwrap();
    let keys: Vec<FlowKey> = flows.keys().filter_map(Result::ok).collect();
    for k in keys {
        let _ = flows.remove(&k);
    }
}

fn set_target(dp: &mut KernelDataplane, prog: &str) {
    let fd = xdp(dp, prog).fd().expect("loaded").try_clone().expect("fd");
    let mut arr = ProgramArray::try_from(dp.ebpf_mut().map_mut("BENCH_TARGET").unwrap()).unwrap();
    arr.set(0, &fd, 0).expect("set tail-call target");
}

/// Slot 0: the packet `bench_restore*` replays; slot 1: the one `*_new_flow` gives new sources.
fn set_packet(dp: &mut KernelDataplane, slot: u32, pkt: &[u8]) {
    let mut words = [0u64; RESTORE_LEN / 8];
    for (i, w) in words.iter_mut().enumerate() {
        *w = u64::from_ne_bytes(pkt[i * 8..i * 8 + 8].try_into().unwrap());
    }
    let mut arr: Array<_, [u64; RESTORE_LEN / 8]> =
        Array::try_from(dp.ebpf_mut().map_mut("BENCH_PACKET").unwrap()).unwrap();
    arr.set(slot, words, 0).unwrap();
}

fn main() {
    ambassador_tests::require_root();
    let ns = forwarding_netns();
    let _in = ns.enter();
    let cfg = Config::parse(Path::new("bench.yaml"), CONFIG).unwrap();
    let mut dp = KernelDataplane::load_with_loader(
        EbpfLoader::new()
            .map_max_entries("BENCH_FLOWS", FLOW_TABLE_SIZE)
            .map_max_entries("BENCH_FLOWS_NO_COMMON", FLOW_TABLE_SIZE),
        FLOW_TABLE_SIZE,
        // Every new flow into the connection table, as below the flood rate: the rows below
        // time the new-flow path; the flood row loads the program with the daemon's limit.
        Some(u32::MAX),
    )
    .expect("load");
    dp.apply(&Plan::build(&cfg)).expect("program maps");
    allow_fixture_egress(&mut dp);
    for p in [
        "bench_pass",
        "bench_parse_lookup",
        "bench_parse_insert",
        "bench_parse_insert_no_common",
        "bench_restore",
        "bench_restore_uncached",
        "bench_restore_new_flow",
    ] {
        xdp(&mut dp, p)
            .load()
            .unwrap_or_else(|e| panic!("loading {p}: {e:#?}"));
    }
    for p in [
        "bench_tc_ok",
        "bench_tc_restore",
        "bench_tc_restore_new_flow",
    ] {
        tc(&mut dp, p)
            .load()
            .unwrap_or_else(|e| panic!("loading {p}: {e:#?}"));
    }
    {
        // The floor's lookup hits, as the service lookup does.
        let mut m: HashMap<_, [u32; 5], u32> =
            HashMap::try_from(dp.ebpf_mut().map_mut("BENCH_LOOKUP").unwrap()).unwrap();
        m.insert([0u32; 5], 1, 0).unwrap();
    }

    // A new flow starts with a SYN; an established one carries data (a repeated SYN would be
    // a reconnect, and is not what established traffic looks like).
    let service = Spec::tcp("198.51.100.7:40000", "10.200.0.100:80").build();
    let data = Spec {
        tcp_flags: ACK | PSH,
        ..Spec::tcp("198.51.100.7:40000", "10.200.0.100:80")
    }
    .build();
    let other = Spec::tcp("198.51.100.7:40000", "10.200.9.9:80").build();
    assert!(service.len() >= RESTORE_LEN);

    if let Some(path) = only() {
        profile(&mut dp, &path, &service, &data, &other);
        return;
    }

    // Every round times every path back to back, and each path's ratio is taken to that
    // round's XDP_PASS floor: this shared VM drifts by a third between minutes, so paths timed in
    // separate blocks would be compared across different machine speeds.
    set_packet(&mut dp, 0, &data);
    set_packet(&mut dp, 1, &service);
    time_once(&mut dp, &service);
    let mut r: Vec<Round> = Vec::new();
    for _ in 0..ROUNDS {
        let pass = run(&mut dp, "bench_pass", &service, REPEAT);
        let parse = run(&mut dp, "bench_parse_lookup", &other, REPEAT);
        let non_service = run(&mut dp, "ambassador_xdp", &other, REPEAT);
        // Established: the flow exists (its first packet re-creates it after a clear).
        let (est, wrap) = wrapped(&mut dp, "bench_restore", "ambassador_xdp", &data, REPEAT);
        let (est_miss, _) = wrapped(
            &mut dp,
            "bench_restore_uncached",
            "ambassador_xdp",
            &data,
            REPEAT,
        );
        // New flows: NEW_FLOWS per run into an emptied flow table, which has room.
        clear(&mut dp, "FLOWS");
        let (new_flow, wrap_new) = wrapped(
            &mut dp,
            "bench_restore_new_flow",
            "ambassador_xdp",
            &service,
            NEW_FLOWS,
        );
        // The same new flows into a bare table of FLOWS' shape: parse and one insert.
        clear(&mut dp, "BENCH_FLOWS");
        let (insert, _) = wrapped(
            &mut dp,
            "bench_restore_new_flow",
            "bench_parse_insert",
            &service,
            NEW_FLOWS,
        );
        clear(&mut dp, "BENCH_FLOWS_NO_COMMON");
        let (insert_nc, _) = wrapped(
            &mut dp,
            "bench_restore_new_flow",
            "bench_parse_insert_no_common",
            &service,
            NEW_FLOWS,
        );
        // The TC program on the same packets, against its own floor.
        let tc_ok = run_tc(&mut dp, "bench_tc_ok", &service, REPEAT);
        let tc_non_service = run_tc(&mut dp, "ambassador_tc", &other, REPEAT);
        let tc_est = wrapped_tc(&mut dp, "bench_tc_restore", "ambassador_tc", &data, REPEAT);
        clear(&mut dp, "FLOWS");
        let tc_new_flow = wrapped_tc(
            &mut dp,
            "bench_tc_restore_new_flow",
            "ambassador_tc",
            &service,
            NEW_FLOWS,
        );
        r.push(Round {
            pass,
            parse,
            non_service,
            est: est + pass,
            est_miss: est_miss + pass,
            new_flow: new_flow + pass,
            insert: insert + pass,
            insert_nc: insert_nc + pass,
            wrap,
            wrap_new,
            tc_ok,
            tc_non_service,
            tc_est: tc_est + tc_ok,
            tc_new_flow: tc_new_flow + tc_ok,
        });
    }
    // The steady state of a full table, where every insert also evicts: NEW_FLOWS_FULL per run,
    // the program and both floors back to back in each round.
    let full: Vec<[f64; 4]> = (0..ROUNDS)
        .map(|_| {
            let pass = run(&mut dp, "bench_pass", &service, REPEAT);
            let mut t = [0.0; 3];
            for (i, target) in [
                "ambassador_xdp",
                "bench_parse_insert",
                "bench_parse_insert_no_common",
            ]
            .into_iter()
            .enumerate()
            {
                t[i] = wrapped(
                    &mut dp,
                    "bench_restore_new_flow",
                    target,
                    &service,
                    NEW_FLOWS_FULL,
                )
                .0 + pass;
            }
            [pass, t[0], t[1], t[2]]
        })
        .collect();
    let fullm = |i: usize| median(full.iter().map(|f| f[i]).collect());
    let (new_flow_full, insert_full, insert_nc_full) = (fullm(1), fullm(2), fullm(3));
    let new_flow_full_ratio = median(full.iter().map(|f| f[1] / f[0]).collect());
    let ns = |f: fn(&Round) -> f64| median(r.iter().map(f).collect());
    let ratio = |f: fn(&Round) -> f64| median(r.iter().map(|x| f(x) / x.pass).collect());
    let pass = ns(|x| x.pass);
    let (parse, non_service, est, new_flow, insert) = (
        ns(|x| x.parse),
        ns(|x| x.non_service),
        ns(|x| x.est),
        ns(|x| x.new_flow),
        ns(|x| x.insert),
    );
    let (wrap, wrap_new) = (ns(|x| x.wrap), ns(|x| x.wrap_new));
    // One-shot method: no wrapper; the timer's own overhead is what a one-shot XDP_PASS costs
    // beyond the repeated floor.
    const N: u32 = 200_000;
    let os_pass = one_shot(&mut dp, "bench_pass", N, |_| service.clone());
    let overhead = os_pass - pass;
    let os_est = one_shot(&mut dp, "ambassador_xdp", N, |_| data.clone()) - overhead;
    let os_non = one_shot(&mut dp, "ambassador_xdp", N, |_| other.clone()) - overhead;
    let os_new = one_shot(&mut dp, "ambassador_xdp", N, |i| {
        let mut p = service.clone();
        p[34..36].copy_from_slice(&(i as u16).to_ne_bytes());
        p[29] = 100 + (i >> 16) as u8;
        p
    }) - overhead;
    let stats = dp.stats().unwrap();

    println!(
        "XDP fast path, BPF_PROG_TEST_RUN, repeat {REPEAT}; {ROUNDS} rounds, each timing every path; medians of ns and of each round's ratio to its own XDP_PASS floor"
    );
    println!(
        "floor XDP_PASS: {pass:.1} ns; floor parse + 1 lookup: {parse:.1} ns ({:.2}x)",
        ratio(|x| x.parse)
    );
    println!(
        "floor parse + 1 connection-table insert (new key, emptied table of FLOWS' shape): {insert:.1} ns ({:.2}x)",
        ratio(|x| x.insert)
    );
    println!(
        "LRU flavours, parse + 1 insert: common LRU {insert:.1} ns emptied, {insert_full:.1} ns full; per-CPU lists (BPF_F_NO_COMMON_LRU) {:.1} ns emptied, {insert_nc_full:.1} ns full",
        ns(|x| x.insert_nc)
    );
    println!(
        "restore+tail-call wrappers, measured and subtracted: {wrap:.1} ns, new-flow {wrap_new:.1} ns"
    );
    println!(
        "established: a TCP data packet (ACK|PSH) of a tracked flow whose route is cached, found in the CPU's flow cache (a miss: found in the connection table, and copied to the cache); new flows: SYNs, {NEW_FLOWS} per run into an emptied 262,144-entry flow table (one entry each)\n"
    );
    println!(
        "{:<28} {:>8} {:>14} {:>8}",
        "path", "ns/pkt", "x XDP_PASS", "goal"
    );
    for (name, ns, ratio, goal) in [
        ("established flow", est, ratio(|x| x.est), 3.0),
        (
            "new flow (flow insert)",
            new_flow,
            ratio(|x| x.new_flow),
            6.0,
        ),
        (
            "non-service packet",
            non_service,
            ratio(|x| x.non_service),
            1.7,
        ),
    ] {
        let verdict = if ratio <= goal { "met" } else { "MISSED" };
        println!("{name:<28} {ns:>8.1} {ratio:>13.2}x {goal:>7.1}x  {verdict}");
    }
    println!(
        "{:<28} {:>8.1} {:>13.2}x   (a CPU's first packet of a flow in a clock tick)",
        "established, flow-cache miss",
        ns(|x| x.est_miss),
        ratio(|x| x.est_miss)
    );
    println!(
        "{:<28} {new_flow_full:>8.1} {new_flow_full_ratio:>13.2}x   (full table: every insert evicts)",
        "new flow, full table"
    );
    let vs_floor = median(r.iter().map(|x| x.new_flow / x.insert).collect());
    let vs_floor_full = median(full.iter().map(|f| f[1] / f[2]).collect());
    for (state, ratio) in [("emptied", vs_floor), ("full", vs_floor_full)] {
        let verdict = if ratio <= 1.3 { "met" } else { "MISSED" };
        println!(
            "new flow against the insert floor, {state} table: {ratio:.2}x (goal 1.3x: {verdict}; one insert, a route lookup, the backend's pick)"
        );
    }
    let tc_ratio = |f: fn(&Round) -> f64| median(r.iter().map(|x| f(x) / x.tc_ok).collect());
    println!(
        "\nTC program (clsact, socket buffers), same packets, same rounds; floor TC_ACT_OK: {:.1} ns ({:.2}x XDP_PASS)\n",
        ns(|x| x.tc_ok),
        ratio(|x| x.tc_ok)
    );
    println!(
        "{:<28} {:>8} {:>14} {:>8}",
        "path", "ns/pkt", "x TC_ACT_OK", "goal"
    );
    for (name, ns, ratio, goal) in [
        (
            "established flow",
            ns(|x| x.tc_est),
            tc_ratio(|x| x.tc_est),
            Some(3.0),
        ),
        (
            "new flow (flow insert)",
            ns(|x| x.tc_new_flow),
            tc_ratio(|x| x.tc_new_flow),
            None,
        ),
        (
            "non-service packet",
            ns(|x| x.tc_non_service),
            tc_ratio(|x| x.tc_non_service),
            Some(1.7),
        ),
    ] {
        match goal {
            Some(goal) => {
                let verdict = if ratio <= goal { "met" } else { "MISSED" };
                println!("{name:<28} {ns:>8.1} {ratio:>13.2}x {goal:>7.1}x  {verdict}");
            }
            None => println!("{name:<28} {ns:>8.1} {ratio:>13.2}x       -"),
        }
    }
    println!(
        "TC new flow against the insert floor: {:.2}x",
        median(r.iter().map(|x| x.tc_new_flow / x.insert).collect())
    );
    let (alone, flooded, flood_rate) = flood_row(&cfg);
    let pps_ratio = alone / flooded;
    println!(
        "\nestablished packets while the other CPU floods new flows ({flood_rate:.0} new flows/s, the daemon's flood limit): {flooded:.1} ns/pkt against {alone:.1} ns/pkt alone: {pps_ratio:.2}x the packets per second (goal 0.9x: {})",
        if pps_ratio >= 0.9 { "met" } else { "MISSED" }
    );
    println!(
        "\ncross-check by {N} one-shot runs (fresh packet each, timer overhead {overhead:.1} ns subtracted):"
    );
    println!(
        "established {os_est:.1} ns ({:.2}x), new flow {os_new:.1} ns ({:.2}x), non-service {os_non:.1} ns ({:.2}x)",
        os_est / pass,
        os_new / pass,
        os_non / pass
    );
    println!(
        "\n(kernel counters over the run: new_flow {}, forwarded {}, flow_insert_failed {}, flow_cache_fill {})",
        stats.global("new_flow"),
        stats.global("forwarded"),
        stats.global("flow_insert_failed"),
        stats.global("flow_cache_fill")
    );
}

/// `BPF_PROG_TEST_RUN` on a program fd, callable from any thread: (return value, ns per
/// iteration). aya's `test_run` needs the program object, which one thread owns.
fn raw_test_run(fd: i32, data: &[u8], repeat: u32) -> (u32, u32) {
    /// `union bpf_attr`'s `test` member (include/uapi/linux/bpf.h).
    #[repr(C)]
    #[derive(Default)]
    struct TestAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        /// Explicit, so it is zero: the kernel refuses an attr with non-zero unknown bytes.
        _pad: u32,
    }
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    let mut out = vec![0u8; data.len() + 64];
    let mut attr = TestAttr {
        prog_fd: fd as u32,
        data_size_in: data.len() as u32,
        data_size_out: out.len() as u32,
        data_in: data.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..Default::default()
    };
    // SAFETY: the attr points at `data` and `out`, live for the call, of the sizes given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestAttr,
            std::mem::size_of::<TestAttr>(),
        )
    };
    assert!(
        rc == 0,
        "BPF_PROG_TEST_RUN: {}",
        std::io::Error::last_os_error()
    );
    (attr.retval, attr.duration)
}

fn pin_thread(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity"
        );
    }
}

/// Established packets on CPU 0, alone and while CPU 1 makes a new flow every iteration, with
/// the daemon's own flood limit (a program loaded as `run` loads it): (ns/pkt alone, ns/pkt
/// during the flood, new flows per second), each net of the wrapper.
fn flood_row(cfg: &Config) -> (f64, f64, f64) {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let mut dp = KernelDataplane::load_with_loader(&mut EbpfLoader::new(), FLOW_TABLE_SIZE, None)
        .expect("load");
    dp.apply(&Plan::build(cfg)).expect("program maps");
    allow_fixture_egress(&mut dp);
    for p in ["bench_pass", "bench_restore", "bench_restore_new_flow"] {
        xdp(&mut dp, p).load().expect("load");
    }
    let data = Spec {
        tcp_flags: ACK | PSH,
        ..Spec::tcp("198.51.100.7:40000", "10.200.0.100:80")
    }
    .build();
    let syn = Spec::tcp("198.51.100.7:40000", "10.200.0.100:80").build();
    set_packet(&mut dp, 0, &data);
    set_packet(&mut dp, 1, &syn);
    time_once(&mut dp, &data);
    let fd = |dp: &mut KernelDataplane, p: &str| xdp(dp, p).fd().unwrap().as_fd().as_raw_fd();
    let (restore, new_flow) = (
        fd(&mut dp, "bench_restore"),
        fd(&mut dp, "bench_restore_new_flow"),
    );
    pin_thread(0);
    set_target(&mut dp, "bench_pass");
    let wrap = median(
        (0..ROUNDS)
            .map(|_| raw_test_run(restore, &data, REPEAT).1 as f64)
            .collect(),
    );
    set_target(&mut dp, "ambassador_xdp");
    let est = |data: &[u8]| {
        median(
            (0..ROUNDS)
                .map(|_| {
                    let (rv, ns) = raw_test_run(restore, data, REPEAT);
                    assert_ne!(rv, 0, "wrapper or tail call failed");
                    ns as f64 - wrap
                })
                .collect(),
        )
    };
    let alone = est(&data);
    let stop = AtomicBool::new(false);
    let flows = AtomicU64::new(0);
    let flooded = std::thread::scope(|s| {
        let flooder = s.spawn(|| {
            pin_thread(1);
            let start = std::time::Instant::now();
            while !stop.load(Ordering::Relaxed) {
                raw_test_run(new_flow, &syn, 20_000);
                flows.fetch_add(20_000, Ordering::Relaxed);
            }
            start.elapsed()
        });
        // Let the flood fill the tables first.
        std::thread::sleep(std::time::Duration::from_millis(500));
        let t = est(&data);
        stop.store(true, Ordering::Relaxed);
        (t, flooder.join().unwrap())
    });
    let rate = flows.load(Ordering::Relaxed) as f64 / flooded.1.as_secs_f64();
    (alone, flooded.0, rate)
}

/// `--only PATH`: time one path, again and again (under `perf record`, say), and nothing else.
fn only() -> Option<String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => None,
        [flag, path] if flag == "--only" => Some(path.clone()),
        _ => panic!("usage: bench-xdp [--only established|new-flow|non-service]"),
    }
}

fn profile(dp: &mut KernelDataplane, path: &str, service: &[u8], data: &[u8], other: &[u8]) {
    set_packet(dp, 0, data);
    set_packet(dp, 1, service);
    time_once(dp, service);
    let pass = time(dp, "bench_pass", service);
    let ns = match path {
        "established" => {
            time_wrapped(dp, "bench_restore", "ambassador_xdp", data, REPEAT, |_| {}).0 + pass
        }
        "new-flow" => {
            time_wrapped(
                dp,
                "bench_restore_new_flow",
                "ambassador_xdp",
                service,
                NEW_FLOWS,
                |dp| clear(dp, "FLOWS"),
            )
            .0 + pass
        }
        "non-service" => time(dp, "ambassador_xdp", other),
        _ => panic!("--only: unknown path {path:?}"),
    };
    println!(
        "{path}: {ns:.1} ns ({:.2}x XDP_PASS at {pass:.1} ns)",
        ns / pass
    );
}

fn time_once(dp: &mut KernelDataplane, pkt: &[u8]) {
    let mut out = vec![0u8; pkt.len() + 64];
    xdp(dp, "ambassador_xdp")
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        })
        .expect("BPF_PROG_TEST_RUN");
}
