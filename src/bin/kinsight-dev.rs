//! `kinsight-dev`: the testbed's commands, for a source build (the image carries only
//! `kinsight`). `dev` and `demo` start a local control plane, PostgreSQL and a real node
//! running the image built from the `kinsight` beside this binary; `kinsight dev` and
//! `kinsight demo` run this binary when it sits beside `kinsight`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use kinsight::cli::JobCapsArgs;
use kinsight::dev::DevOptions;
use kinsight::webhook::{RetrySchedule, parse_duration};

#[derive(Parser)]
#[command(
    name = "kinsight-dev",
    version,
    about = "kinsight on a local control plane (source builds only)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start (or reuse) a local control plane and run everything in one process.
    Dev(DevArgs),
    /// Run `dev`, submit the sample photos and print each verified webhook.
    Demo(DemoArgs),
}

#[derive(Args, Clone)]
struct DevArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// API key of the dev tenant (random when not given).
    #[arg(long, env = "KINSIGHT_DEV_API_KEY")]
    api_key: Option<String>,
    /// Webhook signing secret of the dev tenant, `whsec_...` (random when not given).
    #[arg(long, env = "KINSIGHT_DEV_WEBHOOK_SECRET")]
    webhook_secret: Option<String>,
    #[arg(long, env = "KINSIGHT_CATALOG", default_value = "models/catalog.yaml")]
    catalog: PathBuf,
    /// libonnxruntime.so put in the worker image (default: ORT_DYLIB_PATH, else the
    /// project's onnxruntime wheel, see scripts/setup-onnxruntime.sh).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    ort_dylib: Option<PathBuf>,
    /// State of the local control plane.
    #[arg(long, env = "KINSIGHT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Use the cluster of this kubeconfig instead of a local control plane.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Use this PostgreSQL instead of the testbed's (which runs beside its etcd).
    #[arg(
        long = "database-url",
        env = "KINSIGHT_DATABASE_URL",
        hide_env_values = true
    )]
    database_url: Option<String>,
    #[arg(long, value_parser = RetrySchedule::parse)]
    retry_schedule: Option<RetrySchedule>,
    /// CPU of each worker pod, requests and limits (the node has this machine's cores).
    #[arg(long, default_value = "1", value_parser = kinsight::cli::parse_quantity)]
    worker_cpu: String,
    /// CPU request of each worker pod (default 250m, or `--worker-cpu` when that is less):
    /// below the limit, so the next groups' pods fit the node while finished workers exit.
    #[arg(long, value_parser = kinsight::cli::parse_quantity)]
    worker_cpu_request: Option<String>,
    /// Standby workers of the dev tenant: pods with the models loaded that its next group
    /// starts on (0: each group starts a pod of its own).
    #[arg(long, default_value_t = kinsight::dev::DEV_STANDBY_WORKERS as u8, value_parser = clap::value_parser!(u8).range(0..=8))]
    standby_workers: u8,
    #[command(flatten)]
    job_caps: JobCapsArgs,
}

#[derive(Args)]
struct DemoArgs {
    #[command(flatten)]
    dev: DevArgs,
    /// Folder of photos to submit.
    #[arg(long, default_value = "tests/fixtures/images")]
    photos: PathBuf,
    #[arg(long, value_parser = parse_duration, default_value = "300s")]
    timeout: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    let command = Cli::parse().command;
    kinsight::install_crypto_provider();
    let logging = kinsight::cli::init_logging("kinsight-dev");
    let outcome = run(command).await;
    logging.finish().await;
    kinsight::cli::exit_code(outcome)
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Dev(args) => {
            let options = dev_options(args)?;
            // A stop while starting drops the start, and with it (each one's Drop) the
            // control plane, node and database started so far: nothing is left running.
            let env = tokio::select! {
                env = kinsight::dev::start(options) => env?,
                () = kinsight::shutdown::signal() => {
                    println!("stopped while starting");
                    return Ok(());
                }
            };
            env.print_summary();
            env.serve().await;
        }
        Command::Demo(args) => {
            let options = dev_options(args.dev)?;
            tokio::select! {
                done = kinsight::dev::demo(options, args.photos, args.timeout) => done?,
                // Not a completed demo: the exit says so.
                () = kinsight::shutdown::signal() => anyhow::bail!("stopped before the group completed"),
            }
        }
    }
    Ok(())
}

/// The dev worker pods' CPU request: as asked (at most the limit), else 250m or the limit
/// when that is less: the caps' Jobs and those exiting fit a 2-core node (8 pods).
fn dev_cpu_request(asked: Option<String>, limit: &str) -> anyhow::Result<String> {
    let request = match asked {
        Some(request) => request,
        None => {
            let limit_value = kinsight::cli::quantity_value(limit).map_err(anyhow::Error::msg)?;
            if limit_value > 0.25 { "250m" } else { limit }.to_owned()
        }
    };
    kinsight::cli::check_cpu_request(&request, limit).map_err(anyhow::Error::msg)?;
    Ok(request)
}

fn dev_options(args: DevArgs) -> anyhow::Result<DevOptions> {
    let state_dir = match args.state_dir {
        Some(dir) => dir,
        None => {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir);
            home.join(".cache/kinsight/dev-cluster")
        }
    };
    Ok(DevOptions {
        listen: args.listen,
        api_key: args.api_key,
        webhook_secret: args.webhook_secret,
        catalog: args.catalog,
        ort_dylib: args.ort_dylib,
        state_dir,
        kubeconfig: args.kubeconfig,
        database_url: args.database_url,
        retry: args.retry_schedule.unwrap_or_default(),
        worker_cpu_request: dev_cpu_request(args.worker_cpu_request, &args.worker_cpu)?,
        worker_cpu: args.worker_cpu,
        job_caps: args.job_caps.or(kinsight::dev::DEV_JOB_CAPS),
        standby_workers: usize::from(args.standby_workers),
    })
}
