//! The JSON-RPC API on a Unix socket: `server` owns the socket and connections, `auth` decides
//! who may connect, `api` serves the methods defined once in `coral-proto` over an
//! `ApiService` (checks the parameters, calls the service), `params` holds the checks of their
//! parameters that need no database, `service` is the daemon's `ApiService`.

pub mod api;
pub mod auth;
pub mod params;
pub mod server;
pub mod service;
