//! Warren's hibernation endpoint. E2B's `pause()` freezes; a frozen sandbox is hibernated by the
//! daemon once idle, or at once through `POST /warren/v1/sandboxes/{id}/hibernate`. `connect` (and
//! `resume`) wake either form.

use crate::error::ApiError;
use crate::extract::Auth;
use crate::models::SandboxDetailJson;
use crate::AppState;
use axum::extract::{Path, State};
use axum::Json;

/// Dumps the sandbox's memory to disk now (a running sandbox is paused first); answers its
/// detail, `state: paused` with `memoryLocation: disk`. 501 on a host where CRIU cannot work.
#[utoipa::path(post, path = "/warren/v1/sandboxes/{id}/hibernate", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox ID")),
    responses((status = 200, description = "Hibernated", body = SandboxDetailJson)))]
pub async fn hibernate(
    State(st): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<Json<SandboxDetailJson>, ApiError> {
    let rec = st.warren.hibernate(&who, &id).await?;
    Ok(Json(SandboxDetailJson::new(
        &rec,
        &st.warren.config().envd_version,
        st.domain.as_deref(),
    )))
}
