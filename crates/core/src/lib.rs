//! Warren's control plane: it decides everything about sandboxes (what exists, in which state, until
//! when, for whom) and drives the runtime. It holds no HTTP code: the API crate translates requests
//! into calls on [`Warren`] and its results back into responses.

pub mod audit;
pub mod auth;
pub mod autoscaler;
pub mod build_context;
pub mod checkpoint;
pub mod commit;
pub mod dockerfile;
pub mod e2b_features;
pub mod e2b_tags;
pub mod e2b_template;
pub mod envd_client;
pub mod error;
pub mod image_templates;
pub mod objects;
pub mod orchestrator;
pub mod pool;
pub mod pool_store;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod templates;

pub use audit::{AuditEvent, AuditKind, AuditLog, AuditQuery};
pub use auth::{ApiKey, ApiKeys, Principal};
pub use error::CoreError;
pub use orchestrator::metrics::MetricPoint;
pub use orchestrator::network::{traffic_access_token, NetworkRequest, NetworkUpdate};
pub use orchestrator::{
    Clock, ConnectOutcome, CreateRequest, ListOrder, ListPage, ListQuery, ManualClock,
    RecoveryReport, SystemClock, Warren, WarrenConfig,
};
pub use state::{PublicState, SandboxState};
pub use store::{SandboxRecord, Store};
pub use templates::TemplateRegistry;
