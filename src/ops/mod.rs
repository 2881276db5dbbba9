//! The operator's commands: `k8scsi volumes list|show`, `k8scsi snapshots list`,
//! `k8scsi usage` and `k8scsi doctor`.
//!
//! They read the node directly (volume directories, the mount table) and the state store: from
//! its file when no server has it open, else from the running server over its admin socket
//! (see [`crate::admin`]). They never write the store; only `doctor` writes anything, and only
//! scratch files in the temporary directory for its filesystem probes.

mod doctor;
mod volumes;

use std::path::PathBuf;
use std::process::ExitCode;

use crate::store::{ReadSource, StateDump};

pub use doctor::DoctorArgs;

/// Where the node's k8scsi state lives; the same flags and variables as `k8scsi serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeDirs {
    /// Where the metadata store lives.
    #[arg(
        long,
        env = "K8SCSI_STATE_DIR",
        default_value = "/var/lib/k8scsi/state"
    )]
    pub state_dir: PathBuf,
    /// Where volume data lives.
    #[arg(long, env = "K8SCSI_DATA_DIR", default_value = "/var/lib/k8scsi/data")]
    pub data_dir: PathBuf,
    /// The kubelet's directory (where publications live).
    #[arg(long, env = "K8SCSI_KUBELET_DIR", default_value = "/var/lib/kubelet")]
    pub kubelet_dir: PathBuf,
}

/// Output format of the listing commands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    #[default]
    Table,
    /// One JSON document for scripts.
    Json,
}

/// The operator's top-level commands (flattened into the binary's subcommands).
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Inspect the volumes recorded on this node (safe while the server runs).
    Volumes {
        #[command(subcommand)]
        command: VolumesCommand,
    },
    /// Inspect the snapshots recorded on this node (safe while the server runs).
    Snapshots {
        #[command(subcommand)]
        command: SnapshotsCommand,
    },
    /// Space and inodes used by every volume, largest first (walks the volume directories).
    Usage {
        #[command(flatten)]
        dirs: NodeDirs,
        /// Sort by this column (largest first; `name` sorts alphabetically).
        #[arg(long, value_enum, default_value = "used")]
        sort: volumes::SortKey,
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
    /// Check this node for what k8scsi needs; exits non-zero when a check fails.
    Doctor(DoctorArgs),
}

#[derive(Debug, clap::Subcommand)]
pub enum VolumesCommand {
    /// List every volume.
    List {
        #[command(flatten)]
        dirs: NodeDirs,
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
    /// Show one volume: its record, storage, usage and publications.
    Show {
        /// Volume ID or name (the CO's name, e.g. pvc-<uid>).
        volume: String,
        #[command(flatten)]
        dirs: NodeDirs,
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum SnapshotsCommand {
    /// List every snapshot.
    List {
        #[command(flatten)]
        dirs: NodeDirs,
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
}

/// Runs an operator command and returns the process exit code: 0 on success, 1 when the
/// command failed (or `doctor` found a failing check), 2 for a usage error.
pub fn run(command: Command) -> ExitCode {
    let result = match command {
        Command::Volumes {
            command: VolumesCommand::List { dirs, output },
        } => volumes::list(&dirs, output),
        Command::Volumes {
            command:
                VolumesCommand::Show {
                    volume,
                    dirs,
                    output,
                },
        } => volumes::show(&dirs, &volume, output),
        Command::Snapshots {
            command: SnapshotsCommand::List { dirs, output },
        } => volumes::snapshots(&dirs, output),
        Command::Usage { dirs, sort, output } => volumes::usage(&dirs, sort, output),
        Command::Doctor(args) => return doctor::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("k8scsi: {e}");
            ExitCode::FAILURE
        }
    }
}

#[doc(hidden)]
pub fn emit(args: std::fmt::Arguments) {
    use std::io::Write;
    if let Err(e) = writeln!(std::io::stdout().lock(), "{args}")
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
    }
}

/// Where the records came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The store file (no server had it open).
    File,
    /// A repaired private copy of a store left unclean by a crash (no server had it open).
    RecoveredCopy,
    /// The running server, over its admin socket.
    Server,
}

/// Every record of the node's store, from the file or from the server that holds it.
pub fn load_state(state_dir: &std::path::Path) -> Result<(StateDump, Source), String> {
    match crate::store::read_file(state_dir).map_err(|e| e.to_string())? {
        Some((dump, ReadSource::File)) => Ok((dump, Source::File)),
        Some((dump, ReadSource::RecoveredCopy)) => Ok((dump, Source::RecoveredCopy)),
        None => crate::admin::fetch(state_dir).map(|dump| (dump, Source::Server)),
    }
}

/// [`load_state`], saying on stderr when the data comes from a repaired copy.
fn open_store(dirs: &NodeDirs) -> Result<StateDump, String> {
    let (dump, source) = load_state(&dirs.state_dir)?;
    if source == Source::RecoveredCopy {
        eprintln!(
            "note: {} was not closed cleanly and no server has it open; showing a repaired copy \
             (the server repairs the file itself when it starts)",
            dirs.state_dir.join(crate::store::STORE_FILE).display()
        );
    }
    Ok(dump)
}

/// Prints rows as left-aligned columns separated by two spaces (the last column unpadded).
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len() - 1;
        let mut out = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Formats Unix seconds as UTC `YYYY-MM-DD HH:MM:SSZ` (or `-` for 0, unknown).
pub fn format_unix(secs: u64) -> String {
    if secs == 0 {
        return "-".to_string();
    }
    // Days to civil date: Howard Hinnant's algorithm.
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_unix_times() {
        assert_eq!(format_unix(0), "-");
        assert_eq!(format_unix(1), "1970-01-01 00:00:01Z");
        assert_eq!(format_unix(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(format_unix(1_795_000_000), "2026-11-18 11:06:40Z");
    }
}
