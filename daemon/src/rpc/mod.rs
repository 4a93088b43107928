//! The JSON-RPC API on a Unix socket: `server` owns the socket and connections, `auth` decides
//! who may connect, `api` implements the methods defined once in `coral-proto`, `params` holds
//! the checks of their parameters that need no database.

pub mod api;
pub mod auth;
pub mod params;
pub mod server;
