//! The Redis sharding ambassador end to end: the real `ambassador run` binary in front of real
//! redis-server shards, checked against Debian's nutcracker (twemproxy) and the shards
//! themselves.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    time::Duration,
};

use ambassador::shard::resp::{self, Frame};
use ambassador_tests::{
    bench::{redis_server, spawn, wait_port, Proc},
    local::{free_port, write, LocalDaemon, TempDir},
    topology::wait_for,
};

fn cmd(args: &[&[u8]]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        v.extend_from_slice(a);
        v.extend_from_slice(b"\r\n");
    }
    v
}

/// A minimal RESP client: send raw bytes, read whole replies.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(port: u16) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client { s, buf: Vec::new() }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    fn read(&mut self) -> Frame {
        loop {
            match resp::frame(&self.buf) {
                Ok((f, n)) => {
                    self.buf.drain(..n);
                    return f;
                }
                Err(resp::Error::Incomplete) => {}
                Err(e) => panic!("bad reply: {e:?}"),
            }
            let mut chunk = [0u8; 65536];
            let n = self.s.read(&mut chunk).expect("reply within 10 s");
            assert!(n > 0, "connection closed before the reply");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn call(&mut self, args: &[&str]) -> Frame {
        let a: Vec<&[u8]> = args.iter().map(|s| s.as_bytes()).collect();
        self.send(&cmd(&a));
        self.read()
    }

    /// Whether the peer closed the connection (within 5 s).
    fn closed(&mut self) -> bool {
        self.s
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut b = [0u8; 1024];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
    }
}

fn bulk(s: &str) -> Frame {
    Frame::Bulk(s.as_bytes().to_vec())
}

fn ok() -> Frame {
    Frame::Simple("OK".into())
}

fn is_err(f: &Frame, needle: &str) -> bool {
    matches!(f, Frame::Error(e) if e.contains(needle))
}

struct Shards {
    ports: Vec<u16>,
    procs: Vec<Option<Proc>>,
    dir: TempDir,
}

impl Shards {
    fn start(n: usize, extra: &str) -> Shards {
        let dir = TempDir::new("redis");
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let procs = ports
            .iter()
            .map(|p| Some(redis_server(&dir, *p, extra)))
            .collect();
        Shards { ports, procs, dir }
    }

    fn yaml(&self, listen: u16, extra: &str) -> String {
        let mut y = format!(
            "services:\n  - name: cache\n    listen: 127.0.0.1:{listen}/tcp\n    redis:\n      hash: fnv1a_64\n      distribution: ketama\n      hash_tag: \"{{}}\"\n{extra}      shards:\n"
        );
        for (i, p) in self.ports.iter().enumerate() {
            y.push_str(&format!(
                "        - {{ name: shard-{i}, address: 127.0.0.1:{p}, weight: 1 }}\n"
            ));
        }
        y
    }

    /// Which shard holds `key` (asked of the shards themselves).
    fn holder(&self, key: &str) -> Vec<usize> {
        self.ports
            .iter()
            .enumerate()
            .filter(|(i, _)| self.procs[*i].is_some())
            .filter(|(_, p)| Client::connect(**p).call(&["EXISTS", key]) == Frame::Integer(1))
            .map(|(i, _)| i)
            .collect()
    }
}

fn daemon(yaml: &str) -> (LocalDaemon, u16) {
    let stats = free_port();
    let d = LocalDaemon::start_with(
        yaml,
        &[
            "--dataplane",
            "userspace",
            "--stats-listen",
            &format!("127.0.0.1:{stats}"),
        ],
    );
    (d, stats)
}

#[test]
fn keys_written_through_nutcracker_are_found_through_ambassador_running_its_config() {
    let shards = Shards::start(3, "");
    let nc_port = free_port();
    let mut conf = format!(
        "cache:\n  listen: 127.0.0.1:{nc_port}\n  hash: fnv1a_64\n  distribution: ketama\n  hash_tag: \"{{}}\"\n  redis: true\n  servers:\n"
    );
    for (i, p) in shards.ports.iter().enumerate() {
        conf.push_str(&format!("   - 127.0.0.1:{p}:1 shard-{i}\n"));
    }
    let nc_conf = shards.dir.path("nutcracker.yml");
    std::fs::write(&nc_conf, conf).unwrap();
    let _nc = spawn(
        &format!(
            "nutcracker -c {} -s {} -o {}",
            nc_conf.display(),
            free_port(),
            shards.dir.path("nutcracker.log").display()
        ),
        &shards.dir.path("nutcracker.out"),
    );
    wait_port(nc_port, "nutcracker");
    // ambassador runs the very same twemproxy file (only the listen port differs).
    let port = free_port();
    let nc_text = std::fs::read_to_string(&nc_conf).unwrap();
    let (_d, _) = daemon(&nc_text.replace(&format!(":{nc_port}\n"), &format!(":{port}\n")));
    // And `ambassador import` prints an equivalent config that `check` accepts.
    let out = std::process::Command::new(ambassador_tests::ambassador_bin())
        .arg("import")
        .arg(&nc_conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let imported = String::from_utf8(out.stdout).unwrap();
    assert!(
        imported.contains("hash: fnv1a_64") && imported.contains("name: shard-2"),
        "{imported}"
    );
    let imported_path = shards.dir.path("imported.yaml");
    std::fs::write(&imported_path, &imported).unwrap();
    let check = std::process::Command::new(ambassador_tests::ambassador_bin())
        .arg("check")
        .arg(&imported_path)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let keys: Vec<String> = (0..500)
        .map(|i| match i % 3 {
            0 => format!("user:{i}"),
            1 => format!("ключ-{i}"),
            _ => format!("{{tag{}}}:{i}", i / 7),
        })
        .collect();
    let mut nc = Client::connect(nc_port);
    let mut pipeline = Vec::new();
    for k in &keys {
        pipeline.extend(cmd(&[b"SET", k.as_bytes(), format!("v-{k}").as_bytes()]));
    }
    nc.send(&pipeline);
    for _ in &keys {
        assert_eq!(nc.read(), ok());
    }
    // Read every key back through ambassador, pipelined: same shard, same value.
    let mut amb = Client::connect(port);
    let mut pipeline = Vec::new();
    for k in &keys {
        pipeline.extend(cmd(&[b"GET", k.as_bytes()]));
    }
    amb.send(&pipeline);
    let mut found = 0;
    for k in &keys {
        assert_eq!(amb.read(), bulk(&format!("v-{k}")), "key {k}");
        found += 1;
    }
    assert_eq!(found, keys.len());
    // Every shard holds some keys: the test is not passing by having one shard.
    let mut per = [0; 3];
    for k in keys.iter().take(60) {
        for s in shards.holder(k) {
            per[s] += 1;
        }
    }
    assert!(per.iter().all(|&n| n > 5), "placement {per:?}");
}

#[test]
fn command_classes_split_reassemble_and_refuse_clearly() {
    let shards = Shards::start(3, "");
    let port = free_port();
    let (d, stats) = daemon(&shards.yaml(port, ""));
    let mut c = Client::connect(port);

    assert_eq!(c.call(&["PING"]), Frame::Simple("PONG".into()));
    assert_eq!(c.call(&["ECHO", "hi"]), bulk("hi"));
    assert_eq!(c.call(&["SELECT", "0"]), ok());
    assert!(is_err(&c.call(&["SELECT", "1"]), "database 0"));
    // Inline commands (twemproxy refuses them).
    c.send(b"SET inline-key 42\r\n");
    assert_eq!(c.read(), ok());
    c.send(b"GET inline-key\r\n");
    assert_eq!(c.read(), bulk("42"));

    // MSET over many keys lands each key on its own shard; MGET reassembles in order.
    let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
    let mut mset = vec!["MSET".to_string()];
    for k in &keys {
        mset.push(k.clone());
        mset.push(format!("val-{k}"));
    }
    let mset: Vec<&str> = mset.iter().map(|s| s.as_str()).collect();
    assert_eq!(c.call(&mset), ok());
    let held: Vec<Vec<usize>> = keys.iter().map(|k| shards.holder(k)).collect();
    assert!(held.iter().all(|h| h.len() == 1), "{held:?}");
    let distinct: std::collections::HashSet<usize> = held.iter().map(|h| h[0]).collect();
    assert!(
        distinct.len() >= 2,
        "the MSET must span shards: {distinct:?}"
    );
    let mut mget = vec!["MGET"];
    mget.extend(keys.iter().map(|s| s.as_str()));
    mget.insert(5, "missing-key");
    let expect: Vec<Frame> = mget[1..]
        .iter()
        .map(|k| {
            if *k == "missing-key" {
                Frame::Null
            } else {
                bulk(&format!("val-{k}"))
            }
        })
        .collect();
    assert_eq!(c.call(&mget), Frame::Array(expect));
    let mut exists = vec!["EXISTS"];
    exists.extend(keys.iter().take(10).map(|s| s.as_str()));
    exists.push("missing-key");
    assert_eq!(c.call(&exists), Frame::Integer(10));
    assert_eq!(
        c.call(&["DEL", "k0", "k1", "k2", "nope"]),
        Frame::Integer(3)
    );
    assert_eq!(c.call(&["UNLINK", "k3", "k4"]), Frame::Integer(2));
    assert_eq!(c.call(&["TOUCH", "k5", "k3"]), Frame::Integer(1));
    assert_eq!(
        c.call(&["MGET", "k0", "k5"]),
        Frame::Array(vec![Frame::Null, bulk("val-k5")])
    );

    // Hash tags keep related keys together.
    for i in 0..10 {
        c.call(&["SET", &format!("{{user42}}:f{i}"), "x"]);
    }
    let homes: std::collections::HashSet<Vec<usize>> = (0..10)
        .map(|i| shards.holder(&format!("{{user42}}:f{i}")))
        .collect();
    assert_eq!(homes.len(), 1, "{homes:?}");

    // Single-key commands of every class pass through.
    assert_eq!(c.call(&["INCRBY", "counter", "5"]), Frame::Integer(5));
    assert_eq!(
        c.call(&["HSET", "h", "a", "1", "b", "2"]),
        Frame::Integer(2)
    );
    assert_eq!(c.call(&["HGET", "h", "b"]), bulk("2"));
    assert_eq!(c.call(&["RPUSH", "l", "x", "y"]), Frame::Integer(2));
    assert_eq!(
        c.call(&["LRANGE", "l", "0", "-1"]),
        Frame::Array(vec![bulk("x"), bulk("y")])
    );
    assert_eq!(c.call(&["EXPIRE", "counter", "100"]), Frame::Integer(1));
    // A shard's own error comes back as it is.
    assert!(is_err(&c.call(&["INCR", "h"]), "WRONGTYPE"));

    // Unsupported commands: a clear error, and the connection stays usable.
    for unsupported in [
        vec!["MULTI"],
        vec!["KEYS", "*"],
        vec!["BLPOP", "l", "0"],
        vec!["SUBSCRIBE", "ch"],
        vec!["CONFIG", "GET", "save"],
    ] {
        let r = c.call(&unsupported);
        assert!(is_err(&r, "not proxied"), "{unsupported:?}: {r:?}");
    }
    assert_eq!(c.call(&["GET", "k5"]), bulk("val-k5"));

    // Deep pipeline: replies in request order.
    let mut p = Vec::new();
    for i in 0..2000 {
        p.extend(cmd(&[
            b"SET",
            format!("p{i}").as_bytes(),
            format!("{i}").as_bytes(),
        ]));
        p.extend(cmd(&[b"GET", format!("p{i}").as_bytes()]));
    }
    c.send(&p);
    for i in 0..2000 {
        assert_eq!(c.read(), ok());
        assert_eq!(c.read(), bulk(&i.to_string()));
    }
    assert_eq!(c.call(&["QUIT"]), ok());
    assert!(c.closed());

    // Stats in twemproxy's format, on the stats port and in `status --json`.
    wait_for(Duration::from_secs(5), "stats to count requests", || {
        let mut s = String::new();
        if let Ok(mut t) = TcpStream::connect(("127.0.0.1", stats)) {
            let _ = t.read_to_string(&mut s);
        }
        let v: serde_json::Value = serde_json::from_str(&s).unwrap_or_default();
        v["cache"]["shard-0"]["requests"].as_u64().unwrap_or(0) > 100
            && v["cache"]["fragments"].as_u64().unwrap_or(0) > 0
            && v["service"] == "ambassador"
    });
    // The same figures for Prometheus, over HTTP on the same port.
    let mut http = TcpStream::connect(("127.0.0.1", stats)).unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    http.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(
        text.contains("ambassador_shard_requests_total{pool=\"cache\",server=\"shard-0\"}"),
        "{text}"
    );
    // `status` reads the state file, refreshed every second.
    let responses = |st: &serde_json::Value| -> u64 {
        (0..3)
            .map(|i| {
                st["shards"]["cache"][format!("shard-{i}")]["responses"]
                    .as_u64()
                    .unwrap_or(0)
            })
            .sum()
    };
    wait_for(
        Duration::from_secs(5),
        "status to show the shard stats",
        || responses(&d.status()) > 4000,
    );
}

#[test]
fn passwords_on_both_sides() {
    let shards = Shards::start(2, "--requirepass shardpw");
    let port = free_port();
    let (_d, _) = daemon(&shards.yaml(
        port,
        "      password: clientpw\n      server_password: shardpw\n",
    ));
    let mut c = Client::connect(port);
    assert!(is_err(&c.call(&["GET", "a"]), "NOAUTH"));
    assert!(is_err(&c.call(&["AUTH", "wrong"]), "invalid password"));
    assert_eq!(c.call(&["AUTH", "clientpw"]), ok());
    assert_eq!(c.call(&["SET", "a", "1"]), ok());
    assert_eq!(
        c.call(&["MGET", "a", "b", "c", "d"]).clone(),
        Frame::Array(vec![bulk("1"), Frame::Null, Frame::Null, Frame::Null])
    );
}

#[test]
fn a_dead_or_silent_shard_fails_only_its_keys() {
    let mut shards = Shards::start(3, "");
    // A fourth "shard" that accepts and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let port = free_port();
    let mut yaml = shards.yaml(port, "      timeout_ms: 300\n");
    yaml.push_str(&format!(
        "        - {{ name: silent, address: 127.0.0.1:{silent_port}, weight: 1 }}\n"
    ));
    let (_d, _) = daemon(&yaml);
    let mut c = Client::connect(port);
    let mut by_outcome = (Vec::new(), Vec::new());
    for i in 0..60 {
        let k = format!("key{i}");
        match c.call(&["SET", &k, "v"]) {
            f if f == ok() => by_outcome.0.push(k),
            f => {
                assert!(is_err(&f, "timed out"), "{f:?}");
                by_outcome.1.push(k)
            }
        }
    }
    assert!(
        !by_outcome.0.is_empty() && !by_outcome.1.is_empty(),
        "{by_outcome:?}"
    );
    // Kill shard 0 mid-run: its keys fail, every other key still works, same connection.
    let victim_keys: Vec<&String> = by_outcome
        .0
        .iter()
        .filter(|k| shards.holder(k) == vec![0])
        .collect();
    assert!(!victim_keys.is_empty());
    shards.procs[0] = None;
    std::thread::sleep(Duration::from_millis(200));
    for k in &by_outcome.0 {
        let r = c.call(&["GET", k]);
        if victim_keys.contains(&k) {
            assert!(matches!(r, Frame::Error(_)), "{k}: {r:?}");
        } else {
            assert_eq!(r, bulk("v"), "{k}");
        }
    }
    drop(silent);
}

#[test]
fn malformed_input_gets_an_error_and_a_close_while_others_keep_working() {
    let shards = Shards::start(2, "");
    let port = free_port();
    let (_d, _) = daemon(&shards.yaml(port, ""));
    let mut good = Client::connect(port);
    assert_eq!(good.call(&["SET", "stay", "here"]), ok());
    for bad in [
        &b"*1\r\n$1099511627776\r\n"[..],
        b"*-3\r\n",
        b"*2\r\n:12\r\n:13\r\n",
        b"*1\r\n$3\r\nGETXX\r\n",
        b"*abc\r\n",
    ] {
        let mut c = Client::connect(port);
        c.send(bad);
        let r = c.read();
        assert!(
            is_err(&r, "Protocol error"),
            "{:?}: {r:?}",
            String::from_utf8_lossy(bad)
        );
        assert!(
            c.closed(),
            "{:?} must close the connection",
            String::from_utf8_lossy(bad)
        );
    }
    // Random bytes: never a crash; an error or silence, then the daemon still serves.
    let mut seed = 0x2545F4914F6CDD1Du64;
    for _ in 0..50 {
        let mut c = Client::connect(port);
        let junk: Vec<u8> = (0..200)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = c.s.write_all(&junk);
    }
    // An unterminated line that grows past the inline limit is refused.
    let mut c = Client::connect(port);
    let _ = c.s.write_all(&vec![b'a'; 70 * 1024]);
    assert!(is_err(&c.read(), "Protocol error"));
    assert_eq!(good.call(&["GET", "stay"]), bulk("here"));
}

#[test]
fn reload_moves_shards_under_open_client_connections() {
    let shards = Shards::start(2, "");
    let more = Shards::start(1, "");
    let port = free_port();
    let (d, _) = daemon(&shards.yaml(port, ""));
    let mut c = Client::connect(port);
    for i in 0..30 {
        assert_eq!(c.call(&["SET", &format!("r{i}"), "1"]), ok());
    }
    // Replace the shard set: the third redis only. The open connection carries on.
    let yaml = more.yaml(port, "");
    write(&d.config_path(), &yaml);
    d.signal("HUP");
    d.wait_log("config applied");
    for i in 0..30 {
        assert_eq!(
            c.call(&["GET", &format!("r{i}")]),
            Frame::Null,
            "r{i} is not on the new shard"
        );
    }
    assert_eq!(c.call(&["SET", "after", "1"]), ok());
    assert_eq!(more.holder("after"), vec![0]);
    // A rejected config leaves the running one serving.
    write(&d.config_path(), &yaml.replace("fnv1a_64", "no-such-hash"));
    d.signal("HUP");
    d.wait_log("config rejected");
    assert_eq!(c.call(&["GET", "after"]), bulk("1"));
}

#[test]
fn auto_eject_moves_a_dead_shards_keys_and_takes_it_back_after_the_retry_timeout() {
    let mut shards = Shards::start(3, "");
    let port = free_port();
    let (_d, stats) = daemon(&shards.yaml(
        port,
        "      auto_eject_hosts: true\n      server_failure_limit: 1\n      server_retry_timeout_ms: 1500\n",
    ));
    let mut c = Client::connect(port);
    let keys: Vec<String> = (0..60).map(|i| format!("ej{i}")).collect();
    for k in &keys {
        assert_eq!(c.call(&["SET", k, "1"]), ok());
    }
    let homes: Vec<usize> = keys.iter().map(|k| shards.holder(k)[0]).collect();
    let victim = (0..3)
        .max_by_key(|s| homes.iter().filter(|h| *h == s).count())
        .unwrap();
    let on_victim: Vec<&String> = keys
        .iter()
        .zip(&homes)
        .filter(|(_, h)| **h == victim)
        .map(|(k, _)| k)
        .collect();
    assert!(
        on_victim.len() < keys.len(),
        "keys spread over shards: {homes:?}"
    );
    let victim_port = shards.ports[victim];
    shards.procs[victim] = None;
    std::thread::sleep(Duration::from_millis(200));
    // The shard's failure (its connection closing, or the first request to it) ejects it
    // (failure limit 1): at most one request fails, then its keys go to the live shards.
    let mut failed = 0;
    for k in &on_victim {
        match c.call(&["SET", k, "2"]) {
            f if f == ok() => {}
            f => {
                assert!(matches!(f, Frame::Error(_)), "{f:?}");
                failed += 1;
                assert_eq!(c.call(&["SET", k, "2"]), ok(), "{k} after ejection");
            }
        }
    }
    assert!(
        failed <= 1,
        "{failed} requests failed; ejection should stop that after one"
    );
    let moved = on_victim
        .iter()
        .filter(|k| !shards.holder(k).is_empty())
        .count();
    assert_eq!(moved, on_victim.len(), "ejected keys land on live shards");
    let mut st = String::new();
    TcpStream::connect(("127.0.0.1", stats))
        .unwrap()
        .read_to_string(&mut st)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&st).unwrap();
    assert!(
        v["cache"]["server_ejects"].as_u64().unwrap_or(0) >= 1,
        "{st}"
    );
    // Bring the shard back; after the retry timeout its keys return to it.
    shards.procs[victim] = Some(redis_server(&shards.dir, victim_port, ""));
    std::thread::sleep(Duration::from_millis(1700));
    assert_eq!(c.call(&["SET", on_victim[0], "3"]), ok());
    assert!(
        shards.holder(on_victim[0]).contains(&1),
        "back on its own shard"
    );
    let mut direct = Client::connect(victim_port);
    assert_eq!(direct.call(&["GET", on_victim[0]]), bulk("3"));
}
