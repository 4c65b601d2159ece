//! Test helper: a line echo server (`echo-server ADDR`), printing the address it bound. Load
//! tests run it in its own process so its sockets do not count against theirs.

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpListener,
};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let addr = std::env::args().nth(1).expect("echo-server ADDR");
    let l = TcpListener::bind(&addr).await.expect("bind");
    println!("{}", l.local_addr().unwrap());
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            let mut line = String::new();
            while r.read_line(&mut line).await.unwrap_or(0) > 0 {
                if w.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
                line.clear();
            }
        });
    }
}
