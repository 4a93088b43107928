//! The JSON-RPC API on a Unix socket: `server` owns the socket and connections, `auth` decides
//! who may connect, `api` implements the methods defined once in `coral-proto`.

pub mod api;
pub mod auth;
pub mod server;
