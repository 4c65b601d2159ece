//! Golden placement tests against the real thing: keys written through Debian's nutcracker
//! (twemproxy) land on three real redis-servers; `ambassador::shard` must name the same shard
//! for every key, for every hash and distribution, with named and unnamed servers, hash tags,
//! and bytes ≥ 0x80 in keys.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    time::Duration,
};

use ambassador::shard::{dist::Kind, hashed_part, Distribution, Hash, Server};
use ambassador_tests::{
    bench::{redis_server, spawn, wait_port, Proc},
    local::{free_port, TempDir},
};

const KEYS: usize = 300;

fn resp(args: &[&[u8]]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        v.extend_from_slice(a);
        v.extend_from_slice(b"\r\n");
    }
    v
}

/// Send pipelined commands, return one reply line per command.
fn pipeline(port: u16, cmds: &[Vec<u8>]) -> Vec<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for chunk in cmds.chunks(100) {
        s.write_all(&chunk.concat()).unwrap();
    }
    let mut r = BufReader::new(s);
    (0..cmds.len())
        .map(|_| {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            line.trim().to_string()
        })
        .collect()
}

fn keys(pool: &str) -> Vec<Vec<u8>> {
    (0..KEYS)
        .map(|i| match i % 4 {
            0 => format!("{pool}:key:{i}").into_bytes(),
            1 => format!("{pool}:ключ:{i}").into_bytes(),
            2 => format!("{pool}:{{user{}}}:field", i / 3).into_bytes(),
            _ => format!("{i}é{pool}\u{ff}x").into_bytes(),
        })
        .collect()
}

#[test]
fn placement_matches_nutcracker_for_every_hash_and_distribution() {
    let dir = TempDir::new("shard");
    let weights = [1u32, 2, 1];
    // free_port can hand out a port twice (each is free when asked): nutcracker refuses a
    // config whose pools share a listen address, so every port here is distinct.
    let mut used = std::collections::HashSet::new();
    let mut unique_port = move || loop {
        let p = free_port();
        if used.insert(p) {
            break p;
        }
    };
    let ports: Vec<u16> = weights.iter().map(|_| unique_port()).collect();
    let _redis: Vec<Proc> = ports.iter().map(|p| redis_server(&dir, *p, "")).collect();

    // One pool per (hash, distribution, named servers?).
    let mut pools = Vec::new();
    let mut conf = String::new();
    for hash in Hash::ALL {
        for (kind, kname) in [(Kind::Ketama, "ketama"), (Kind::Modula, "modula")] {
            for named in [true, false] {
                if !named && kind == Kind::Modula {
                    continue; // names only matter to ketama
                }
                let name = format!(
                    "{}_{kname}_{}",
                    hash.name(),
                    if named { "named" } else { "anon" }
                );
                let port = unique_port();
                conf.push_str(&format!(
                    "{name}:\n  listen: 127.0.0.1:{port}\n  hash: {}\n  distribution: {kname}\n  hash_tag: \"{{}}\"\n  redis: true\n  auto_eject_hosts: false\n  servers:\n",
                    hash.name()
                ));
                for (i, (p, w)) in ports.iter().zip(weights).enumerate() {
                    let label = if named {
                        format!(" shard-{i}")
                    } else {
                        String::new()
                    };
                    conf.push_str(&format!("   - 127.0.0.1:{p}:{w}{label}\n"));
                }
                pools.push((name, port, hash, kind, named));
            }
        }
    }
    let conf_path = dir.path("nutcracker.yml");
    std::fs::write(&conf_path, &conf).unwrap();
    let _nc = spawn(
        &format!(
            "nutcracker -c {} -s {} -o {}",
            conf_path.display(),
            unique_port(),
            dir.path("nutcracker.log").display()
        ),
        &dir.path("nutcracker.log"),
    );
    for (_, port, ..) in &pools {
        if std::panic::catch_unwind(|| wait_port(*port, "nutcracker")).is_err() {
            panic!(
                "nutcracker did not listen on {port}:\n{}",
                std::fs::read_to_string(dir.path("nutcracker.log")).unwrap_or_default()
            );
        }
    }

    let mut mismatches = Vec::new();
    for (name, port, hash, kind, named) in &pools {
        let ks = keys(name);
        let sets: Vec<Vec<u8>> = ks.iter().map(|k| resp(&[b"SET", k, b"v"])).collect();
        let replies = pipeline(*port, &sets);
        assert!(replies.iter().all(|r| r == "+OK"), "{name}: {replies:?}");
        // Where did each key land?
        let exists: Vec<Vec<u8>> = ks.iter().map(|k| resp(&[b"EXISTS", k])).collect();
        let found: Vec<Vec<String>> = ports.iter().map(|p| pipeline(*p, &exists)).collect();
        let servers: Vec<Server> = ports
            .iter()
            .zip(weights)
            .enumerate()
            .map(|(i, (p, w))| Server {
                name: named.then(|| format!("shard-{i}")),
                host: "127.0.0.1".into(),
                port: *p,
                weight: w,
            })
            .collect();
        let dist = Distribution::build(*kind, &servers, &[]);
        for (j, k) in ks.iter().enumerate() {
            let actual: Vec<usize> = (0..ports.len()).filter(|&s| found[s][j] == ":1").collect();
            assert_eq!(
                actual.len(),
                1,
                "{name}: key {:?} on {actual:?}",
                String::from_utf8_lossy(k)
            );
            let ours = dist
                .dispatch(hash.hash(hashed_part(k, Some(*b"{}"))))
                .unwrap();
            if ours != actual[0] {
                mismatches.push(format!(
                    "{name}: {:?} nutcracker {} ours {ours}",
                    String::from_utf8_lossy(k),
                    actual[0]
                ));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} placements differ, e.g.:\n{}",
        mismatches.len(),
        pools.len() * KEYS,
        mismatches
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
