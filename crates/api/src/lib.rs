//! Warren's edges: the E2B-compatible REST API and the sandbox router, served on one listener.
//!
//! Handlers only translate: they parse a request into a typed call on [`warren_core::Warren`] and
//! map its result (or [`warren_core::CoreError`]) back to the status codes and JSON shapes the
//! E2B SDK expects. Requests addressed to a sandbox (by headers or Host) bypass the API entirely
//! and go to [`proxy`].

pub mod audit;
pub mod checkpoints;
pub mod commits;
pub mod error;
pub mod extract;
pub mod hibernation;
pub mod models;
pub mod network;
pub mod pools;
pub mod proxy;
pub mod sandboxes;
pub mod templates;

use axum::routing::{get, post, put};
use axum::Router;
use std::sync::Arc;
use warren_core::{SandboxRecord, Warren};

pub use error::ApiError;

#[derive(Debug, Clone, Default)]
pub struct ApiOptions {
    /// Sandbox domain: enables Host routing (`<port>-<id>.<domain>`) and is reported to SDKs as
    /// the sandbox's `domain`.
    pub domain: Option<String>,
}

#[derive(Clone)]
pub struct AppState {
    pub warren: Arc<Warren>,
    pub proxy: proxy::SandboxProxy,
    pub domain: Option<String>,
}

impl AppState {
    pub(crate) fn sandbox_json(&self, rec: &SandboxRecord) -> models::SandboxJson {
        models::SandboxJson::new(
            rec,
            &self.warren.config().envd_version,
            self.domain.as_deref(),
        )
    }
}

/// The whole HTTP surface: API routes behind the sandbox router.
pub fn app(warren: Arc<Warren>, opts: ApiOptions) -> Router {
    let state = AppState {
        warren,
        proxy: proxy::SandboxProxy::default(),
        domain: opts.domain,
    };
    use sandboxes as h;
    let api = Router::new()
        .route("/health", get(h::health))
        .merge(pools::routes())
        .merge(templates::routes())
        .merge(commits::routes())
        .merge(checkpoints::routes())
        .route("/sandboxes", post(h::create).get(h::list_v1))
        .route("/v2/sandboxes", post(h::create).get(h::list_v2))
        .route("/sandboxes/{id}", get(h::get).delete(h::kill))
        .route("/sandboxes/{id}/timeout", post(h::set_timeout))
        .route("/sandboxes/{id}/pause", post(h::pause))
        .route("/sandboxes/{id}/resume", post(h::resume))
        .route("/sandboxes/{id}/connect", post(h::connect))
        .route("/v2/sandboxes/{id}/connect", post(h::connect))
        .route("/sandboxes/{id}/metrics", get(network::metrics))
        .route("/sandboxes/{id}/network", put(network::update_network))
        .route(
            "/warren/v1/sandboxes/{id}/hibernate",
            post(hibernation::hibernate),
        )
        .route("/warren/v1/audit", get(audit::query))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit::record_api,
        ))
        .fallback(h::not_found)
        .method_not_allowed_fallback(h::method_not_allowed)
        .with_state(state.clone());
    // The router wraps the API as a whole (not per route) so that sandbox traffic for any path,
    // including paths the API also has (`/health`), is routed before the API sees it.
    Router::new()
        .fallback_service(api)
        .layer(axum::middleware::from_fn_with_state(state, proxy::dispatch))
}

#[cfg(test)]
mod tests;
