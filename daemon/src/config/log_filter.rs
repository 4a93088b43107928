//! The `log` key: `RUST_LOG`-style filters, checked when the configuration loads and parsed the
//! same way by the logging set-up.

use tracing_subscriber::EnvFilter;

/// Parses a `RUST_LOG`-style filter, trimming each comma-separated directive first.
///
/// tracing-subscriber 0.3 splits on commas but indexes each directive's trimmed text into the
/// untrimmed one: `"info, corald=debug"` was refused (the level read as `=debug`), and a space
/// followed by a non-ASCII character (`"info, é=debug"`) made it panic, so corald died on its
/// own configuration or `RUST_LOG`. Found by fuzzing the configuration; every filter corald
/// uses goes through here.
pub fn parse_filter(filter: &str) -> Result<EnvFilter, tracing_subscriber::filter::ParseError> {
    let directives: Vec<&str> = filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    EnvFilter::try_new(directives.join(","))
}
