//! Stable application error codes carried in JSON-RPC error objects, and helpers to build them.
//!
//! Codes in the JSON-RPC reserved range (-32768..=-32000) keep their standard meaning
//! (`-32602` invalid params, `-32601` method not found); ours are positive and never reused.

use jsonrpsee::types::ErrorObjectOwned;

/// Application error codes. Clients may match on these; messages are for people.
pub mod codes {
    /// Something failed inside the daemon; the message says what.
    pub const INTERNAL: i32 = 1000;
    /// No library has that id or path.
    pub const LIBRARY_NOT_FOUND: i32 = 1001;
    /// The path given for a library is missing or not a directory.
    pub const PATH_NOT_DIRECTORY: i32 = 1002;
    /// A library with that path (or one containing / contained by it) is already registered.
    pub const LIBRARY_EXISTS: i32 = 1003;
    /// No scan has that request id.
    pub const SCAN_NOT_FOUND: i32 = 1004;
    /// No track has that id.
    pub const TRACK_NOT_FOUND: i32 = 1005;
    /// Embeddings are disabled or the model is not loaded.
    pub const EMBEDDING_UNAVAILABLE: i32 = 1006;
    /// The scan queue is full; try again later.
    pub const QUEUE_FULL: i32 = 1007;
    /// The database cannot be reached right now.
    pub const DATABASE_UNAVAILABLE: i32 = 1008;
    /// A parameter has a valid type but an unusable value (e.g. an empty search query).
    pub const INVALID_ARGUMENT: i32 = 1009;
    /// The scan has already finished, so it cannot be cancelled.
    pub const SCAN_FINISHED: i32 = 1010;
    /// The subdirectory of a path-targeted scan lies outside the library.
    pub const PATH_OUTSIDE_LIBRARY: i32 = 1011;
}

/// Build an error object with an application code and a message.
pub fn error(code: i32, message: impl Into<String>) -> ErrorObjectOwned {
    ErrorObjectOwned::owned(code, message.into(), None::<()>)
}
