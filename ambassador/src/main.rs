//! The `ambassador` command: a thin wiring of the library's modules.

use std::{path::PathBuf, process::ExitCode};

use ambassador::{
    config::{self, Config},
    daemon, simulate, status,
};
use anyhow::{anyhow, Result};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(version, about = "Node-level L4 ambassador with an XDP fast path")]
struct Cli {
    /// Log lines as text (default) or JSON objects (for log collectors).
    #[arg(long, value_enum, global = true, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate a config file; exits non-zero with file:line, the key and the fix.
    Check { file: PathBuf },
    /// Print the ambassador config equivalent to a twemproxy (nutcracker) config.
    Import { file: PathBuf },
    /// Predict each backend's share of clients, and with --against how many clients a new
    /// config would move; with --pcap, what XDP does with each captured packet.
    Simulate {
        #[arg(long)]
        config: PathBuf,
        /// A capture (pcap, Ethernet, e.g. `tcpdump -i eth0 -w FILE`): print, per packet, the
        /// backend XDP sends it to as a new flow, or why it passes.
        #[arg(long, conflicts_with = "against")]
        pcap: Option<PathBuf>,
        #[arg(long, default_value_t = 100_000)]
        clients: u32,
        #[arg(long)]
        against: Option<PathBuf>,
        /// Seed of the simulated client addresses.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
    /// Load and attach the XDP program and keep it programmed from the config.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Interface to attach to (repeatable); overrides `interfaces:` in the config.
        #[arg(long = "interface", short = 'i')]
        interfaces: Vec<String>,
        /// Which kernel program goes on the interfaces: `auto` (native XDP where the driver
        /// has it and the device is not a veth; TC on veths and drivers without native XDP),
        /// `xdp` or `tc`; `IF=MODE` for one interface (repeatable). Overrides `attach:` and
        /// `attach_by_interface:` in the config.
        #[arg(long, value_name = "[IF=]MODE")]
        attach: Vec<config::AttachArg>,
        /// With XDP: native (the driver's), skb (generic), or auto (the kernel chooses).
        #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
        xdp_mode: XdpModeArg,
        /// Who forwards plain services: the kernel programs (XDP/TC), the userspace data plane,
        /// or the kernel when its programs can be loaded and attached (auto, with a warning
        /// saying why when they cannot).
        #[arg(long, value_enum, default_value_t = DataplaneArg::Auto)]
        dataplane: DataplaneArg,
        #[arg(long, default_value = daemon::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Where the sharding services' stats are served (twemproxy's JSON: connect and read),
        /// when the config has `redis` services.
        #[arg(long, default_value = "127.0.0.1:22222")]
        stats_listen: std::net::SocketAddr,
        /// Worker threads of each userspace path: default one per core for the TLS sidecar and
        /// the userspace data plane, half the cores (at least one) for the sharding ambassador,
        /// which shares its node with its clients and shards.
        #[arg(long)]
        workers: Option<usize>,
        /// At exit, leave XDP attached and its maps pinned so the next `run` (an upgrade)
        /// adopts every tracked flow; `ambassador detach` removes them.
        #[arg(long)]
        keep_on_exit: bool,
        /// Entries of the kernel connection table (one per flow; about 200 bytes each), beside
        /// a flood table a quarter its size. An adopted table keeps its size until
        /// `ambassador detach`.
        #[arg(long, default_value_t = ambassador_ebpf::FLOW_TABLE_SIZE)]
        flow_table_size: u32,
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        git: ConfigGitArgs,
    },
    /// Set a backend's weight on the running daemon (until the config file sets it again or
    /// the backend leaves it; kept across restarts).
    SetWeight {
        service: String,
        backend: String,
        weight: u32,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Send a backend no new flows; its open flows continue (`status` shows them fall to 0).
    Drain {
        service: String,
        backend: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Let a drained backend take new flows again.
    Undrain {
        service: String,
        backend: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Remove the XDP links and maps a daemon pinned (after `run --keep-on-exit` or a crash):
    /// the program leaves its interfaces and tracked flows are forgotten.
    Detach {
        #[arg(long, default_value = daemon::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Refused while a daemon answers at --admin or holds --state-dir's pid lock.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print a shell completion script (e.g. `ambassador completions bash > /etc/bash_completion.d/ambassador`).
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print the man page (roff), e.g. `ambassador man > /usr/share/man/man1/ambassador.1`.
    Man,
    /// The git-push PaaS sidecar: keep the newest commit of a ref checked out and published
    /// by an atomic symlink swap (`gitsync serve` hosts a repository that validates pushes).
    Gitsync(GitsyncCmd),
    /// Services, backends, weights and kernel counters of the running daemon.
    Status {
        #[arg(long)]
        json: bool,
        /// Redraw every second until interrupted.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
        /// With --admin, ask the daemon's admin API (`GET /status`); otherwise read the state
        /// the daemon publishes in --state-dir.
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// Where the admin API is, for `run` (serve) and the commands that use it.
#[derive(clap::Args, Clone)]
struct AdminArgs {
    /// Admin API endpoint: a unix socket path (default STATE_DIR/admin.sock, mode 0600) or a
    /// loopback IP:PORT (needs --admin-token-file).
    #[arg(long)]
    admin: Option<ambassador::admin::Endpoint>,
    /// File holding the bearer token of a TCP admin endpoint.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    #[arg(long, default_value = daemon::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

impl AdminArgs {
    fn endpoint(&self) -> ambassador::admin::Endpoint {
        self.admin
            .clone()
            .unwrap_or_else(|| ambassador::admin::Endpoint::default_for(&self.state_dir))
    }

    fn token(&self) -> Result<Option<String>> {
        self.admin_token_file
            .as_deref()
            .map(ambassador::admin::read_token)
            .transpose()
    }

    /// One request to the admin API: its status code and body.
    fn call(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, String)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(ambassador::admin::call(
            &self.endpoint(),
            self.token()?.as_deref(),
            method,
            path,
            body,
        ))
    }

    /// GET `path` from the admin API: the body of a 200 answer, else an error with the reason.
    fn get(&self, path: &str) -> Result<String> {
        let (status, text) = self.call(hyper::Method::GET, path, None)?;
        if status != 200 {
            return Err(anyhow!(
                "{} answered {path} with HTTP {status}: {}",
                self.endpoint(),
                text.trim()
            ));
        }
        Ok(text)
    }

    /// POST a change and print the daemon's answer; a refusal is an error with its reason.
    fn post(&self, path: &str, body: serde_json::Value) -> Result<()> {
        let (status, text) = self.call(hyper::Method::POST, path, Some(body))?;
        if status != 200 {
            return Err(anyhow!("{} (HTTP {status})", text.trim()));
        }
        let gen = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["generation"].as_u64())
            .unwrap_or_default();
        println!("applied (generation {gen})");
        Ok(())
    }
}

/// GitOps for the ambassador itself: `run --config-git URL --config ambassador.yaml`.
#[derive(clap::Args)]
struct ConfigGitArgs {
    /// Take the config from this git repository; --config is then its path inside it. A
    /// pushed config that fails `check` is refused and the running one keeps serving.
    #[arg(long)]
    config_git: Option<String>,
    #[arg(long, default_value = "main")]
    config_git_ref: String,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    config_git_period: std::time::Duration,
    /// Where the synced trees live (default STATE_DIR/config-git).
    #[arg(long)]
    config_git_root: Option<PathBuf>,
    #[arg(long)]
    config_git_token_file: Option<PathBuf>,
    #[arg(long, requires = "config_git_known_hosts_file")]
    config_git_ssh_key_file: Option<PathBuf>,
    #[arg(long, requires = "config_git_ssh_key_file")]
    config_git_known_hosts_file: Option<PathBuf>,
    /// Serve a webhook (POST /sync) and the sync's status here.
    #[arg(long)]
    config_git_listen: Option<std::net::SocketAddr>,
    #[arg(long, requires = "config_git_listen")]
    config_git_webhook_secret_file: Option<PathBuf>,
}

impl ConfigGitArgs {
    fn spec(self, state_dir: &std::path::Path) -> Option<ambassador::gitsync::Spec> {
        use ambassador::gitsync::{Credentials, Spec, Webhook};
        let repo = self.config_git?;
        Some(Spec {
            name: "config".into(),
            repo,
            reference: self.config_git_ref,
            root: self
                .config_git_root
                .unwrap_or_else(|| state_dir.join("config-git")),
            link: "current".into(),
            period: self.config_git_period,
            depth: 1,
            keep: 3,
            pre_publish: None,
            reuse_unchanged: None,
            post_publish: None,
            hook_timeout: std::time::Duration::from_secs(60),
            hook_retries: 0,
            fetch_timeout: std::time::Duration::from_secs(60),
            credentials: Credentials {
                token_file: self.config_git_token_file,
                username: None,
                ssh_key_file: self.config_git_ssh_key_file,
                known_hosts_file: self.config_git_known_hosts_file,
            },
            webhook: self.config_git_listen.map(|listen| Webhook {
                listen,
                secret_file: self.config_git_webhook_secret_file,
            }),
        })
    }
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct GitsyncCmd {
    #[command(subcommand)]
    sub: Option<GitsyncSub>,
    #[command(flatten)]
    sync: SyncArgs,
}

#[derive(Subcommand)]
enum GitsyncSub {
    /// Host a bare repository (created if missing) over `git daemon` on loopback; its
    /// pre-receive hook refuses pushes whose commit fails validation.
    Serve {
        /// The bare repository, e.g. /srv/git/app.git.
        #[arg(long)]
        dir: PathBuf,
        /// Shell command run in the pushed commit's tree; non-zero refuses the push.
        #[arg(long)]
        validate: Option<String>,
        /// An ambassador config in the repository that must pass `ambassador check`.
        #[arg(long)]
        check_config: Option<PathBuf>,
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        #[arg(long, default_value = "127.0.0.1:9418")]
        listen: std::net::SocketAddr,
        /// Install the repository and hook, then exit (serve it over ssh or your own daemon).
        #[arg(long)]
        install_only: bool,
    },
    /// The hook `serve` installs (run by git).
    #[command(hide = true)]
    PreReceive,
}

#[derive(clap::Args)]
struct SyncArgs {
    /// Remote URL or path. Credentials go in files (--token-file, --ssh-key-file), never here.
    #[arg(long, required = true)]
    repo: Option<String>,
    #[arg(long = "ref", default_value = "main")]
    reference: String,
    /// Directory of the per-commit trees and the link.
    #[arg(long, required = true)]
    root: Option<PathBuf>,
    /// The published symlink (a name inside --root, or an absolute path).
    #[arg(long, default_value = "current")]
    link: PathBuf,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    period: std::time::Duration,
    /// Shallow fetch depth (0: whole history).
    #[arg(long, default_value_t = 1)]
    depth: u32,
    /// Trees kept on disk, the published one included.
    #[arg(long, default_value_t = 3)]
    keep: usize,
    /// Command run in the new tree before publishing; failure keeps the old tree.
    #[arg(long)]
    pre_publish: Option<String>,
    /// Hard-link files a push did not change from the published tree (default: true without
    /// --pre-publish; a hook editing files in place would otherwise edit the live tree).
    #[arg(long, value_name = "BOOL")]
    reuse_unchanged: Option<bool>,
    /// Command run in the published tree after each publish.
    #[arg(long, conflicts_with_all = ["post_publish_signal", "post_publish_http"])]
    post_publish: Option<String>,
    /// Signal (e.g. HUP) sent after each publish to the process in --pid-file.
    #[arg(long, requires = "pid_file", conflicts_with = "post_publish_http")]
    post_publish_signal: Option<String>,
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// http:// URL POSTed (`{"commit": ...}`) after each publish.
    #[arg(long)]
    post_publish_http: Option<String>,
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    hook_timeout: std::time::Duration,
    #[arg(long, default_value_t = 2)]
    hook_retries: u32,
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    fetch_timeout: std::time::Duration,
    /// File holding an HTTPS token (sent as basic auth with --username).
    #[arg(long)]
    token_file: Option<PathBuf>,
    #[arg(long)]
    username: Option<String>,
    /// SSH private key file (needs --known-hosts-file: host keys are pinned).
    #[arg(long, requires = "known_hosts_file")]
    ssh_key_file: Option<PathBuf>,
    #[arg(long, requires = "ssh_key_file")]
    known_hosts_file: Option<PathBuf>,
    /// Serve POST /sync (webhook), /live, /ready, /status and /metrics here.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Webhook secret (GitHub signature, GitLab token or bearer); required off loopback.
    #[arg(long, requires = "listen")]
    webhook_secret_file: Option<PathBuf>,
    /// Names the job in logs and metrics.
    #[arg(long, default_value = "app")]
    name: String,
    /// Sync once and exit (non-zero unless a tree is published): for init containers.
    #[arg(long)]
    once: bool,
}

impl SyncArgs {
    fn spec(self) -> ambassador::gitsync::Spec {
        use ambassador::gitsync::{Credentials, PostPublish, Spec, Webhook};
        let post_publish = if self.post_publish.is_some()
            || self.post_publish_signal.is_some()
            || self.post_publish_http.is_some()
        {
            Some(PostPublish {
                command: self.post_publish,
                signal: self.post_publish_signal,
                pid_file: self.pid_file,
                http: self.post_publish_http,
            })
        } else {
            None
        };
        Spec {
            name: self.name,
            repo: self.repo.unwrap_or_default(),
            reference: self.reference,
            root: self.root.unwrap_or_default(),
            link: self.link,
            period: self.period,
            depth: self.depth,
            keep: self.keep,
            pre_publish: self.pre_publish,
            reuse_unchanged: self.reuse_unchanged,
            post_publish,
            hook_timeout: self.hook_timeout,
            hook_retries: self.hook_retries,
            fetch_timeout: self.fetch_timeout,
            credentials: Credentials {
                token_file: self.token_file,
                username: self.username,
                ssh_key_file: self.ssh_key_file,
                known_hosts_file: self.known_hosts_file,
            },
            webhook: self.listen.map(|listen| Webhook {
                listen,
                secret_file: self.webhook_secret_file,
            }),
        }
    }
}

fn gitsync(cmd: GitsyncCmd) -> Result<()> {
    use ambassador::gitsync::{self, serve};
    let rt = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    match cmd.sub {
        Some(GitsyncSub::PreReceive) => {
            if !serve::pre_receive()? {
                return Err(anyhow!("push refused: validation failed"));
            }
            Ok(())
        }
        Some(GitsyncSub::Serve {
            dir,
            validate,
            check_config,
            timeout,
            listen,
            install_only,
        }) => {
            let v = serve::Validation {
                validate,
                check_config,
                timeout,
            };
            if install_only {
                serve::install(&dir, &v)?;
                println!("{}: pre-receive validation installed", dir.display());
                return Ok(());
            }
            rt()?.block_on(serve::serve(&dir, &v, listen))
        }
        None => {
            let once = cmd.sync.once;
            let spec = cmd.sync.spec();
            rt()?.block_on(async move {
                let syncer = gitsync::Syncer::new(spec)?;
                if once {
                    if let Err(e) = syncer.sync(true).await {
                        if !syncer.status().ready {
                            return Err(anyhow!("nothing published: {e:#}"));
                        }
                    }
                    return match syncer.status() {
                        s if s.ready && s.rejected.is_none() => Ok(()),
                        s => Err(anyhow!(
                            "nothing published: {}",
                            s.last_error.unwrap_or_default()
                        )),
                    };
                }
                if let Some(w) = &syncer.spec.webhook {
                    gitsync::http::serve(w, syncer.clone()).await?;
                }
                let mut hup =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                let task = tokio::spawn(syncer.clone().run());
                loop {
                    tokio::select! {
                        _ = hup.recv() => syncer.trigger(),
                        _ = term.recv() => break,
                        _ = tokio::signal::ctrl_c() => break,
                    }
                }
                task.abort();
                Ok(())
            })
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum DataplaneArg {
    Auto,
    #[value(alias = "xdp")]
    Kernel,
    Userspace,
}

#[derive(Clone, Copy, ValueEnum)]
enum XdpModeArg {
    /// Native where the driver supports it, generic otherwise.
    Auto,
    Native,
    Skb,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => fmt.json().init(),
    }
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Import { file } => {
            let cfg = Config::load(&file).map_err(|e| anyhow!("{e}"))?;
            print!(
                "# translated from {} by `ambassador import`\n{}",
                file.display(),
                serde_yaml::to_string(&cfg)?
            );
            Ok(())
        }
        Cmd::Check { file } => {
            let cfg = Config::load(&file).map_err(|e| anyhow!("{e}"))?;
            for s in &cfg.services {
                if let Some((r, _)) = s.sharding().filter(|(r, _)| r.auto_eject_hosts) {
                    eprintln!(
                        "warning: service {}: auto_eject_hosts moves a failing shard's keys to the other shards (reads miss, writes land elsewhere) until it is retried after {} ms",
                        s.name, r.server_retry_timeout_ms
                    );
                }
            }
            let backends: usize = cfg.services.iter().map(|s| s.split.backends.len()).sum();
            println!(
                "{}: ok ({} services, {backends} backends)",
                file.display(),
                cfg.services.len()
            );
            Ok(())
        }
        Cmd::Simulate {
            config,
            pcap: Some(pcap),
            json,
            ..
        } => {
            let cfg = Config::load(&config).map_err(|e| anyhow!("{e}"))?;
            let frames = simulate::read_pcap(&pcap)?;
            let out = simulate::packets(&cfg, &frames);
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print!("{}", simulate::render_packets(&out));
            }
            Ok(())
        }
        Cmd::Simulate {
            config,
            clients,
            against,
            seed,
            json,
            pcap: None,
        } => {
            let cfg = Config::load(&config).map_err(|e| anyhow!("{e}"))?;
            let other = match against {
                Some(p) => Some(Config::load(&p).map_err(|e| anyhow!("{e}"))?),
                None => None,
            };
            let sim = simulate::simulate(&cfg, other.as_ref(), clients, seed);
            if json {
                println!("{}", serde_json::to_string_pretty(&sim)?);
            } else {
                print!("{}", simulate::render(&sim));
            }
            Ok(())
        }
        Cmd::Run {
            config,
            interfaces,
            attach,
            xdp_mode,
            dataplane,
            pin_dir,
            stats_listen,
            workers,
            keep_on_exit,
            flow_table_size,
            admin,
            git,
        } => {
            let xdp_mode = match xdp_mode {
                XdpModeArg::Auto => None,
                XdpModeArg::Native => Some(aya::programs::XdpMode::Driver),
                XdpModeArg::Skb => Some(aya::programs::XdpMode::Skb),
            };
            let dataplane = match dataplane {
                DataplaneArg::Auto => daemon::DataplaneMode::Auto,
                DataplaneArg::Kernel => daemon::DataplaneMode::Kernel,
                DataplaneArg::Userspace => daemon::DataplaneMode::Userspace,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(daemon::run(daemon::RunOptions {
                config,
                interfaces,
                attach,
                xdp_mode,
                dataplane,
                state_dir: admin.state_dir.clone(),
                pin_dir,
                stats_listen,
                workers,
                keep_on_exit,
                flow_table_size,
                admin: admin.admin.clone(),
                admin_token: admin.token()?,
                config_git: git.spec(&admin.state_dir),
            }))
        }
        Cmd::SetWeight {
            service,
            backend,
            weight,
            admin,
        } => admin.post(
            "/weight",
            serde_json::json!({ "service": service, "backend": backend, "weight": weight }),
        ),
        Cmd::Drain {
            service,
            backend,
            admin,
        } => admin.post(
            "/drain",
            serde_json::json!({ "service": service, "backend": backend }),
        ),
        Cmd::Undrain {
            service,
            backend,
            admin,
        } => admin.post(
            "/undrain",
            serde_json::json!({ "service": service, "backend": backend }),
        ),
        Cmd::Detach { pin_dir, admin } => {
            if admin.admin.is_some() && admin.get("/live").is_ok() {
                return Err(anyhow!(
                    "a running daemon answers at {}: it owns what is pinned; stop it (it detaches at exit unless run with --keep-on-exit)",
                    admin.endpoint()
                ));
            }
            daemon::ensure_not_running(&admin.state_dir)?;
            let removed = ambassador::dataplane::kernel::detach(&pin_dir)?;
            if removed.is_empty() {
                println!("nothing pinned in {}", pin_dir.display());
            } else {
                for p in &removed {
                    println!("removed {}", p.display());
                }
            }
            Ok(())
        }
        Cmd::Status { json, watch, admin } => {
            let report = || -> Result<status::StatusReport> {
                if admin.admin.is_some() {
                    Ok(serde_json::from_str(&admin.get("/status")?)?)
                } else {
                    status::report(&admin.state_dir)
                }
            };
            if watch {
                loop {
                    // Clear the screen and home the cursor, then draw.
                    let text = match report() {
                        Ok(r) => status::render(&r),
                        Err(e) => format!("{e:#}\n"),
                    };
                    print!("\x1b[2J\x1b[H{text}");
                    use std::io::Write as _;
                    std::io::stdout().flush()?;
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
            let r = report()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", status::render(&r));
            }
            Ok(())
        }
        Cmd::Gitsync(cmd) => gitsync(cmd),
        Cmd::Completions { shell } => {
            use clap::CommandFactory as _;
            let shell = match shell {
                Shell::Bash => clap_complete::Shell::Bash,
                Shell::Zsh => clap_complete::Shell::Zsh,
                Shell::Fish => clap_complete::Shell::Fish,
            };
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "ambassador",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Cmd::Man => {
            use clap::CommandFactory as _;
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(())
        }
    }
}
