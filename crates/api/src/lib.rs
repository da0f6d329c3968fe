//! Warren's edges: the E2B-compatible REST API and the sandbox router, served on one listener.
//!
//! Handlers only translate: they parse a request into a typed call on [`warren_core::Warren`] and
//! map its result (or [`warren_core::CoreError`]) back to the status codes and JSON shapes the
//! E2B SDK expects. Requests addressed to a sandbox (by headers or Host) bypass the API entirely
//! and go to [`proxy`].

pub mod audit;
pub mod builds;
pub mod checkpoints;
pub mod commits;
pub mod e2b_templates;
pub mod envd_exec;
pub mod error;
pub mod extract;
pub mod hibernation;
pub mod models;
pub mod network;
pub mod openapi;
pub mod pools;
pub mod proxy;
pub mod sandboxes;
pub mod templates;

use axum::Router;
use std::sync::Arc;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
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
    let (api, _) = documented_routes().split_for_parts();
    let api = api
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit::record_api,
        ))
        .fallback(sandboxes::not_found)
        .method_not_allowed_fallback(sandboxes::method_not_allowed)
        .with_state(state.clone());
    // The router wraps the API as a whole (not per route) so that sandbox traffic for any path,
    // including paths the API also has (`/health`), is routed before the API sees it.
    Router::new()
        .fallback_service(api)
        .layer(axum::middleware::from_fn_with_state(state, proxy::dispatch))
}

/// Every API route, each registered with its OpenAPI annotation (see [`openapi`]).
pub(crate) fn documented_routes() -> OpenApiRouter<AppState> {
    use sandboxes as h;
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(h::health))
        .routes(routes!(openapi::serve))
        .merge(pools::routes())
        .merge(templates::routes())
        .merge(builds::routes())
        .merge(e2b_templates::routes())
        .merge(commits::routes())
        .merge(checkpoints::routes())
        .routes(routes!(h::create_v1, h::list_v1))
        .routes(routes!(h::create_v2, h::list_v2))
        .routes(routes!(h::get, h::kill))
        .routes(routes!(h::set_timeout))
        .routes(routes!(h::pause))
        .routes(routes!(h::resume))
        .routes(routes!(h::connect_v1))
        .routes(routes!(h::connect_v2))
        .routes(routes!(network::metrics))
        .routes(routes!(network::update_network))
        .routes(routes!(hibernation::hibernate))
        .routes(routes!(audit::query))
}

#[cfg(test)]
mod tests;
