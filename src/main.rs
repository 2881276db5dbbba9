//! The `k8scsi` binary: `serve` runs the CSI driver, `client` drives a running one from the
//! shell, `bench` measures one.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use k8scsi::client::ClientCommand;
use k8scsi::server::{Endpoint, Mode, ServeConfig};

#[derive(Debug, Parser)]
#[command(name = "k8scsi", version, about = "A Kubernetes CSI storage driver")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
struct LogArgs {
    /// Log format.
    #[arg(long, env = "K8SCSI_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log level (error, warn, info, debug) or a tracing filter.
    #[arg(long, env = "K8SCSI_LOG_LEVEL", default_value = "info", value_parser = parse_log_level)]
    log_level: String,
}

/// Checks a `--log-level`: a level, or a tracing filter whose every directive names its level
/// (`target=level`). tracing reads a bare word that is not a level as a target to log at every
/// level, so a typo (`inof`) used to turn the driver's own logging off without a word.
fn parse_log_level(raw: &str) -> Result<String, String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    for directive in raw.split(',').map(str::trim) {
        let level = directive
            .rsplit_once('=')
            .map_or(directive, |(_, level)| level);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{directive:?} names no level: expected one of {} or target=level",
                LEVELS.join(", ")
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(raw).map_err(|e| e.to_string())?;
    Ok(raw.to_string())
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the CSI Identity, Controller and Node services.
    Serve {
        /// unix:///path/to/csi.sock, or tcp://host:port for debugging.
        #[arg(
            long,
            env = "K8SCSI_ENDPOINT",
            default_value = "unix:///run/k8scsi/csi.sock"
        )]
        endpoint: String,
        /// This node's name (Kubernetes: spec.nodeName).
        #[arg(long, env = "K8SCSI_NODE_ID")]
        node_id: String,
        /// CSI driver name (the StorageClass provisioner).
        #[arg(long, env = "K8SCSI_DRIVER_NAME", default_value = "k8scsi")]
        driver_name: String,
        /// Where the metadata store lives.
        #[arg(
            long,
            env = "K8SCSI_STATE_DIR",
            default_value = "/var/lib/k8scsi/state"
        )]
        state_dir: PathBuf,
        /// Where volume data lives.
        #[arg(long, env = "K8SCSI_DATA_DIR", default_value = "/var/lib/k8scsi/data")]
        data_dir: PathBuf,
        /// Which services to serve.
        #[arg(long, env = "K8SCSI_MODE", value_enum, default_value = "all")]
        mode: Mode,
        /// Volumes this node may host (0 = no limit), reported in NodeGetInfo.
        #[arg(long, env = "K8SCSI_MAX_VOLUMES_PER_NODE", default_value_t = 0)]
        max_volumes_per_node: u64,
        /// The only tree where staging and target paths may live.
        #[arg(long, env = "K8SCSI_KUBELET_DIR", default_value = "/var/lib/kubelet")]
        kubelet_dir: PathBuf,
        /// Topology label key carrying the node ID.
        #[arg(
            long,
            env = "K8SCSI_TOPOLOGY_KEY",
            default_value = "topology.k8scsi.io/node"
        )]
        topology_key: String,
        /// Serve Prometheus /metrics and a plain /healthz on this address (host:port; port 0
        /// picks a free port and logs it). Off when unset.
        #[arg(long, env = "K8SCSI_METRICS_ADDRESS")]
        metrics_address: Option<String>,
        /// How often volume usage is measured for the metrics (500ms, 60s, 5m, ...).
        #[arg(long, env = "K8SCSI_USAGE_INTERVAL", default_value = "60s",
              value_parser = k8scsi::units::parse_duration)]
        usage_interval: std::time::Duration,
        /// How often reconciliation re-runs for the metrics (0: only at start).
        #[arg(long, env = "K8SCSI_RECONCILE_INTERVAL", default_value = "10m",
              value_parser = k8scsi::units::parse_duration)]
        reconcile_interval: std::time::Duration,
        /// How long mounting or unmounting a share (type: shared) may take before it is
        /// abandoned (mount) or detached lazily (unmount).
        #[arg(long, env = "K8SCSI_SHARE_TIMEOUT", default_value = "30s",
              value_parser = k8scsi::units::parse_duration)]
        share_timeout: std::time::Duration,
        /// The program that mounts shares (mount(8) or a wrapper, e.g. one that enters the
        /// host's mount namespace).
        #[arg(long, env = "K8SCSI_MOUNT_PROGRAM", default_value = "mount")]
        mount_program: String,
        #[command(flatten)]
        log: LogArgs,
    },
    #[command(flatten)]
    Ops(k8scsi::ops::Command),
    /// Talk to a running CSI driver.
    Client {
        /// The driver's endpoint.
        #[arg(
            long,
            env = "K8SCSI_ENDPOINT",
            default_value = "unix:///run/k8scsi/csi.sock"
        )]
        endpoint: String,
        #[command(subcommand)]
        command: ClientCommand,
    },
    /// Measure throughput, latency and memory of a k8scsi server.
    Bench(k8scsi::bench::BenchArgs),
    /// Measure snapshot and restore times on a data directory (see scripts/bench-snapshots.sh).
    BenchSnapshots(k8scsi::bench::SnapshotBenchArgs),
}

fn init_logging(args: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match cli.command {
        // The operator commands read the store and the node directly; they need no server.
        Command::Ops(command) => return k8scsi::ops::run(command),
        command => command,
    };
    // The load client runs on one thread: it shares the machine with the server it measures,
    // and a work-stealing pool would spend that machine's CPU on waking its own threads.
    let mut builder = match command {
        Command::Bench(_) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().max_blocking_threads(64).build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("k8scsi: starting runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), String> = runtime.block_on(async {
        match command {
            Command::Serve {
                endpoint,
                node_id,
                driver_name,
                state_dir,
                data_dir,
                mode,
                max_volumes_per_node,
                kubelet_dir,
                topology_key,
                metrics_address,
                usage_interval,
                reconcile_interval,
                share_timeout,
                mount_program,
                log,
            } => {
                init_logging(&log);
                let config = ServeConfig {
                    endpoint: Endpoint::parse(&endpoint)?,
                    node_id,
                    driver_name,
                    state_dir,
                    data_dir,
                    mode,
                    max_volumes_per_node,
                    kubelet_dir,
                    topology_key,
                    metrics_address,
                    usage_interval,
                    reconcile_interval,
                    share_timeout,
                    mount_program,
                };
                k8scsi::server::serve(config, shutdown_signal())
                    .await
                    .map_err(|e| e.to_string())
            }
            Command::Client { endpoint, command } => {
                k8scsi::client::run(&Endpoint::parse(&endpoint)?, command).await
            }
            Command::Bench(args) => k8scsi::bench::run(args).await,
            Command::BenchSnapshots(args) => k8scsi::bench::run_snapshots(args).await,
            Command::Ops(_) => unreachable!("handled before the runtime starts"),
        }
    });
    // Blocking work still running (a copy finishing its current file, a call stuck on a hung
    // filesystem) gets a bounded wait: dropping the runtime would wait for it forever.
    runtime.shutdown_timeout(std::time::Duration::from_secs(10));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("k8scsi: {e}");
            ExitCode::FAILURE
        }
    }
}
