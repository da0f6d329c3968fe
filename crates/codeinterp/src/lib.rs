//! Warren's code-interpreter server: the HTTP API of E2B's code-interpreter template (port 49999,
//! `POST /execute` streaming NDJSON, `/contexts`), backed by real Jupyter kernels that it starts
//! and talks to over ZeroMQ with the Jupyter messaging protocol.

pub mod contexts;
pub mod execute;
pub mod http;
pub mod kernel;
pub mod output;
pub mod wire;
