//! Configuration: the TOML file, environment and command-line flags merged into one `Config`.
//!
//! Precedence: flags > environment (`CORAL_*`) > file > built-in defaults. The file is
//! `--config`/`CORAL_CONFIG`, else `/etc/coral/corald.toml` if it exists, else none. Unknown keys
//! and bad values are errors that name the file, the line and the key.

pub mod embed;
pub mod log_filter;
pub mod watch;

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// `rpc.max_request_bytes` unless configured: 4 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: u32 = 4 * 1024 * 1024;

/// Everything corald can be told. Field docs double as the configuration reference.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Unix socket the JSON-RPC API listens on.
    pub socket: Option<PathBuf>,
    /// Where corald keeps its state (the managed database lives in `<state_dir>/postgres`).
    pub state_dir: Option<PathBuf>,
    /// Log filter in `RUST_LOG` syntax (the `RUST_LOG` variable wins when set).
    pub log: String,
    /// Library roots registered at start and on reload (SIGHUP): a path listed here and not yet
    /// registered is added and scanned. A path removed from the list is forgotten at the next
    /// reload (its index entries are dropped; files are never touched); a restart never removes
    /// libraries. Libraries added with `coralctl library add` are not affected.
    pub libraries: Vec<PathBuf>,
    pub rpc: RpcConfig,
    pub database: DatabaseConfig,
    pub scan: ScanConfig,
    pub progress: ProgressConfig,
    pub embed: embed::EmbedConfig,
    pub watch: watch::WatchConfig,
}

/// The `[rpc]` section: who may use the API socket.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RpcConfig {
    /// Group that owns the socket and whose members may connect (besides root and corald's own
    /// user). When the group does not exist (or corald, not root, is not a member), the socket
    /// keeps corald's own group. Empty: corald's own group applies.
    pub group: String,
    /// Permission bits of the socket file, in octal (a socket socket-activated by systemd keeps
    /// the unit's `SocketMode=`).
    pub socket_mode: String,
    /// Largest request body accepted, in bytes; bigger ones get an error and the connection
    /// carries on.
    pub max_request_bytes: u32,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// An external PostgreSQL (with the `vector` extension). Empty: corald runs its own.
    pub url: Option<String>,
    /// Where the PostgreSQL binaries of the managed cluster are (default: searched).
    pub postgres_dir: Option<PathBuf>,
    /// Unprivileged user the managed cluster runs as when corald runs as root
    /// (default: `coral` if it exists, else `nobody`).
    pub managed_user: Option<String>,
    /// Connection pool size.
    pub max_connections: u32,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ScanConfig {
    /// Threads that walk and probe files (0: one per CPU).
    pub threads: usize,
    /// Rows per database write transaction.
    pub batch_size: usize,
    /// Scan jobs that may wait in the queue.
    pub queue_capacity: usize,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProgressConfig {
    /// Least time between two `scan.progress` notifications of one scan (phase changes and
    /// the final state are sent at once regardless).
    pub notify_interval_ms: u64,
    /// How often a running scan's counters are written to the `scans` table.
    pub persist_interval_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: None,
            state_dir: None,
            log: "info".to_owned(),
            libraries: Vec::new(),
            rpc: RpcConfig::default(),
            database: DatabaseConfig::default(),
            scan: ScanConfig::default(),
            progress: ProgressConfig::default(),
            embed: embed::EmbedConfig::default(),
            watch: watch::WatchConfig::default(),
        }
    }
}

impl Default for RpcConfig {
    fn default() -> Self {
        RpcConfig {
            group: "coral".to_owned(),
            socket_mode: "0660".to_owned(),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
        }
    }
}

impl RpcConfig {
    /// `socket_mode` as permission bits (validated by [`Config::from_toml`]).
    pub fn socket_mode_bits(&self) -> Result<u32, ConfigError> {
        let problem = |p: &str| ConfigError::Invalid {
            key: "rpc.socket_mode",
            problem: format!("{p} (got \"{}\")", self.socket_mode),
        };
        let digits = self.socket_mode.trim();
        let digits = digits.strip_prefix("0o").unwrap_or(digits);
        if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return Err(problem("must be octal permission bits such as \"0660\""));
        }
        let bits = u32::from_str_radix(digits, 8)
            .map_err(|_| problem("must be octal permission bits such as \"0660\""))?;
        if bits > 0o777 {
            return Err(problem(
                "must be at most 0777 (no setuid, setgid or sticky bits)",
            ));
        }
        if bits & 0o600 != 0o600 {
            return Err(problem("must give the owner read and write (0600)"));
        }
        Ok(bits)
    }
}

/// Whether `name` can be a Unix group name (no separator, whitespace or path characters).
fn valid_group_name(name: &str) -> bool {
    name.len() <= 32
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'$'))
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: None,
            postgres_dir: None,
            managed_user: None,
            max_connections: 8,
        }
    }
}

impl Default for ScanConfig {
    fn default() -> Self {
        ScanConfig {
            threads: 0,
            batch_size: 500,
            queue_capacity: 64,
        }
    }
}

impl Default for ProgressConfig {
    fn default() -> Self {
        ProgressConfig {
            notify_interval_ms: 200,
            persist_interval_ms: 1000,
        }
    }
}

/// A configuration problem, worded for the person who has to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: `{key}` {problem}")]
    Invalid { key: &'static str, problem: String },
    /// A bad value in a file: [`ConfigError::Invalid`] with the file and the key's line.
    #[error("invalid configuration file {path}: {}key `{key}` {problem}", line.map(|l| format!("line {l}, ")).unwrap_or_default())]
    Value {
        path: PathBuf,
        line: Option<usize>,
        key: &'static str,
        problem: String,
    },
}

/// Overrides from the command line and environment (already merged by clap).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub database_url: Option<String>,
}

impl Config {
    /// Parse a TOML document; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: describe_toml_error(text, &e),
        })?;
        config.validate().map_err(|e| match e {
            ConfigError::Invalid { key, problem } => ConfigError::Value {
                path: origin.to_owned(),
                line: key_line(text, key),
                key,
                problem,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Load the file named explicitly, or the system file if it exists, or the defaults.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let path = match explicit {
            Some(p) => Some(p.to_owned()),
            None => {
                Some(PathBuf::from(coral_proto::paths::SYSTEM_CONFIG_PATH)).filter(|p| p.exists())
            }
        };
        match path {
            None => Ok(Config::default()),
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Config::from_toml(&text, &path)
            }
        }
    }

    /// Apply flag/environment overrides.
    pub fn apply(&mut self, o: Overrides) {
        if o.socket.is_some() {
            self.socket = o.socket;
        }
        if o.state_dir.is_some() {
            self.state_dir = o.state_dir;
        }
        if let Some(url) = o.database_url.filter(|u| !u.is_empty()) {
            self.database.url = Some(url);
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.embed.validate()?;
        let invalid = |key, problem: &str| {
            Err(ConfigError::Invalid {
                key,
                problem: problem.to_owned(),
            })
        };
        if self.database.max_connections == 0 {
            return invalid("database.max_connections", "must be at least 1");
        }
        if self.scan.batch_size == 0 || self.scan.batch_size > 10_000 {
            return invalid("scan.batch_size", "must be between 1 and 10000");
        }
        if self.scan.queue_capacity == 0 {
            return invalid("scan.queue_capacity", "must be at least 1");
        }
        if self.progress.notify_interval_ms > 60_000 {
            return invalid("progress.notify_interval_ms", "must be at most 60000");
        }
        if self.progress.persist_interval_ms == 0 || self.progress.persist_interval_ms > 60_000 {
            return invalid(
                "progress.persist_interval_ms",
                "must be between 1 and 60000",
            );
        }
        if let Some(url) = &self.database.url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return invalid(
                "database.url",
                "must start with postgres:// or postgresql://",
            );
        }
        self.rpc.socket_mode_bits()?;
        if !(1024..=256 * 1024 * 1024).contains(&self.rpc.max_request_bytes) {
            return invalid(
                "rpc.max_request_bytes",
                "must be between 1024 and 268435456 (256 MiB)",
            );
        }
        if !valid_group_name(&self.rpc.group) {
            return invalid(
                "rpc.group",
                "must be a group name (letters, digits, `_`, `-`, `.`; at most 32 characters)",
            );
        }
        for lib in &self.libraries {
            if !lib.is_absolute() {
                return Err(ConfigError::Invalid {
                    key: "libraries",
                    problem: format!("entries must be absolute paths (got {})", lib.display()),
                });
            }
        }
        self.watch.validate()?;
        if let Err(e) = log_filter::parse_filter(&self.log) {
            return Err(ConfigError::Invalid {
                key: "log",
                problem: format!("is not a valid log filter: {e}"),
            });
        }
        Ok(())
    }

    /// The socket path in effect.
    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(coral_proto::paths::default_socket_path)
    }

    /// The state directory in effect.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(coral_proto::paths::default_state_dir)
    }

    /// Scan threads in effect.
    pub fn scan_threads(&self) -> usize {
        if self.scan.threads > 0 {
            self.scan.threads
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        }
    }
}

/// "line 3, key `scan.batch_szie`: unknown field …" from a toml error.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().to_owned();
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let key = dotted_key_at(text, span.start);
            match key {
                Some(key) => format!("line {line}, key `{key}`: {message}"),
                None => format!("line {line}: {message}"),
            }
        }
        None => message,
    }
}

/// The line where the dotted `key` (e.g. `scan.batch_size`) is written, however the document
/// spells it (`[scan]` table, dotted key, inline table).
fn key_line(text: &str, key: &str) -> Option<usize> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut table = doc.get_ref();
    let mut parts = key.split('.').peekable();
    let mut start = None;
    while let Some(part) = parts.next() {
        let (k, v) = table.get_key_value(part)?;
        start = Some(k.span().start);
        if parts.peek().is_some() {
            match v.get_ref() {
                toml::de::DeValue::Table(t) => table = t,
                _ => return None,
            }
        }
    }
    let start = start?;
    Some(
        text.as_bytes()
            .get(..start)?
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1,
    )
}

/// The dotted key whose entry contains byte `offset`: the nearest `[table]` header above it
/// plus the key at the start of that line.
fn dotted_key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = text.get(line_start..line_end)?.trim();
    let key = line.split('=').next()?.trim();
    if key.is_empty() || key.starts_with('[') {
        return None;
    }
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    Some(match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/etc/coral/corald.toml"))
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(parse("").ok(), Some(Config::default()));
    }

    #[test]
    fn reads_every_section() {
        let c = parse(
            "socket = \"/tmp/s.sock\"\nlog = \"debug\"\n[database]\nurl = \"postgres://u@h/db\"\nmax_connections = 3\n[scan]\nthreads = 4\nbatch_size = 100\n",
        )
        .expect("valid config");
        assert_eq!(c.socket, Some(PathBuf::from("/tmp/s.sock")));
        assert_eq!(c.database.url.as_deref(), Some("postgres://u@h/db"));
        assert_eq!(c.database.max_connections, 3);
        assert_eq!(c.scan_threads(), 4);
        assert_eq!(c.scan.batch_size, 100);
    }

    #[test]
    fn unknown_key_names_the_key_and_line() {
        let err = parse("log = \"info\"\n[scan]\nthreads = 2\nbatch_szie = 5\n")
            .expect_err("unknown key must fail")
            .to_string();
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("scan.batch_szie"), "{err}");
        assert!(err.contains("/etc/coral/corald.toml"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_key_and_line() {
        let err = parse("[database]\nmax_connections = \"many\"\n")
            .expect_err("wrong type must fail")
            .to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("database.max_connections"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = parse("[scan]\nbatch_size = 0\n")
            .expect_err("zero batch")
            .to_string();
        assert!(err.contains("scan.batch_size"), "{err}");
        assert!(err.contains("/etc/coral/corald.toml: line 2,"), "{err}");
        let err = parse("[database]\nurl = \"mysql://x\"\n")
            .expect_err("bad url")
            .to_string();
        assert!(err.contains("database.url"), "{err}");
        let err = parse("log = \"[[[\"\n")
            .expect_err("bad filter")
            .to_string();
        assert!(err.contains("`log`"), "{err}");
        let err = parse("[embed]\ndevice = \"tpu\"\n")
            .expect_err("bad device")
            .to_string();
        assert!(err.contains("embed.device"), "{err}");
        let err = parse("[rpc]\nmax_request_bytes = 10\n")
            .expect_err("tiny request limit")
            .to_string();
        assert!(err.contains("rpc.max_request_bytes"), "{err}");
        let c = parse("[rpc]\nmax_request_bytes = 65536\n").expect("valid");
        assert_eq!(c.rpc.max_request_bytes, 65536);
    }

    #[test]
    fn bad_values_name_the_file_and_line_however_the_key_is_written() {
        for (text, line) in [
            ("log = \"info\"\n\n[scan]\nthreads = 2\nbatch_size = 0\n", 5),
            ("log = \"info\"\nscan.batch_size = 0\n", 2),
            ("scan = { threads = 1, batch_size = 0 }\n", 1),
            ("[watch]\n[scan]\nqueue_capacity = 0\n", 3),
            ("libraries = [\"/a\",\n  \"b\"]\n", 1),
        ] {
            let err = parse(text).expect_err(text).to_string();
            assert!(
                err.starts_with(&format!(
                    "invalid configuration file /etc/coral/corald.toml: line {line}, key `"
                )),
                "{text:?}: {err}"
            );
        }
    }

    #[test]
    fn log_filters_with_spaces_and_non_ascii_targets_do_not_panic() {
        // Found by fuzzing: tracing-subscriber panicked on this directive (space, then `é`).
        let c = parse("log = \"info, é=debug\"\n").expect("a valid filter");
        assert_eq!(c.log, "info, é=debug");
        let err = parse("log = \" infÿ[¬=debug\"\n")
            .expect_err("not a filter")
            .to_string();
        assert!(err.contains("line 1, key `log`"), "{err}");
        // A space after the comma no longer makes a valid filter invalid.
        let f = log_filter::parse_filter("info, corald=debug").expect("valid");
        assert!(f.to_string().contains("corald=debug"), "{f}");
    }

    #[test]
    fn flags_override_file() {
        let mut c = parse("socket = \"/a.sock\"\n").expect("valid");
        c.apply(Overrides {
            socket: Some(PathBuf::from("/b.sock")),
            state_dir: None,
            database_url: Some(String::new()),
        });
        assert_eq!(c.socket_path(), PathBuf::from("/b.sock"));
        assert_eq!(c.database.url, None);
    }
}
