//! SIGHUP: the configuration read again, and what may change while running applied.

use super::Service;
use crate::config::Config;
use crate::rpc::api::CoralRpc;

/// SIGHUP: read the configuration again and apply what can change while running (the log
/// filter, the `libraries` list). Settings that need a restart are kept as they are, with a
/// warning naming them. A configuration that does not load changes nothing.
pub(super) async fn reload(config: &mut Config, service: &Service, api: &CoralRpc) {
    let mut new = match Config::load(service.config_path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload failed; keeping the running configuration");
            return;
        }
    };
    new.apply(service.overrides.clone());
    if new.log != config.log {
        match crate::logging::set_filter(&new.log) {
            Ok(()) => tracing::info!(filter = %new.log, "log filter changed"),
            Err(e) => tracing::warn!(error = %e, "log filter not changed"),
        }
    }
    api.0
        .libraries
        .sync(&config.libraries, &new.libraries, true)
        .await;
    let mut needs_restart = Vec::new();
    if new.socket_path() != config.socket_path() {
        needs_restart.push("socket");
    }
    if new.state_dir() != config.state_dir() {
        needs_restart.push("state_dir");
    }
    if new.database != config.database {
        needs_restart.push("[database]");
    }
    if new.scan != config.scan {
        needs_restart.push("[scan]");
    }
    if new.progress != config.progress {
        needs_restart.push("[progress]");
    }
    if new.rpc != config.rpc {
        needs_restart.push("[rpc]");
    }
    if new.embed != config.embed {
        needs_restart.push("[embed]");
    }
    if new.watch != config.watch {
        needs_restart.push("[watch]");
    }
    if !needs_restart.is_empty() {
        tracing::warn!(
            settings = %needs_restart.join(", "),
            "changed settings need a restart to apply (systemctl restart corald)"
        );
    }
    // What runs now: the live settings from the new file, the rest as started.
    config.log = new.log;
    config.libraries = new.libraries;
    tracing::info!("configuration reloaded");
}
