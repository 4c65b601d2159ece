//! Test helper for the connect-time ambassador: joins a cgroup, then dials an address `N`
//! times with plain HTTP and prints, per connection, what `getpeername` says, its own socket
//! address, and the backend's answer (`NAME CLIENT-ADDR`).
//!
//! `cgroup-dial CGROUP-DIR ADDR N [udp]`: with `udp`, N datagrams from one unconnected UDP
//! socket, printing where each reply came from (`recvfrom`), the socket's address and the reply.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (cgroup, addr, n) = (&args[1], &args[2], args[3].parse::<usize>().unwrap());
    std::fs::write(
        format!("{cgroup}/cgroup.procs"),
        std::process::id().to_string(),
    )
    .expect("joining the cgroup");
    if args.get(4).map(String::as_str) == Some("udp") {
        let bind = if addr.starts_with('[') {
            "[::1]:0"
        } else {
            "127.0.0.1:0"
        };
        let s = std::net::UdpSocket::bind(bind).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for _ in 0..n {
            s.send_to(b"ping", addr.as_str()).expect("send");
            let mut b = [0u8; 512];
            let (len, from) = s.recv_from(&mut b).expect("reply within 5 s");
            println!(
                "peer={from} local={} body={}",
                s.local_addr().unwrap(),
                String::from_utf8_lossy(&b[..len]).trim()
            );
        }
        return;
    }
    for _ in 0..n {
        let mut s = TcpStream::connect(addr.as_str()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        // The backend keeps the connection open: read until the (one-line) body is complete.
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while !(buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.ends_with(b"\n")) {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let r = String::from_utf8_lossy(&buf).to_string();
        let body = r.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_string();
        println!(
            "peer={} local={} body={body}",
            s.peer_addr().unwrap(),
            s.local_addr().unwrap()
        );
    }
}
