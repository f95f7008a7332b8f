//! The `kinsight` command: parses the command line and hands over to the library.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use kinsight::cli::{JobCapsArgs, parse_key_value};
use kinsight::controller::{ControllerConfig, GpuSettings, WorkerCatalog};
use kinsight::inference::{Catalog, EngineOptions, ExecutionProvider};
use kinsight::net::EgressPolicy;
use kinsight::shutdown::{Shutdown, within_grace};
use kinsight::webhook::{CircuitConfig, RetrySchedule, parse_duration};
use kinsight::worker::{FetchConfig, WorkerOptions};

#[derive(Parser)]
#[command(name = "kinsight", version, about = "Image insights on Kubernetes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print every CRD as YAML (the copies under crds/ equal this).
    Crd,
    /// Print the REST API's OpenAPI document (schemas/openapi.json equals this).
    Openapi,
    /// Run the operator (reconciles ImageGroups and WebhookSubscriptions).
    Controller(Box<ControllerArgs>),
    /// Run the REST API.
    Api(ApiArgs),
    /// Process a work order (what a worker Job's pod runs).
    Worker(WorkerArgs),
    /// Remove what controllers made in tenant namespaces (worker ServiceAccounts, catalog
    /// ConfigMaps, NetworkPolicies, their RoleBindings): the chart's uninstall hook.
    RemoveTenantObjects(RemoveTenantObjectsArgs),
    #[command(flatten)]
    Testbed(TestbedCommand),
    /// Measure images/s of the image pipeline on a folder of images (see scripts/bench.sh).
    Bench(kinsight::bench::BenchArgs),
    /// List the model catalog, or check a new entry against its ONNX file (`models check`).
    Models(ModelsArgs),
}

#[derive(Args)]
struct ModelsArgs {
    #[command(subcommand)]
    check: Option<ModelsCommand>,
    #[command(flatten)]
    catalog: CatalogArg,
    #[arg(long, value_enum, default_value = "table")]
    output: OutputFormat,
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Load FILE's models (one entry or a whole catalog; relative paths from FILE's
    /// folder) with ONNX Runtime and check them against their entries; fails on any error.
    Check {
        file: PathBuf,
        /// libonnxruntime.so (default: ORT_DYLIB_PATH, else ./.venv's onnxruntime wheel).
        #[arg(long, env = "ORT_DYLIB_PATH")]
        ort_dylib: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OutputFormat {
    Table,
    Json,
}

#[derive(Args)]
struct CatalogArg {
    /// The model catalog.
    #[arg(long, env = "KINSIGHT_CATALOG", default_value = "models/catalog.yaml")]
    catalog: PathBuf,
    /// Folder the catalog's relative model and labels files are in (default: the
    /// catalog's folder).
    #[arg(long, env = "KINSIGHT_MODELS_DIR")]
    models_dir: Option<PathBuf>,
}

impl CatalogArg {
    fn load(&self) -> Result<Catalog, kinsight::inference::InferenceError> {
        Catalog::load_with_models_dir(&self.catalog, Some(self.models_dir()))
    }

    /// Where the catalog's relative files are.
    fn models_dir(&self) -> &Path {
        self.models_dir
            .as_deref()
            .unwrap_or_else(|| Catalog::default_models_dir(&self.catalog))
    }
}

#[derive(Args)]
struct ControllerArgs {
    #[command(flatten)]
    catalog: CatalogArg,
    #[command(flatten)]
    database: DatabaseArg,
    /// Where workers send their results: the API's internal ingest, e.g.
    /// `http://kinsight-api.kinsight-system.svc/internal/v1/results`.
    #[arg(long, env = "KINSIGHT_RESULTS_URL")]
    results_url: String,
    /// Container image of worker pods.
    #[arg(long, env = "KINSIGHT_WORKER_IMAGE")]
    worker_image: Option<String>,
    /// Extra environment for worker pods, NAME=VALUE (repeatable).
    #[arg(long = "worker-env", value_parser = parse_key_value)]
    worker_env: Vec<(String, String)>,
    /// CPU of each worker pod: its limit, the worker sizes its threads by it, and its
    /// request unless `--worker-cpu-request`.
    #[arg(long, env = "KINSIGHT_WORKER_CPU", default_value = "1", value_parser = kinsight::cli::parse_quantity)]
    worker_cpu: String,
    /// A lower CPU request for each worker pod than `--worker-cpu`, its limit (Burstable
    /// pods: more fit a node, and a pod may start while another's worker exits).
    #[arg(long, env = "KINSIGHT_WORKER_CPU_REQUEST", value_parser = kinsight::cli::parse_quantity)]
    worker_cpu_request: Option<String>,
    /// Memory of each worker pod (requests and limits; past it the pod is OOM-killed and
    /// its images fail with that reason).
    #[arg(long, env = "KINSIGHT_WORKER_MEMORY", default_value = "1Gi", value_parser = kinsight::cli::parse_quantity)]
    worker_memory: String,
    /// Webhook retry waits, e.g. `5s,5m,30m,2h,5h,10h,10h`.
    #[arg(long, env = "KINSIGHT_RETRY_SCHEDULE", value_parser = RetrySchedule::parse)]
    retry_schedule: Option<RetrySchedule>,
    /// How long finished groups are kept, e.g. `7d`.
    #[arg(long, env = "KINSIGHT_GROUP_TTL", value_parser = parse_duration, default_value = "7d")]
    group_ttl: Duration,
    /// How long a worker Job may run before Kubernetes fails it (its unfinished images
    /// then fail with `WorkerFailed`), e.g. `1h`.
    #[arg(long, env = "KINSIGHT_WORKER_DEADLINE", value_parser = parse_duration, default_value = "1h")]
    worker_deadline: Duration,
    /// How long a worker that has done its order waits for another group of its namespace
    /// (which then starts without a pod of its own), e.g. `5s`; `0s`: no waiting.
    #[arg(long, env = "KINSIGHT_WORKER_LINGER", value_parser = parse_duration, default_value = "5s")]
    worker_linger: Duration,
    /// Standby workers kept per tenant namespace: pods with the catalog's CPU models loaded
    /// and no group of their own, handed the tenant's next group (needs a linger).
    #[arg(long, env = "KINSIGHT_STANDBY_WORKERS", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=8))]
    standby_workers: u8,
    #[command(flatten)]
    egress: EgressArg,
    /// Where Prometheus scrapes `/metrics` and the kubelet probes `/healthz` and `/readyz`.
    #[arg(long, env = "KINSIGHT_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
    /// Run without leader election (only when a single replica runs).
    #[arg(long)]
    no_leader_election: bool,
    /// How long the leader's Lease lasts without renewal: a replica that dies unannounced
    /// is replaced after at most this long (kube-controller-manager's
    /// `--leader-elect-lease-duration`).
    #[arg(long, env = "KINSIGHT_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// How long before the Lease runs out its holder renews it (whole seconds, under the
    /// duration).
    #[arg(long, env = "KINSIGHT_LEASE_RENEW_BEFORE", default_value = "5s", value_parser = parse_duration)]
    lease_renew_before: Duration,
    /// Images one worker Job takes at most (a bigger group runs as several Jobs, on
    /// several pods at once).
    #[arg(long, env = "KINSIGHT_IMAGES_PER_JOB", default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..=1000))]
    images_per_job: u16,
    /// Hamming distance (of a 64-bit perceptual hash) at or under which two photos of a
    /// group are near-duplicates in its listing summary.
    #[arg(long, env = "KINSIGHT_DUPLICATE_DISTANCE", default_value_t = kinsight::controller::DEFAULT_DUPLICATE_DISTANCE, value_parser = clap::value_parser!(u32).range(0..=64))]
    duplicate_distance: u32,
    #[command(flatten)]
    job_caps: JobCapsArgs,
    /// Claimed webhook deliveries this replica works on at once (waiting for an
    /// endpoint's slot or in flight); more replicas deliver more at once.
    #[arg(long, env = "KINSIGHT_DISPATCH_IN_FLIGHT", default_value_t = 2_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    dispatch_in_flight: u32,
    /// Namespace of the leader-election Lease (the controller's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kinsight-system")]
    lease_namespace: String,
    /// This replica's identity in the election (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Models folder inside worker pods (default: this controller's models folder).
    #[arg(long, env = "KINSIGHT_WORKER_MODELS_DIR")]
    worker_models_dir: Option<String>,
    /// A volume with the model files, mounted read-only at the workers' models folder: a
    /// volume source as in a pod spec, JSON or YAML, e.g.
    /// `{"persistentVolumeClaim": {"claimName": "models"}}` (default: files in the image).
    #[arg(long, env = "KINSIGHT_WORKER_MODELS_VOLUME", value_parser = |t: &str| WorkerCatalog::parse_models_volume(t).map(Box::new))]
    worker_models_volume: Option<Box<k8s_openapi::api::core::v1::Volume>>,
    /// What Jobs of GPU models (`gpu: true` in the catalog) ask for, JSON or YAML:
    /// `{"resourceName": "nvidia.com/gpu", "count": 1, "nodeSelector": {...},
    /// "tolerations": [...], "runtimeClassName": "nvidia"}` (missing fields: these defaults,
    /// no selector, tolerations or runtime class).
    #[arg(long, env = "KINSIGHT_WORKER_GPU", value_parser = GpuSettings::parse)]
    worker_gpu: Option<GpuSettings>,
    #[command(flatten)]
    endpoints: EndpointHealthArgs,
    /// Namespace of the API-key records (a namespace one names is a tenant).
    #[arg(
        long,
        env = "KINSIGHT_KEYS_NAMESPACE",
        default_value = "kinsight-system"
    )]
    keys_namespace: String,
    /// Watch only this namespace's groups, subscriptions and worker Jobs (a namespace-scoped
    /// installation; default: every tenant namespace).
    #[arg(long, env = "KINSIGHT_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// The ClusterRole the controller binds to itself in each tenant namespace.
    #[arg(
        long,
        env = "KINSIGHT_TENANT_ROLE",
        default_value = "kinsight-controller-tenant"
    )]
    tenant_role: String,
    #[command(flatten)]
    bindings: TenantBindingArgs,
    /// The NetworkPolicy spec (JSON or YAML) put beside worker pods in every tenant
    /// namespace (default: none).
    #[arg(long, env = "KINSIGHT_WORKER_NETWORK_POLICY", value_parser = |t: &str| kinsight::tenancy::parse_network_policy(t).map(Box::new))]
    worker_network_policy: Option<Box<k8s_openapi::api::networking::v1::NetworkPolicySpec>>,
}

/// Whose tenant objects `remove-tenant-objects` removes: those of the controller running
/// as this ServiceAccount.
#[derive(Args)]
struct RemoveTenantObjectsArgs {
    /// The controller's namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kinsight-system")]
    namespace: String,
    #[command(flatten)]
    bindings: TenantBindingArgs,
}

/// Whose tenant RoleBindings are the controller's, and who makes them.
#[derive(Args)]
struct TenantBindingArgs {
    /// The controller's own ServiceAccount (in `POD_NAMESPACE`), the subject of its tenant
    /// RoleBindings.
    #[arg(
        long,
        env = "KINSIGHT_SERVICE_ACCOUNT",
        default_value = "kinsight-controller"
    )]
    service_account: String,
    /// Who binds the tenant ClusterRole in tenant namespaces: `controller` (the controller,
    /// when a namespace becomes a tenant) or `preinstalled` (the chart, in the namespaces it
    /// lists: the controller then makes and removes no RoleBinding, and a tenant without one
    /// waits).
    #[arg(
        long,
        env = "KINSIGHT_TENANT_BINDINGS",
        value_enum,
        default_value = "controller"
    )]
    tenant_bindings: kinsight::tenancy::TenantBindings,
}

/// How the controller treats sick webhook endpoints.
#[derive(Args)]
struct EndpointHealthArgs {
    /// Consecutive failures after which an endpoint's deliveries pause (circuit opens).
    #[arg(long, env = "KINSIGHT_CIRCUIT_FAILURES", default_value_t = 5)]
    circuit_failures: u32,
    /// Wait before a single probe tests a paused endpoint; doubles per failed probe.
    #[arg(long, env = "KINSIGHT_CIRCUIT_COOL_DOWN", value_parser = parse_duration, default_value = "30s")]
    circuit_cool_down: Duration,
    /// Longest wait between probes.
    #[arg(long, env = "KINSIGHT_CIRCUIT_MAX_COOL_DOWN", value_parser = parse_duration, default_value = "30m")]
    circuit_max_cool_down: Duration,
    /// Attempts in flight at once to one endpoint, at most.
    #[arg(long, env = "KINSIGHT_ENDPOINT_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    endpoint_concurrency: u32,
    /// An endpoint failing without a success for this long is disabled.
    #[arg(long, env = "KINSIGHT_DISABLE_ENDPOINT_AFTER", value_parser = parse_duration, default_value = "5d")]
    disable_endpoint_after: Duration,
}

impl EndpointHealthArgs {
    fn circuit(&self) -> CircuitConfig {
        CircuitConfig {
            failure_threshold: self.circuit_failures.max(1),
            cool_down: self.circuit_cool_down,
            max_cool_down: self.circuit_max_cool_down.max(self.circuit_cool_down),
            max_concurrency: self.endpoint_concurrency,
            disable_after: self.disable_endpoint_after,
            ..CircuitConfig::default()
        }
    }
}

/// The PostgreSQL database that holds results and deliveries.
#[derive(Args)]
struct DatabaseArg {
    /// `postgres://user:password@host:port/database` (the chart takes it from a Secret).
    #[arg(
        long = "database-url",
        env = "KINSIGHT_DATABASE_URL",
        hide_env_values = true
    )]
    database_url: String,
}

impl DatabaseArg {
    /// Connects and applies the schema migrations (waits up to a minute for the database).
    async fn connect(&self) -> anyhow::Result<kinsight::store::Store> {
        Ok(kinsight::store::Store::connect(&self.database_url, Duration::from_secs(60)).await?)
    }
}

#[derive(Args)]
struct EgressArg {
    /// Private ranges outbound requests may reach anyway, e.g. `10.1.0.0/16,fd00::/8`
    /// (default: only public addresses).
    #[arg(long = "allow-egress", env = "KINSIGHT_ALLOW_EGRESS", value_name = "CIDR,...", value_parser = EgressPolicy::parse)]
    allow_egress: Option<EgressPolicy>,
}

#[derive(Args)]
struct ApiArgs {
    #[command(flatten)]
    catalog: CatalogArg,
    #[command(flatten)]
    database: DatabaseArg,
    #[arg(long, env = "KINSIGHT_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Namespace holding the tenants' API-key Secrets.
    #[arg(
        long,
        env = "KINSIGHT_KEYS_NAMESPACE",
        default_value = "kinsight-system"
    )]
    keys_namespace: String,
    /// After SIGTERM, how long to go on serving before refusing new connections: time for
    /// the Service's endpoints to drop this pod, so no client is refused mid-rollout.
    #[arg(long, env = "KINSIGHT_SHUTDOWN_DELAY", value_parser = parse_duration, default_value = "0s")]
    shutdown_delay: Duration,
    /// Then how long requests in hand may take to finish before they are cut off.
    #[arg(long, env = "KINSIGHT_DRAIN_TIMEOUT", value_parser = parse_duration, default_value = "20s")]
    drain_timeout: Duration,
    /// Requests per second per API key (also its burst) when the key's record sets no
    /// `rate-limit`.
    #[arg(long, env = "KINSIGHT_RATE_LIMIT", default_value_t = kinsight::api::DEFAULT_RATE_LIMIT)]
    rate_limit: std::num::NonZeroU32,
    /// Images in flight (posted, not yet finished) per tenant whose key record sets no
    /// `max-in-flight-images`; past it a POST is answered 429.
    #[arg(long, env = "KINSIGHT_MAX_IN_FLIGHT_IMAGES", default_value_t = kinsight::api::DEFAULT_IN_FLIGHT_LIMIT)]
    max_in_flight_images: std::num::NonZeroU32,
}

#[derive(Args)]
struct WorkerArgs {
    #[command(flatten)]
    catalog: CatalogArg,
    /// ONNX Runtime intra-op threads (default: the pod's CPU limit).
    #[arg(long, env = "KINSIGHT_THREADS")]
    threads: Option<usize>,
    /// Images downloaded ahead of inference.
    #[arg(long, default_value_t = 4)]
    prefetch: usize,
    #[command(flatten)]
    egress: EgressArg,
    /// How long one image's download may take in all, e.g. `30s`.
    #[arg(long, env = "KINSIGHT_DOWNLOAD_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    download_timeout: Duration,
    /// The result ingest to send results to (set by the controller on worker Jobs).
    #[arg(long, env = "KINSIGHT_RESULTS_URL")]
    results_url: String,
    /// Where the models run: `cpu`, `cuda` (GPU 0), `cuda:<gpu>` or `auto` (CUDA when this
    /// ONNX Runtime and machine have it, else the CPU). The log says which ran.
    #[arg(long, env = "KINSIGHT_EXECUTION_PROVIDER", default_value = "cpu")]
    execution_provider: ExecutionProvider,
}

/// The testbed's commands: `kinsight-dev` runs them (see [`TestbedCommand::run`]).
#[derive(Subcommand)]
enum TestbedCommand {
    /// Start (or reuse) a local control plane and run everything in one process
    /// (`kinsight-dev dev`: source builds only).
    #[command(disable_help_flag = true)]
    Dev(TestbedArgs),
    /// Run `dev`, submit the sample photos and print each verified webhook
    /// (`kinsight-dev demo`: source builds only).
    #[command(disable_help_flag = true)]
    Demo(TestbedArgs),
}

/// The arguments of a command that `kinsight-dev` runs, passed on as they are.
#[derive(Args)]
struct TestbedArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<OsString>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let command = Cli::parse().command;
    kinsight::install_crypto_provider();
    let logging = kinsight::cli::init_logging(service_name(&command));
    let outcome = run(command).await;
    logging.finish().await;
    kinsight::cli::exit_code(outcome)
}

impl TestbedCommand {
    /// `kinsight dev|demo`: the testbed's commands live in `kinsight-dev`, beside
    /// this binary in a source build and absent from the image; this process becomes it.
    /// Returns only when it cannot.
    fn run(self) -> anyhow::Error {
        use std::os::unix::process::CommandExt;
        let (name, args) = match self {
            TestbedCommand::Dev(args) => ("dev", args.args),
            TestbedCommand::Demo(args) => ("demo", args.args),
        };
        let own = match std::env::current_exe() {
            Ok(own) => own,
            Err(e) => return anyhow::anyhow!("own executable: {e}"),
        };
        let dev = own.with_file_name("kinsight-dev");
        if !dev.is_file() {
            return anyhow::anyhow!(
                "`kinsight {name}` is kinsight-dev's (the local control plane and node): \
                 it ships with source builds (`cargo build --release` puts it beside kinsight), \
                 not in the image, and there is none at {}",
                dev.display()
            );
        }
        let error = std::process::Command::new(&dev).arg(name).args(args).exec();
        anyhow::anyhow!("running {}: {error}", dev.display())
    }
}

/// `OTEL_SERVICE_NAME`'s default: what this process is.
fn service_name(command: &Command) -> &'static str {
    match command {
        Command::Controller(_) => "kinsight-controller",
        Command::Api(_) => "kinsight-api",
        Command::Worker(_) => "kinsight-worker",
        _ => "kinsight",
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Crd => {
            print!("{}", kinsight::crd::all_crds_yaml()?);
        }
        Command::Openapi => {
            print!("{}", kinsight::api::openapi_document());
        }
        Command::Controller(args) => {
            if let Some(request) = &args.worker_cpu_request {
                kinsight::cli::check_cpu_request(request, &args.worker_cpu)
                    .map_err(anyhow::Error::msg)?;
            }
            let catalog = args.catalog.load()?;
            // Workers run the same image: by default their models are where ours are.
            let worker_models_dir = match args.worker_models_dir {
                Some(dir) => dir,
                None => std::path::absolute(args.catalog.models_dir())?
                    .display()
                    .to_string(),
            };
            let defaults = ControllerConfig::default();
            let config = ControllerConfig {
                worker_catalog: Some(WorkerCatalog {
                    models_volume: args.worker_models_volume.map(|v| *v),
                    ..WorkerCatalog::new(&catalog, worker_models_dir)
                }),
                gpu: args.worker_gpu.unwrap_or_default(),
                models: catalog.names().map(str::to_owned).collect(),
                worker_image: args.worker_image.unwrap_or(defaults.worker_image.clone()),
                results_url: args.results_url,
                worker_env: args.worker_env,
                worker_cpu: args.worker_cpu,
                worker_cpu_request: args.worker_cpu_request,
                worker_memory: args.worker_memory,
                retry: args.retry_schedule.unwrap_or_default(),
                group_ttl: args.group_ttl,
                worker_deadline: args.worker_deadline,
                worker_linger: args.worker_linger,
                standby_workers: usize::from(args.standby_workers),
                egress: args.egress.allow_egress.unwrap_or_default(),
                circuit: args.endpoints.circuit(),
                dispatch_in_flight: args.dispatch_in_flight as usize,
                images_per_job: usize::from(args.images_per_job),
                duplicate_distance: args.duplicate_distance,
                job_caps: args.job_caps.or(defaults.job_caps),
                watch_namespace: args.watch_namespace.filter(|n| !n.trim().is_empty()),
                tenancy: kinsight::tenancy::TenancyConfig {
                    keys_namespace: args.keys_namespace,
                    tenant_role: args.tenant_role,
                    service_account: (args.lease_namespace.clone(), args.bindings.service_account),
                    network_policy: args.worker_network_policy.map(|p| *p),
                    bindings: args.bindings.tenant_bindings,
                    ..defaults.tenancy.clone()
                },
                ..defaults
            };
            let client = kube::Client::try_default().await?;
            let store = args.database.connect().await?;
            // On SIGTERM: stop reconciling, hand the lease back, finish the webhooks in hand.
            let shutdown = Shutdown::on_signals();
            // /metrics, /healthz and /readyz on one port.
            let readiness = kinsight::controller::health::Readiness::new(
                client.clone(),
                store.clone(),
                shutdown.clone(),
            );
            let metrics_app = config.metrics.clone().router().merge(readiness.router());
            let metrics_listener = tokio::net::TcpListener::bind(args.metrics_listen).await?;
            tokio::spawn(async move {
                if let Err(e) = axum::serve(metrics_listener, metrics_app).await {
                    tracing::error!(error = %e, "metrics server stopped");
                }
            });
            if args.no_leader_election {
                kinsight::controller::run(client, store, config, shutdown).await?;
            } else {
                let identity = args
                    .identity
                    .or_else(|| std::env::var("HOSTNAME").ok())
                    .unwrap_or_else(|| format!("kinsight-{}", std::process::id()));
                let election = kinsight::controller::LeaderElection {
                    namespace: args.lease_namespace,
                    identity,
                    lease: args.lease_duration,
                    grace: args.lease_renew_before,
                };
                kinsight::controller::run_as_leader(client, store, config, election, shutdown)
                    .await?;
            }
        }
        Command::Api(args) => {
            let catalog = args.catalog.load()?;
            let client = kube::Client::try_default().await?;
            let store = args.database.connect().await?;
            let config = kinsight::api::ApiConfig {
                keys_namespace: args.keys_namespace,
                models: catalog.names().map(str::to_owned).collect(),
                rate_limit: args.rate_limit,
                in_flight_limit: args.max_in_flight_images,
            };
            // Until the API keys are listed, /readyz says 503 and so does every request.
            let (app, watch, _keys) = kinsight::api::router(client, store, config);
            tokio::spawn(watch);
            let listener = tokio::net::TcpListener::bind(args.listen).await?;
            tracing::info!(listen = %args.listen, "API listening");
            let shutdown = Shutdown::on_signals();
            let delay = args.shutdown_delay;
            let stop_accepting = {
                let shutdown = shutdown.clone();
                async move {
                    shutdown.requested().await;
                    tokio::time::sleep(delay).await;
                    tracing::info!("refusing new connections; finishing the requests in hand");
                }
            };
            let served = axum::serve(listener, app).with_graceful_shutdown(stop_accepting);
            let mut result = Ok(());
            let drained = within_grace(
                async { result = served.await },
                shutdown,
                delay + args.drain_timeout,
            )
            .await;
            result?;
            if !drained {
                tracing::warn!(
                    "requests still running {:?} after the stop were cut off",
                    args.drain_timeout
                );
            }
        }
        Command::Worker(args) => {
            // The pod's security context as the kernel applies it, for the pod's log.
            kinsight::worker::Sandbox::inspect(&std::env::temp_dir()).log();
            // The pod's ServiceAccount token proves to the API's internal end whose worker
            // this is: it fetches the order with it and hands the results over with it.
            let http = kinsight::results::internal_client()?;
            // 0: as many as the pod's CPU limit (cgroup quota) allows.
            let threads = args.threads.unwrap_or(0);
            let options = WorkerOptions {
                catalog: args.catalog.catalog,
                models_dir: args.catalog.models_dir,
                fetch: FetchConfig {
                    egress: args.egress.allow_egress.unwrap_or_default(),
                    total_timeout: args.download_timeout,
                    ..FetchConfig::default()
                },
                prefetch: args.prefetch,
                engine: EngineOptions {
                    intra_threads: threads,
                    execution_provider: args.execution_provider,
                    ..EngineOptions::default()
                },
            };
            // In its container the worker is PID 1, which the kernel spares signals it has
            // no handler for: without this, a deleted pod's worker would go on for the
            // whole grace period (30 s) beside the pod replacing it.
            let stop = Shutdown::on_signals();
            let results_url = args.results_url;
            // Models stay loaded for the orders this worker carries next.
            let engines = kinsight::worker::Engines::new(options.engine.clone());
            let token = if kinsight::worker::is_standby() {
                // A standby has no order of its own: it loads the models first, so the
                // order it is handed starts at once.
                let token = kinsight::results::TokenSource::infer().await?;
                let models = engines.preload_cpu_models(options.load_catalog()?).await?;
                tracing::info!(?models, "standing by for work orders");
                token
            } else {
                let (order, token) = kinsight::worker::load_order(&http).await?;
                let Some(order) = order else {
                    tracing::info!(
                        "this Job's work order is gone (its group was deleted or has a newer \
                         generation): nothing to do"
                    );
                    return Ok(());
                };
                let internal = (&http, results_url.as_str(), &token);
                work_order(order, internal, &options, &engines, &stop).await?;
                token
            };
            let internal = (&http, results_url.as_str(), &token);
            // Then the orders the controller hands this worker, when it asked its Jobs to
            // stay up: each saves a group a pod start of its own.
            let carrier =
                kinsight::worker::Carrier::from_env(http.clone(), &results_url, token.clone())
                    .map_err(anyhow::Error::msg)?;
            if let Some(carrier) = carrier {
                loop {
                    let next = tokio::select! {
                        next = carrier.next_order() => next,
                        () = stop.clone().requested() => None,
                    };
                    let Some(carried) = next else {
                        break;
                    };
                    tracing::info!(job = %carried.name, group = %carried.order.group.name, "carrying another Job's work order");
                    work_order(carried.order, internal, &options, &engines, &stop).await?;
                    carrier.done(&carried.name).await;
                }
            }
        }
        Command::Bench(args) => {
            kinsight::bench::run(args).await?;
        }
        Command::Models(args) => models(args)?,
        Command::Testbed(command) => return Err(command.run()),
        Command::RemoveTenantObjects(args) => {
            let client = kube::Client::try_default().await?;
            let tenancy = kinsight::tenancy::TenancyConfig {
                service_account: (args.namespace, args.bindings.service_account),
                bindings: args.bindings.tenant_bindings,
                ..ControllerConfig::default().tenancy
            };
            let cleaned = kinsight::tenancy::remove_all(&client, &tenancy).await?;
            tracing::info!(namespaces = ?cleaned, "tenant objects removed");
        }
    }
    Ok(())
}

/// Runs one work order in the span of its group's trace, sending its results to the API's
/// internal end (its client, the result ingest's URL, the pod's token) as they come; a
/// signal stops it (the results sent so far are stored).
async fn work_order(
    order: kinsight::worker::WorkOrder,
    (http, results_url, token): (&reqwest::Client, &str, &kinsight::results::TokenSource),
    options: &WorkerOptions,
    engines: &kinsight::worker::Engines,
    stop: &Shutdown,
) -> anyhow::Result<()> {
    let uploader = kinsight::results::ResultUploader::start(
        http.clone(),
        results_url.to_owned(),
        token.clone(),
        order.group.clone(),
        order.generation,
    );
    // The group's trace, as the order carries it (or, from a controller before that, the
    // Job's TRACEPARENT): the worker's spans join it.
    let trace = order
        .traceparent
        .clone()
        .or_else(|| std::env::var(kinsight::trace::ENV).ok())
        .and_then(|t| kinsight::trace::TraceParent::parse(&t));
    let span = tracing::info_span!(
        "worker",
        group = %order.group.name,
        trace_id = trace.map(|t| t.trace_id_hex()).unwrap_or_default(),
    );
    if let Some(trace) = trace {
        kinsight::trace::start(&span, Some(&trace));
    }
    let work = tracing::Instrument::instrument(
        kinsight::worker::run(order, uploader, options, engines),
        span,
    );
    tokio::select! {
        outcome = work => { outcome?; }
        () = stop.clone().requested() => anyhow::bail!(
            "stopped by a signal before the work order was done; the results sent so far are \
             stored and the Job's next pod does the rest"
        ),
    }
    Ok(())
}

fn models(args: ModelsArgs) -> anyhow::Result<()> {
    use kinsight::inference::catalog_tool::{self, Severity};
    let Some(ModelsCommand::Check { file, ort_dylib }) = args.check else {
        let rows = catalog_tool::catalog_rows(&args.catalog.load()?);
        match args.output {
            OutputFormat::Table => print!("{}", catalog_tool::catalog_table(&rows)),
            OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        }
        return Ok(());
    };
    kinsight::inference::init_runtime(ort_dylib.as_deref())?;
    let findings = catalog_tool::check_catalog_file(&file);
    match args.output {
        OutputFormat::Table => findings.iter().for_each(|f| println!("{f}")),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&findings)?),
    }
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    anyhow::ensure!(errors == 0, "{} has {errors} error(s)", file.display());
    Ok(())
}
