//! A real PostgreSQL (Debian's `postgresql` package) as a local process, like etcd: its data,
//! password, port and log live in a folder the caller owns.
//!
//! Files in the data parent: `postgres/` (the cluster), `postgres-password` (0600),
//! `postgres-port`, `postgres.log`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::control_plane::{free_ports, is_executable};
use super::{TestbedError, tail_file, write_private_file};

/// The role and database kinsight uses.
pub const USER: &str = "kinsight";
pub const DATABASE: &str = "kinsight";
/// A folder holding `initdb` and `postgres`, overriding the search.
pub const BIN_ENV: &str = "KINSIGHT_POSTGRES_BIN";
/// `1`: the server loads `pg_stat_statements`, so a benchmark can say which statements
/// took its time (`CREATE EXTENSION pg_stat_statements` then reads them).
pub const STATEMENTS_ENV: &str = "KINSIGHT_POSTGRES_STATEMENTS";

const DATA_SUBDIR: &str = "postgres";
const PASSWORD_FILE: &str = "postgres-password";
const PORT_FILE: &str = "postgres-port";
const LOG_FILE: &str = "postgres.log";
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(10);
const LOG_TAIL_LINES: usize = 40;
const PORT_RACE_TRIES: u32 = 3;
const COMPONENT: &str = "postgres";

/// A PostgreSQL server. Dropping a handle that started the server stops it (fast shutdown);
/// a reused one ([`Postgres::start_or_reuse`]) stops nothing.
pub struct Postgres {
    data_dir: PathBuf,
    log: PathBuf,
    port_file: PathBuf,
    /// `None` for a reused server: this handle cannot start one.
    bin_dir: Option<PathBuf>,
    /// The `postgres` system user when running as root (PostgreSQL refuses root).
    run_as: Option<SystemUser>,
    port: u16,
    password: String,
    child: Option<Child>,
    /// The server's certificate and key, once [`Postgres::require_tls`] made them.
    tls: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SystemUser {
    uid: u32,
    gid: u32,
}

impl Postgres {
    /// Starts a server on `data_parent/postgres` (running `initdb` the first time), on the port
    /// remembered there when it is free, else a free one; waits until it accepts connections
    /// and database `kinsight` exists.
    pub async fn start(data_parent: &Path) -> Result<Postgres, TestbedError> {
        Postgres::start_with_timeout(data_parent, DEFAULT_START_TIMEOUT).await
    }

    /// [`Postgres::start`] waiting up to `timeout` for the server.
    pub async fn start_with_timeout(
        data_parent: &Path,
        timeout: Duration,
    ) -> Result<Postgres, TestbedError> {
        let bin_dir = find_bin_dir()?;
        let run_as = server_user()?;
        std::fs::create_dir_all(data_parent)
            .map_err(|e| TestbedError::io(format!("creating {}", data_parent.display()), e))?;
        // The server runs with `/` as its working folder, so every path it gets is absolute.
        let data_parent = std::fs::canonicalize(data_parent)
            .map_err(|e| TestbedError::io(format!("resolving {}", data_parent.display()), e))?;
        let password = ensure_password(&data_parent.join(PASSWORD_FILE))?;
        let data_dir = data_parent.join(DATA_SUBDIR);
        if let Some(user) = run_as {
            make_traversable(&data_parent, user)?;
        }
        if data_dir.join("PG_VERSION").is_file() {
            if let Some(user) = run_as {
                chown_tree_if_needed(&data_dir, user)?;
            }
        } else {
            initdb(&bin_dir, &data_parent, &data_dir, &password, run_as).await?;
        }
        let mut pg = Postgres {
            data_dir,
            log: data_parent.join(LOG_FILE),
            port_file: data_parent.join(PORT_FILE),
            bin_dir: Some(bin_dir),
            run_as,
            port: 0,
            password,
            child: None,
            tls: None,
        };
        // As for the control plane: a port picked free may be taken before the server binds it.
        let mut tries = PORT_RACE_TRIES;
        loop {
            pg.port = choose_port(&pg.port_file)?;
            match pg.boot(timeout).await {
                Err(e) if tries > 1 && lost_the_port(&e) => {
                    tries -= 1;
                    pg.stop_blocking();
                    tracing::warn!(error = %e, "the postgres port was taken meanwhile; starting again");
                }
                Err(e) => return Err(e),
                Ok(()) => break,
            }
        }
        pg.create_database().await?;
        Ok(pg)
    }

    /// For `kinsight dev`: if the server remembered in `data_parent` answers with the stored
    /// password, returns a handle that owns no process; otherwise [`Postgres::start`].
    pub async fn start_or_reuse(data_parent: &Path) -> Result<Postgres, TestbedError> {
        Postgres::start_or_reuse_with_timeout(data_parent, DEFAULT_START_TIMEOUT).await
    }

    /// [`Postgres::start_or_reuse`] waiting up to `timeout` for a started server.
    pub async fn start_or_reuse_with_timeout(
        data_parent: &Path,
        timeout: Duration,
    ) -> Result<Postgres, TestbedError> {
        if let Some(pg) = Postgres::reuse(data_parent).await {
            tracing::info!(port = pg.port, "reusing the running postgres");
            return Ok(pg);
        }
        Postgres::start_with_timeout(data_parent, timeout).await
    }

    async fn reuse(data_parent: &Path) -> Option<Postgres> {
        let data_parent = std::fs::canonicalize(data_parent).ok()?;
        let password = read_password(&data_parent.join(PASSWORD_FILE))?;
        let port_file = data_parent.join(PORT_FILE);
        let port = read_port(&port_file)?;
        let pg = Postgres {
            data_dir: data_parent.join(DATA_SUBDIR),
            log: data_parent.join(LOG_FILE),
            port_file,
            bin_dir: None,
            run_as: None,
            port,
            password,
            child: None,
            tls: None,
        };
        connect(&pg.url(), Duration::from_secs(5)).await.ok()?;
        Some(pg)
    }

    /// `postgres://kinsight:PASSWORD@127.0.0.1:PORT/kinsight`.
    pub fn url(&self) -> String {
        self.url_for(DATABASE)
    }

    fn url_for(&self, database: &str) -> String {
        format!(
            "postgres://{USER}:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's process id (for a reused server, as its `postmaster.pid` says; 0 when
    /// that cannot be read).
    pub fn pid(&self) -> u32 {
        if let Some(child) = &self.child {
            return child.id();
        }
        std::fs::read_to_string(self.data_dir.join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
            .unwrap_or(0)
    }

    /// Whether this handle started (and so stops) the server.
    pub fn owns_process(&self) -> bool {
        self.child.is_some()
    }

    /// The PostgreSQL cluster folder.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server's log (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Fast shutdown, then starts again on the same port and data (for chaos tests). Clients
    /// lose their connections; the URL stays valid.
    pub async fn restart(&mut self) -> Result<(), TestbedError> {
        if self.bin_dir.is_none() {
            return Err(TestbedError::Config(
                "a reused postgres is owned by another process and cannot be restarted here".into(),
            ));
        }
        if let Some(mut child) = self.child.take() {
            super::signal(child.id(), "INT");
            let deadline = Instant::now() + STOP_GRACE;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.boot(DEFAULT_START_TIMEOUT).await
    }

    /// Makes the server take database `kinsight` over TLS only, as a managed PostgreSQL
    /// does: a CA and a certificate for 127.0.0.1 signed by it (OpenSSL's command line),
    /// `hostssl` in `pg_hba.conf` (plain connections to it are rejected), then a restart.
    /// Returns the CA's PEM file, for clients' `sslrootcert`.
    pub async fn require_tls(&mut self) -> Result<PathBuf, TestbedError> {
        let dir = self.data_dir.clone();
        let path = |name: &str| dir.join(name);
        let ext = path("server.ext");
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )
        .map_err(|e| TestbedError::io("writing the certificate's extensions", e))?;
        let openssl = |args: &[&str]| -> Result<(), TestbedError> {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .map_err(|e| TestbedError::io("running openssl", e))?;
            if !out.status.success() {
                return Err(TestbedError::Config(format!(
                    "openssl {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
            Ok(())
        };
        let days = "2";
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            days,
            "-subj",
            "/CN=kinsight testbed CA",
        ])?;
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            days,
            "-extfile",
            "server.ext",
        ])?;
        let key = path("server.key");
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| TestbedError::io("restricting the server key", e))?;
        }
        if let Some(user) = self.run_as {
            for file in ["server.key", "server.crt"] {
                std::os::unix::fs::chown(path(file), Some(user.uid), Some(user.gid))
                    .map_err(|e| TestbedError::io("handing the certificate to postgres", e))?;
            }
        }
        // First match wins: database `kinsight` over TLS only; the rest as before (the
        // readiness check connects to `postgres` without TLS).
        let hba = path("pg_hba.conf");
        let rules = std::fs::read_to_string(&hba)
            .map_err(|e| TestbedError::io("reading pg_hba.conf", e))?;
        let tls_rules = format!(
            "hostssl {DATABASE} all 127.0.0.1/32 scram-sha-256\nhostnossl {DATABASE} all 127.0.0.1/32 reject\n"
        );
        std::fs::write(&hba, format!("{tls_rules}{rules}"))
            .map_err(|e| TestbedError::io("writing pg_hba.conf", e))?;
        self.tls = Some((path("server.crt"), key));
        self.restart().await?;
        Ok(path("ca.crt"))
    }

    /// Spawns the server on `self.port` and waits until it accepts connections.
    async fn boot(&mut self, timeout: Duration) -> Result<(), TestbedError> {
        let Some(bin_dir) = &self.bin_dir else {
            return Err(TestbedError::Config("no postgres binaries to start".into()));
        };
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .map_err(|e| TestbedError::io(format!("opening {}", self.log.display()), e))
        };
        let (stdout, stderr) = (open()?, open()?);
        let mut cmd = Command::new(bin_dir.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["-c", "listen_addresses=127.0.0.1", "-p"])
            .arg(self.port.to_string())
            // TCP only: no socket or lock file outside the data folder.
            .args(["-c", "unix_socket_directories="])
            // Tests run many pools side by side.
            .args(["-c", "max_connections=200"])
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        if let Some((cert, key)) = &self.tls {
            cmd.args(["-c", "ssl=on", "-c"])
                .arg(format!("ssl_cert_file={}", cert.display()))
                .arg("-c")
                .arg(format!("ssl_key_file={}", key.display()));
        }
        // Benchmarks ask where the database's time goes (`pg_stat_statements`).
        if std::env::var_os(STATEMENTS_ENV).is_some_and(|v| v == "1") {
            cmd.args(["-c", "shared_preload_libraries=pg_stat_statements"]);
        }
        if let Some(user) = self.run_as {
            use std::os::unix::process::CommandExt as _;
            cmd.uid(user.uid).gid(user.gid);
        }
        let child = cmd.spawn().map_err(|e| {
            TestbedError::io(format!("starting postgres ({:?})", cmd.get_program()), e)
        })?;
        tracing::debug!(pid = child.id(), port = self.port, log = %self.log.display(), "postgres started");
        self.child = Some(child);
        self.wait_ready(timeout).await
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), TestbedError> {
        let url = self.url_for("postgres");
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            match connect(&url, Duration::from_secs(2)).await {
                Ok(_) => return Ok(()),
                // The cluster was made with another password (its password file was lost):
                // waiting cannot help.
                Err(ConnectFailure {
                    code: Some(code),
                    text,
                }) if code == tokio_postgres::error::SqlState::INVALID_PASSWORD => {
                    return Err(TestbedError::database(
                        format!(
                            "postgres in {} refuses the password in {}",
                            self.data_dir.display(),
                            self.port_file.with_file_name(PASSWORD_FILE).display()
                        ),
                        text,
                    ));
                }
                Err(_) => {}
            }
            if Instant::now() >= deadline {
                return Err(TestbedError::StartTimeout {
                    component: COMPONENT.into(),
                    seconds: timeout.as_secs(),
                    log: self.log.clone(),
                    log_tail: tail_file(&self.log, LOG_TAIL_LINES),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn check_alive(&mut self) -> Result<(), TestbedError> {
        let Some(child) = &mut self.child else {
            return Ok(());
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                self.child = None;
                Err(TestbedError::ProcessExited {
                    component: COMPONENT.into(),
                    status: status.to_string(),
                    log: self.log.clone(),
                    log_tail: tail_file(&self.log, LOG_TAIL_LINES),
                })
            }
            Err(e) => Err(TestbedError::io("checking on postgres", e)),
        }
    }

    /// `CREATE DATABASE kinsight` unless it exists.
    async fn create_database(&self) -> Result<(), TestbedError> {
        create_database(&self.url(), DATABASE).await.map(drop)
    }

    fn stop_blocking(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT is PostgreSQL's "fast" shutdown: it ends sessions instead of waiting.
            super::signal(child.id(), "INT");
            let deadline = Instant::now() + STOP_GRACE;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop_blocking();
    }
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the URL: it holds the password.
        f.debug_struct("Postgres")
            .field("data_dir", &self.data_dir)
            .field("port", &self.port)
            .field("pid", &self.child.as_ref().map(Child::id))
            .finish()
    }
}

/// Creates the database `name` (letters, digits and `_`) on the server of `server_url` (the
/// URL of any of its databases) unless it exists, and returns its URL: tests that share one
/// server keep their rows apart this way.
pub async fn create_database(server_url: &str, name: &str) -> Result<String, TestbedError> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(TestbedError::Config(format!(
            "database name {name:?}: only letters, digits and _"
        )));
    }
    let Some((server, _)) = server_url.rsplit_once('/') else {
        return Err(TestbedError::Config(format!(
            "{server_url:?} is not a database URL"
        )));
    };
    let client = connect(&format!("{server}/postgres"), Duration::from_secs(10))
        .await
        .map_err(|e| TestbedError::database("connecting to postgres", e.text))?;
    // There is no `IF NOT EXISTS` for databases.
    match client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
    {
        Ok(()) => {}
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => {}
        Err(e) => {
            return Err(TestbedError::database(
                format!("creating database {name}"),
                crate::store::describe(&e),
            ));
        }
    }
    Ok(format!("{server}/{name}"))
}

struct ConnectFailure {
    code: Option<tokio_postgres::error::SqlState>,
    text: String,
}

/// Connects (with a bound on the whole handshake) and keeps the connection driven.
async fn connect(url: &str, timeout: Duration) -> Result<tokio_postgres::Client, ConnectFailure> {
    let (client, connection) =
        tokio::time::timeout(timeout, tokio_postgres::connect(url, tokio_postgres::NoTls))
            .await
            .map_err(|_| ConnectFailure {
                code: None,
                text: format!("no answer within {} s", timeout.as_secs()),
            })?
            .map_err(|e| ConnectFailure {
                code: e.code().cloned(),
                text: crate::store::describe(&e),
            })?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Whether the server could not bind its port (another process took it).
fn lost_the_port(error: &TestbedError) -> bool {
    match error {
        TestbedError::ProcessExited { log_tail, .. }
        | TestbedError::StartTimeout { log_tail, .. } => {
            log_tail.contains("could not create any TCP/IP sockets")
        }
        _ => false,
    }
}

fn missing(detail: impl std::fmt::Display) -> TestbedError {
    TestbedError::MissingPostgres(detail.to_string())
}

/// `$KINSIGHT_POSTGRES_BIN`, else the newest `/usr/lib/postgresql/*/bin`, else `PATH`.
fn find_bin_dir() -> Result<PathBuf, TestbedError> {
    let complete =
        |dir: &Path| is_executable(&dir.join("postgres")) && is_executable(&dir.join("initdb"));
    if let Some(dir) = std::env::var_os(BIN_ENV).filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return if complete(&dir) {
            Ok(dir)
        } else {
            Err(missing(format!(
                "{BIN_ENV}={} holds no initdb and postgres",
                dir.display()
            )))
        };
    }
    if let Some(dir) = newest_debian_bin_dir(Path::new("/usr/lib/postgresql"), complete) {
        return Ok(dir);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|d| complete(d))
        .ok_or_else(|| missing("no initdb and postgres in /usr/lib/postgresql/*/bin or PATH"))
}

/// Debian installs each major version side by side: `/usr/lib/postgresql/<major>/bin`.
fn newest_debian_bin_dir(root: &Path, complete: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir(root)
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_str()?.to_string();
            let version = name
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            let bin = entry.path().join("bin");
            complete(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// The `postgres` system user when this process runs as root, else `None` (run as ourselves).
fn server_user() -> Result<Option<SystemUser>, TestbedError> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| TestbedError::io("reading /proc/self/status", e))?;
    if effective_uid(&status) != Some(0) {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd")
        .map_err(|e| TestbedError::io("reading /etc/passwd", e))?;
    passwd_user(&passwd, "postgres").map(Some).ok_or_else(|| {
        missing("PostgreSQL refuses to run as root and there is no `postgres` system user")
    })
}

/// The effective uid from `/proc/self/status` (`Uid: real effective saved fs`).
fn effective_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|uid| uid.parse().ok())
}

fn passwd_user(passwd: &str, name: &str) -> Option<SystemUser> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name {
            return None;
        }
        let _password = fields.next()?;
        Some(SystemUser {
            uid: fields.next()?.parse().ok()?,
            gid: fields.next()?.parse().ok()?,
        })
    })
}

/// Adds o+x (traverse only, never read) to each folder from `dir` up that `user` could not
/// enter, such as a 0700 temporary folder.
fn make_traversable(dir: &Path, user: SystemUser) -> Result<(), TestbedError> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    for folder in dir.ancestors() {
        let meta = std::fs::metadata(folder)
            .map_err(|e| TestbedError::io(format!("reading {}", folder.display()), e))?;
        let mode = meta.mode();
        let can_enter = if meta.uid() == user.uid {
            mode & 0o100 != 0
        } else if meta.gid() == user.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !can_enter {
            let new_mode = (mode & 0o7777) | 0o001;
            std::fs::set_permissions(folder, std::fs::Permissions::from_mode(new_mode)).map_err(
                |e| TestbedError::io(format!("letting postgres into {}", folder.display()), e),
            )?;
            let mode = format!("{new_mode:o}");
            if folder == dir {
                tracing::info!(folder = %folder.display(), mode, "made traversable for postgres");
            } else {
                // Above the folder we were given (such as a 0700 home): worth telling.
                tracing::warn!(folder = %folder.display(), mode, "made traversable for postgres");
            }
        }
    }
    Ok(())
}

/// Hands a data folder made by someone else (an earlier non-root run) to `user`.
fn chown_tree_if_needed(dir: &Path, user: SystemUser) -> Result<(), TestbedError> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| TestbedError::io(format!("reading {}", dir.display()), e))?;
    if meta.uid() == user.uid {
        return Ok(());
    }
    chown_tree(dir, user)
}

fn chown_tree(path: &Path, user: SystemUser) -> Result<(), TestbedError> {
    std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))
        .map_err(|e| TestbedError::io(format!("handing {} to postgres", path.display()), e))?;
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| TestbedError::io(format!("reading {}", path.display()), e))?;
    if meta.is_dir() {
        let entries = std::fs::read_dir(path)
            .map_err(|e| TestbedError::io(format!("listing {}", path.display()), e))?;
        for entry in entries {
            let entry =
                entry.map_err(|e| TestbedError::io(format!("listing {}", path.display()), e))?;
            chown_tree(&entry.path(), user)?;
        }
    }
    Ok(())
}

/// Creates the cluster: superuser `kinsight` with the stored password, SCRAM for every login.
async fn initdb(
    bin_dir: &Path,
    data_parent: &Path,
    data_dir: &Path,
    password: &str,
    run_as: Option<SystemUser>,
) -> Result<(), TestbedError> {
    // Left over by an interrupted initdb (no PG_VERSION yet): initdb wants it empty.
    if data_dir.exists() {
        std::fs::remove_dir_all(data_dir)
            .map_err(|e| TestbedError::io(format!("removing {}", data_dir.display()), e))?;
    }
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(data_dir)
            .map_err(|e| TestbedError::io(format!("creating {}", data_dir.display()), e))?;
    }
    // initdb (maybe another user) reads the password from a file; it lives only for the call.
    let pwfile = data_parent.join("postgres-pwfile.tmp");
    write_private_file(&pwfile, password.as_bytes())?;
    if let Some(user) = run_as {
        for path in [data_dir, pwfile.as_path()] {
            std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid)).map_err(|e| {
                TestbedError::io(format!("handing {} to postgres", path.display()), e)
            })?;
        }
    }
    let mut cmd = tokio::process::Command::new(bin_dir.join("initdb"));
    cmd.arg("-D")
        .arg(data_dir)
        .arg(format!("--username={USER}"))
        .arg("--auth=scram-sha-256")
        .arg(format!("--pwfile={}", pwfile.display()))
        .args(["--encoding=UTF8", "--locale=C.UTF-8", "--no-instructions"])
        .current_dir("/")
        .stdin(Stdio::null());
    if let Some(user) = run_as {
        cmd.uid(user.uid).gid(user.gid);
    }
    let started = Instant::now();
    let output = cmd.output().await;
    let _ = std::fs::remove_file(&pwfile);
    let output = output.map_err(|e| TestbedError::io("running initdb", e))?;
    super::succeeded(format!("initdb -D {}", data_dir.display()), &output)?;
    tracing::info!(
        data_dir = %data_dir.display(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "initdb done"
    );
    Ok(())
}

fn read_password(file: &Path) -> Option<String> {
    std::fs::read_to_string(file)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|p| !p.is_empty())
}

/// The stored password, or a new random one (hex: safe in a URL) stored with mode 0600.
fn ensure_password(file: &Path) -> Result<String, TestbedError> {
    if let Some(password) = read_password(file) {
        return Ok(password);
    }
    let password = hex::encode(rand::random::<[u8; 24]>());
    write_private_file(file, password.as_bytes())?;
    Ok(password)
}

fn read_port(file: &Path) -> Option<u16> {
    std::fs::read_to_string(file)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|p| *p != 0)
}

/// The remembered port when it is free, else a new free one (then remembered).
fn choose_port(file: &Path) -> Result<u16, TestbedError> {
    if let Some(port) = read_port(file)
        && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
    {
        return Ok(port);
    }
    let [port] = free_ports::<1>()?;
    std::fs::write(file, port.to_string())
        .map_err(|e| TestbedError::io(format!("writing {}", file.display()), e))?;
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_uid_is_the_second_field() {
        let status = "Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t5\t5\t5\t5\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Name:\tx\n"), None);
    }

    #[test]
    fn passwd_entries_are_parsed() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      postgres:x:101:104:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash\n";
        assert_eq!(
            passwd_user(passwd, "postgres"),
            Some(SystemUser { uid: 101, gid: 104 })
        );
        assert_eq!(passwd_user(passwd, "nobody"), None);
        assert_eq!(passwd_user("postgres:x:nope:1::", "postgres"), None);
    }

    #[test]
    fn the_newest_major_version_wins() {
        let root = tempfile::tempdir().expect("tempdir");
        for v in ["9.6", "13", "15", "notaversion"] {
            std::fs::create_dir_all(root.path().join(v).join("bin")).expect("mkdir");
        }
        std::fs::create_dir_all(root.path().join("16")).expect("mkdir");
        let has_bin = |d: &Path| d.is_dir() && !d.starts_with(root.path().join("16"));
        assert_eq!(
            newest_debian_bin_dir(root.path(), has_bin),
            Some(root.path().join("15/bin"))
        );
        assert_eq!(
            newest_debian_bin_dir(&root.path().join("none"), has_bin),
            None
        );
    }

    #[test]
    fn password_is_made_once_and_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(PASSWORD_FILE);
        let a = ensure_password(&file).expect("password");
        let b = ensure_password(&file).expect("password");
        assert_eq!(a, b);
        assert_eq!(a.len(), 48);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn port_is_remembered_while_free() {
        let _lock = crate::testbed::control_plane::port_test_lock();
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(PORT_FILE);
        let first = choose_port(&file).expect("port");
        assert_eq!(choose_port(&file).expect("port"), first);
        let _busy = std::net::TcpListener::bind(("127.0.0.1", first)).expect("bind");
        assert_ne!(choose_port(&file).expect("port"), first);
    }

    #[test]
    fn a_taken_port_is_told_apart() {
        let exited = |tail: &str| TestbedError::ProcessExited {
            component: COMPONENT.into(),
            status: "exit status: 1".into(),
            log: PathBuf::from(LOG_FILE),
            log_tail: tail.into(),
        };
        assert!(lost_the_port(&exited(
            "LOG:  could not bind IPv4 address \"127.0.0.1\": Address already in use\n\
             FATAL:  could not create any TCP/IP sockets"
        )));
        assert!(!lost_the_port(&exited(
            "FATAL:  data directory has wrong ownership"
        )));
    }

    #[test]
    fn missing_binaries_name_the_setup_script() {
        let text = missing("nothing here").to_string();
        assert!(text.contains("scripts/setup.sh"), "{text}");
        assert!(text.contains("postgresql"), "{text}");
        assert_eq!(missing("x").category(), "missing_postgres");
    }
}
