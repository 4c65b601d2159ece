//! Parser fuzzing: the RESP command and reply framers, the memcache command and reply framers,
//! the config loader (ours and twemproxy's) fed valid inputs, mutations of them and random
//! bytes. None may panic; a framer's claimed length is within the buffer; a whole command
//! stays whole when more bytes follow it; a strict prefix of a valid command is `Incomplete`
//! (never misread as something shorter). `AMB_FUZZ_INPUTS` sets the count (default 200,000).

use std::{io::Cursor, path::Path};

use ambassador::{
    config::Config,
    shard::{command, memcache, resp},
};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn count() -> usize {
    std::env::var("AMB_FUZZ_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000)
}

const RESP_SEEDS: &[&[u8]] = &[
    b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n",
    b"*2\r\n$3\r\nGET\r\n$0\r\n\r\n",
    b"PING\r\n",
    b"*1\r\n$4\r\nPING\r\n",
    b"*4\r\n$4\r\nMGET\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n",
];
const RESP_REPLIES: &[&[u8]] = &[
    b"+OK\r\n",
    b"-ERR x\r\n",
    b":42\r\n",
    b"$3\r\nabc\r\n",
    b"$-1\r\n",
    b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n",
];
const MC_SEEDS: &[&[u8]] = &[
    b"set k 0 0 5\r\nhello\r\n",
    b"cas k 1 2 3 99 noreply\r\nabc\r\n",
    b"get a b c\r\n",
    b"gat 10 a b\r\n",
    b"incr n 5\r\n",
    b"delete k noreply\r\n",
];
const MC_REPLIES: &[&[u8]] = &[
    b"VALUE a 0 3\r\nabc\r\nVALUE b 1 0\r\n\r\nEND\r\n",
    b"STORED\r\n",
    b"END\r\n",
];

fn mutate(rng: &mut StdRng, seeds: &[&[u8]]) -> Vec<u8> {
    let mut v = seeds[rng.gen_range(0..seeds.len())].to_vec();
    match rng.gen_range(0..6) {
        0 => {
            let n = rng.gen_range(1..64);
            return (0..n).map(|_| rng.gen()).collect();
        }
        1 => v.truncate(rng.gen_range(0..=v.len())),
        2 => {
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..v.len());
                v[i] = rng.gen();
            }
        }
        3 => {
            // Lengths and counts that lie: huge, negative, non-numeric.
            let s = String::from_utf8_lossy(&v).into_owned();
            let lie = ["1099511627776", "-7", "x", "99999999999999999999", ""][rng.gen_range(0..5)];
            let s = s.replacen(|c: char| c.is_ascii_digit(), lie, 1);
            v = s.into_bytes();
        }
        4 => {
            let i = rng.gen_range(0..=v.len());
            v.insert(i, b"\r\n*$: "[rng.gen_range(0..6)]);
        }
        _ => {}
    }
    v
}

#[test]
fn framers_never_panic_and_never_overclaim() {
    let mut rng = StdRng::seed_from_u64(0xA11CE);
    for _ in 0..count() {
        let buf = mutate(&mut rng, RESP_SEEDS);
        if let Ok((c, n)) = command::parse(&buf) {
            assert!(n <= buf.len(), "{buf:?}");
            if let Some(c) = c {
                assert!(c.args.iter().all(|r| r.end <= n), "{buf:?}");
                // Whole stays whole when more follows.
                let mut more = buf[..n].to_vec();
                more.extend_from_slice(b"*1\r\n$4\r\nPING\r\n");
                assert_eq!(command::parse(&more).unwrap().1, n, "{buf:?}");
            }
        }
        let buf = mutate(&mut rng, RESP_REPLIES);
        let mut c = Cursor::new(&buf[..]);
        if resp::check(&mut c).is_ok() {
            assert!(c.position() as usize <= buf.len());
            let _ = resp::frame(&buf);
        }
        let buf = mutate(&mut rng, MC_SEEDS);
        if let Ok((c, n)) = memcache::parse(&buf) {
            assert!(n <= buf.len(), "{buf:?}");
            if let Some(c) = c {
                assert!(c.words.iter().all(|r| r.end <= n), "{buf:?}");
                assert!(c.data.iter().all(|r| r.end <= n), "{buf:?}");
            }
        }
        let buf = mutate(&mut rng, MC_REPLIES);
        if let Ok(n) = memcache::reply_len(&buf) {
            assert!(n <= buf.len());
            let _ = memcache::values(&buf[..n]);
        }
    }
    println!(
        "reliability: framers_never_panic_and_never_overclaim: {} mutated inputs each for RESP commands, RESP replies, memcache commands, memcache replies: 0 panics, 0 over-claimed lengths",
        count()
    );
}

#[test]
fn strict_prefixes_of_valid_commands_are_incomplete() {
    for seed in RESP_SEEDS {
        for i in 0..seed.len() {
            assert_eq!(
                command::parse(&seed[..i]).unwrap_err(),
                resp::Error::Incomplete,
                "{:?}",
                String::from_utf8_lossy(&seed[..i])
            );
        }
    }
    for seed in MC_SEEDS {
        for i in 0..seed.len() {
            assert_eq!(
                memcache::parse(&seed[..i]).unwrap_err(),
                resp::Error::Incomplete,
                "{:?}",
                String::from_utf8_lossy(&seed[..i])
            );
        }
    }
}

#[test]
fn config_loader_never_panics_on_mutated_configs() {
    let seeds: &[&str] = &[
        "services:\n  - name: web\n    listen: 10.0.0.1:80/tcp\n    split:\n      backends:\n        - { name: a, address: 10.0.0.2:80, weight: 9 }\n",
        "services:\n  - name: cache\n    listen: 127.0.0.1:6379/tcp\n    redis:\n      hash_tag: \"{}\"\n      shards:\n        - { address: 127.0.0.1:7000 }\n",
        "alpha:\n  listen: 127.0.0.1:22121\n  redis: true\n  servers:\n   - 127.0.0.1:6379:1 a\n",
    ];
    let mut rng = StdRng::seed_from_u64(7);
    let n = count() / 20;
    for _ in 0..n {
        let mut v = seeds[rng.gen_range(0..seeds.len())].as_bytes().to_vec();
        for _ in 0..rng.gen_range(1..4) {
            let i = rng.gen_range(0..v.len());
            match rng.gen_range(0..3) {
                0 => v[i] = b"{}[]:-, \n0a\"'"[rng.gen_range(0..13)],
                1 => {
                    v.remove(i);
                }
                _ => v.insert(i, rng.gen_range(b' '..b'~')),
            }
        }
        let text = String::from_utf8_lossy(&v);
        if let Err(e) = Config::parse(Path::new("fuzz.yaml"), &text) {
            assert!(!e.to_string().is_empty());
        }
    }
}
