//! `kvm-operator`: the command line. No logic lives here; see the library's modules.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Kubernetes operator for KVM virtual machines on external hypervisor hosts (libvirt over SSH).
#[derive(Parser, Debug)]
#[command(name = "kvm-operator", version, about, long_about = None)]
struct Cli {
    /// Log filter, e.g. `info` or `kvm_operator=debug` (also RUST_LOG).
    #[arg(long, global = true, env = "KVM_OPERATOR_LOG", default_value = "info")]
    log: String,
    /// Log as JSON lines.
    #[arg(long, global = true, env = "KVM_OPERATOR_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the operator in a cluster (in-cluster config or KUBECONFIG).
    Run {
        /// Address of /healthz and /readyz.
        #[arg(long, env = "KVM_OPERATOR_HTTP_ADDR", default_value = "127.0.0.1:8080")]
        http_addr: String,
        /// Operator configuration (YAML): resync periods, placement weights, migration limits,
        /// rebalancing. Every field is optional; see `controller::config`.
        #[arg(long, env = "KVM_OPERATOR_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print the CustomResourceDefinitions as YAML, or write one file per CRD into --dir.
    Crd {
        /// Write `<plural>.<group>.yaml` files into this directory instead of printing.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Load manifests from files or directories and reconcile them against the hypervisors
    /// directly, without a cluster: the same controllers, statuses in a table and a state file.
    Standalone {
        /// Manifest files or directories (`*.yaml`, `*.yml`), as you would `kubectl apply -f`.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Print what would be done on each node and change nothing.
        #[arg(long, conflicts_with = "once")]
        dry_run: bool,
        /// Reconcile until everything has converged or failed, then exit (non-zero on failure).
        #[arg(long)]
        once: bool,
        /// With --once: give up (non-zero) after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Where the objects' UIDs and statuses are kept (`status.yaml`) to resume after a
        /// restart. Default: `.kvm-operator/` next to the first manifest path.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// libvirt URI of the embedded default node, used when the manifests declare no KvmNode.
        #[arg(long, default_value = "test:///default")]
        default_uri: String,
        /// Operator configuration (YAML), as for `run`.
        #[arg(long, env = "KVM_OPERATOR_CONFIG")]
        config: Option<PathBuf>,
        /// Serve /healthz, /readyz and /metrics on this address (e.g. 127.0.0.1:8080).
        #[arg(long)]
        http_addr: Option<String>,
    },
    /// Open a VM's VNC console on this machine: a local port tunnelled through the node's SSH
    /// connection (pinned host key) to the display on the node's loopback.
    Console {
        /// The VirtualMachine's name.
        vm: String,
        /// Its namespace.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Local address to listen on; port 0 picks a free one (printed).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// Find the VM in these standalone manifests (and their state) instead of the cluster.
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
        /// With -f: the standalone state directory (default `.kvm-operator/` next to the first
        /// path).
        #[arg(long, requires = "files")]
        state_dir: Option<PathBuf>,
        /// In a cluster: the operator's namespace, where the nodes' key Secrets are.
        #[arg(long, env = "KVM_OPERATOR_NAMESPACE", default_value = "kvm-operator")]
        operator_namespace: String,
    },
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    // before any thread allocates (see the function)
    kvm_operator::hypervisor::ffi::limit_malloc_arenas();
    let cli = Cli::parse();
    kvm_operator::telemetry::init(&cli.log, cli.log_json);
    let result = match cli.command {
        Command::Run { http_addr, config } => kvm_operator::cli::run(&http_addr, config.as_deref()),
        Command::Crd { dir } => kvm_operator::cli::crd(dir.as_deref()),
        Command::Standalone {
            files,
            dry_run,
            once,
            timeout,
            state_dir,
            default_uri,
            config,
            http_addr,
        } => {
            if dry_run {
                kvm_operator::cli::standalone_dry_run(&files, &default_uri)
            } else {
                kvm_operator::cli::standalone(
                    files,
                    once,
                    timeout,
                    state_dir,
                    default_uri,
                    config.as_deref(),
                    http_addr.as_deref(),
                )
            }
        }
        Command::Console {
            vm,
            namespace,
            listen,
            files,
            state_dir,
            operator_namespace,
        } => {
            let source = if files.is_empty() {
                kvm_operator::cli::ConsoleSource::Cluster { operator_namespace }
            } else {
                kvm_operator::cli::ConsoleSource::Files { files, state_dir }
            };
            kvm_operator::cli::console(&vm, &namespace, listen, source)
        }
        Command::Version => {
            println!("kvm-operator {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
