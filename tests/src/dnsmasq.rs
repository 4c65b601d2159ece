//! dnsmasq as the tests' DNS server (Debian's `dnsmasq-base`), on loopback, answering only
//! from the test's data.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{local::TempDir, topology::wait_for};

/// dnsmasq answering only from the test's data: hosts files in a watched directory (changes
/// apply without a restart) and SRV records from its command line.
pub struct Dnsmasq {
    child: Option<Child>,
    pub port: u16,
    dir: TempDir,
}

impl Dnsmasq {
    pub fn start(port: u16, hosts: &str, srv: &[&str]) -> Dnsmasq {
        let dir = TempDir::new("dnsmasq");
        std::fs::create_dir_all(dir.path("hosts.d")).unwrap();
        let d = Dnsmasq {
            child: None,
            port,
            dir,
        };
        d.set_hosts(hosts);
        d.restart(srv)
    }

    pub fn restart(mut self, srv: &[&str]) -> Dnsmasq {
        self.stop();
        let mut c = Command::new("dnsmasq");
        c.args([
            "--keep-in-foreground",
            "--pid-file",
            "--user=root",
            "--conf-file=/dev/null",
            "--no-hosts",
            "--no-resolv",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--local=/internal/",
            "--local=/consul/",
            "--log-facility=-",
        ])
        .arg(format!("--port={}", self.port))
        .arg(format!("--hostsdir={}", self.dir.path("hosts.d").display()));
        for s in srv {
            c.arg(format!("--srv-host={s}"));
        }
        let log = std::fs::File::create(self.dir.path("dnsmasq.log")).unwrap();
        let child = c
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("dnsmasq (setup installs dnsmasq-base)");
        self.child = Some(child);
        let port = self.port;
        wait_for(Duration::from_secs(10), "dnsmasq to listen", || {
            std::net::UdpSocket::bind(("127.0.0.1", port)).is_err()
        });
        self
    }

    /// Replace the A records (written aside and renamed in: dnsmasq sees whole files only).
    pub fn set_hosts(&self, text: &str) {
        let tmp = self.dir.path("hosts.d/.hosts.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.path("hosts.d/hosts")).unwrap();
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
    }
}
