//! What the real-node tests share: commands that must succeed, a test bounded on its own
//! runtime, and the stack they run on (the project's image, built while a control plane
//! with kube-scheduler starts, imported into a real node).

use std::future::Future;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kinsight::testbed::{ControlPlane, ControlPlaneOptions, RealNode, RealNodeOptions};

use super::run;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// Runs `test` on a runtime of its own, failing it past `limit`.
pub fn run_bounded(limit: Duration, test: impl Future<Output = ()>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        tokio::time::timeout(limit, test)
            .await
            .unwrap_or_else(|_| panic!("the test took over {limit:?}"))
    });
}

/// A control plane with a real node running the project's image. Drop the node before
/// the plane (fields drop in order); the image leaves the buildah store last.
pub struct Stack {
    pub node: RealNode,
    pub plane: ControlPlane,
    /// `localhost/kinsight:<tag>`, imported into the node's containerd.
    pub image: String,
    pub image_cleanup: ImageCleanup,
}

impl Stack {
    /// Builds the image from the test's own binary (tagged `tag`, archived in `scratch`)
    /// while the control plane (with PostgreSQL when `postgres`) starts, then starts the
    /// node with the image imported. Prints how long each part took.
    pub async fn start(tag: &str, postgres: bool, scratch: &Path) -> Stack {
        let image = format!("localhost/kinsight:{tag}");
        let archive = scratch.join("kinsight.tar");
        let build = {
            let (tag, archive) = (tag.to_owned(), archive.clone());
            tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let out = run(
                    Command::new(format!("{REPO}/scripts/build-image.sh"))
                        .args(["--binary", env!("CARGO_BIN_EXE_kinsight")])
                        .args(["--tag", &tag, "--base", "local", "--oci-archive"])
                        .arg(&archive),
                    "scripts/build-image.sh",
                );
                eprintln!("image built in {:.1?}: {}", started.elapsed(), out.trim());
            })
        };
        let started = Instant::now();
        let plane = ControlPlane::start(ControlPlaneOptions {
            postgres,
            real_node: true,
            ..ControlPlaneOptions::default()
        })
        .await
        .expect("control plane with kube-scheduler starts");
        eprintln!("control plane up in {:.1?}", started.elapsed());
        build.await.expect("image build");
        let image_cleanup = ImageCleanup(image.clone());
        let node_started = Instant::now();
        let node = RealNode::start(
            &plane,
            RealNodeOptions {
                images: vec![archive],
                // tests/worker_jobs.rs's RuntimeClass names it, as a GPU node's would.
                runtime_handlers: vec!["nvidia".to_owned()],
                ..RealNodeOptions::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("the real node does not start: {e}"));
        eprintln!(
            "node Ready and schedulable {:.1?} after its start ({:.1?} after the control plane's)",
            node_started.elapsed(),
            started.elapsed()
        );
        Stack {
            node,
            plane,
            image,
            image_cleanup,
        }
    }
}

/// Removes the test's image from the project's buildah store.
pub struct ImageCleanup(String);

impl Drop for ImageCleanup {
    fn drop(&mut self) {
        let _ = Command::new(format!("{REPO}/scripts/buildah.sh"))
            .args(["rmi", &self.0])
            .output();
    }
}

/// What the tests of a binary run by [`main`] need of its one real-node stack.
pub struct Shared {
    /// The control plane's admin kubeconfig.
    pub kubeconfig: std::path::PathBuf,
    /// The testbed's PostgreSQL (any of its databases: each test makes its own).
    pub database_url: String,
    /// The project's image, imported into the node.
    pub image: String,
}

static SHARED: std::sync::OnceLock<Shared> = std::sync::OnceLock::new();

/// The real-node stack of this test binary, when its `main` is [`main`] (and
/// `USE_EXISTING_CLUSTER` is not set).
pub fn shared() -> Option<&'static Shared> {
    SHARED.get()
}

/// Starts this process's shared stack (see [`shared`]); keep it until the last user is done.
async fn start_shared(scratch: &Path) -> Stack {
    kinsight::install_crypto_provider();
    let tag = format!("shared-{}", std::process::id());
    let stack = Stack::start(&tag, true, scratch).await;
    let _ = SHARED.set(Shared {
        kubeconfig: stack.plane.kubeconfig_path().to_path_buf(),
        database_url: stack
            .plane
            .database_url()
            .expect("the testbed's PostgreSQL"),
        image: stack.image.clone(),
    });
    stack
}

/// Runs `body` on this process's shared stack, started first and stopped after: for a
/// benchmark that drives the tests' [`super::Harness`] (a test binary has [`main`]).
pub async fn on_shared_stack<F: Future>(body: F) -> F::Output {
    let scratch = tempfile::tempdir().expect("temp dir");
    let stack = start_shared(scratch.path()).await;
    let output = body.await;
    drop(stack);
    output
}

/// One test of a binary run by [`main`]: its name and its body.
pub type Test = (
    &'static str,
    fn() -> std::pin::Pin<Box<dyn Future<Output = ()>>>,
);

/// `main` of a test binary (`harness = false`) whose tests share one real node: starts the
/// stack once (when a selected test needs it), runs the tests as libtest would (the same
/// arguments, each test on a runtime of its own), then stops the stack. Write it with
/// `crate::real_node_tests!`.
pub fn main(tests: Vec<Test>) -> std::process::ExitCode {
    let args = libtest_mimic::Arguments::from_args();
    let selected = tests.iter().any(|(name, _)| match &args.filter {
        None => true,
        Some(filter) if args.exact => name == filter,
        Some(filter) => name.contains(filter.as_str()),
    }) && !args.list;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let scratch = tempfile::tempdir().expect("temp dir");
    let stack = (selected && !kinsight::testbed::use_existing_cluster())
        .then(|| runtime.block_on(start_shared(scratch.path())));
    let trials = tests
        .into_iter()
        .map(|(name, test)| {
            libtest_mimic::Trial::test(name, move || {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .map_err(|e| format!("runtime: {e}"))?
                    .block_on(test());
                Ok(())
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    runtime.block_on(async move { drop(stack) });
    conclusion.exit_code()
}

/// `main` for a test binary whose `async fn` tests share one real node (see [`main`]):
/// `real_node_tests!(first_test, second_test);`.
#[macro_export]
macro_rules! real_node_tests {
    ($($test:ident),+ $(,)?) => {
        fn main() -> std::process::ExitCode {
            common::real_node::main(vec![$(
                (stringify!($test), || Box::pin($test())),
            )+])
        }
    };
}
