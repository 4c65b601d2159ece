//! The `ambassador` command: a thin wiring of the library's modules.

use std::{path::PathBuf, process::ExitCode};

use ambassador::{config::Config, daemon, simulate, status};
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
    /// config would move.
    Simulate {
        #[arg(long)]
        config: PathBuf,
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
        #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
        xdp_mode: XdpModeArg,
        /// Who forwards plain services: XDP, the userspace data plane, or XDP when it can be
        /// loaded and attached (auto, with a warning saying why when it cannot).
        #[arg(long, value_enum, default_value_t = DataplaneArg::Auto)]
        dataplane: DataplaneArg,
        #[arg(long, default_value = daemon::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Where the sharding services' stats are served (twemproxy's JSON: connect and read),
        /// when the config has `redis` services.
        #[arg(long, default_value = "127.0.0.1:22222")]
        stats_listen: std::net::SocketAddr,
        /// Worker threads of each userspace path (TLS sidecar, userspace data plane, sharding);
        /// default one per core.
        #[arg(long)]
        workers: Option<usize>,
        /// At exit, leave XDP attached and its maps pinned so the next `run` (an upgrade)
        /// adopts every tracked flow; `ambassador detach` removes them.
        #[arg(long)]
        keep_on_exit: bool,
        /// Entries of the kernel connection table (two per flow; about 200 bytes each). An
        /// adopted table keeps its size until `ambassador detach`.
        #[arg(long, default_value_t = ambassador_ebpf::FLOW_TABLE_SIZE)]
        flow_table_size: u32,
        #[command(flatten)]
        admin: AdminArgs,
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
        #[arg(long, default_value = daemon::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Print a shell completion script (e.g. `ambassador completions bash > /etc/bash_completion.d/ambassador`).
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print the man page (roff), e.g. `ambassador man > /usr/share/man/man1/ambassador.1`.
    Man,
    /// Services, backends, weights and kernel counters of the running daemon.
    Status {
        #[arg(long)]
        json: bool,
        /// Redraw every second until interrupted.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
        #[arg(long, default_value = daemon::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
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

    /// POST a change and print the daemon's answer; a refusal is an error with its reason.
    fn post(&self, path: &str, body: serde_json::Value) -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (status, text) = rt.block_on(ambassador::admin::call(
            &self.endpoint(),
            self.token()?.as_deref(),
            hyper::Method::POST,
            path,
            Some(body),
        ))?;
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

#[derive(Clone, Copy, ValueEnum)]
enum DataplaneArg {
    Auto,
    Xdp,
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
            clients,
            against,
            seed,
            json,
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
            xdp_mode,
            dataplane,
            pin_dir,
            stats_listen,
            workers,
            keep_on_exit,
            flow_table_size,
            admin,
        } => {
            let xdp_mode = match xdp_mode {
                XdpModeArg::Auto => None,
                XdpModeArg::Native => Some(aya::programs::XdpMode::Driver),
                XdpModeArg::Skb => Some(aya::programs::XdpMode::Skb),
            };
            let dataplane = match dataplane {
                DataplaneArg::Auto => daemon::DataplaneMode::Auto,
                DataplaneArg::Xdp => daemon::DataplaneMode::Xdp,
                DataplaneArg::Userspace => daemon::DataplaneMode::Userspace,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(daemon::run(daemon::RunOptions {
                config,
                interfaces,
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
        Cmd::Detach { pin_dir, state_dir } => {
            daemon::ensure_not_running(&state_dir)?;
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
        Cmd::Status {
            json,
            watch,
            state_dir,
        } => {
            if watch {
                loop {
                    // Clear the screen and home the cursor, then draw.
                    let text = match status::report(&state_dir) {
                        Ok(r) => status::render(&r),
                        Err(e) => format!("{e:#}\n"),
                    };
                    print!("\x1b[2J\x1b[H{text}");
                    use std::io::Write as _;
                    std::io::stdout().flush()?;
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
            let r = status::report(&state_dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", status::render(&r));
            }
            Ok(())
        }
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
