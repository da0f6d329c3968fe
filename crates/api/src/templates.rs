//! Warren's template endpoints (`/warren/v1/templates`): create a template from an image
//! reference, an OCI layout or archive, a docker-archive, a rootfs directory or a checkpoint (ready
//! at once, `201`: its sandboxes are restores of the checkpoint); follow its build;
//! list, inspect and delete templates. A create answers `202` at once; the build's progress
//! (phase, item, bytes) is in the template's `build` until its status is `ready` or `failed`.

use crate::error::ApiError;
use crate::extract::{Auth, JsonBody};
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use std::path::PathBuf;
use warren_core::image_templates::TemplateSource;

type ApiResult<T> = Result<T, ApiError>;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/warren/v1/templates", get(list).post(create))
        .route("/warren/v1/templates/{name}", get(inspect).delete(delete))
}

/// Exactly one source field must be set.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateTemplate {
    pub name: String,
    pub image: Option<String>,
    pub oci_dir: Option<PathBuf>,
    pub oci_archive: Option<PathBuf>,
    pub docker_archive: Option<PathBuf>,
    pub rootfs: Option<PathBuf>,
    /// A checkpoint of the caller's team: the template's sandboxes are restores of it.
    pub checkpoint: Option<String>,
    /// Which image of a layout or archive (its ref name or tag) when it holds several.
    pub image_name: Option<String>,
    /// Registry credentials for `image`.
    pub username: Option<String>,
    pub password: Option<String>,
}

fn source(req: &CreateTemplate) -> ApiResult<TemplateSource> {
    let name = req.image_name.clone();
    let mut sources = vec![];
    if let Some(r) = &req.image {
        sources.push(TemplateSource::Image {
            reference: r.clone(),
        });
    }
    if let Some(p) = &req.oci_dir {
        sources.push(TemplateSource::OciDir {
            path: p.clone(),
            name: name.clone(),
        });
    }
    if let Some(p) = &req.oci_archive {
        sources.push(TemplateSource::OciArchive {
            path: p.clone(),
            name: name.clone(),
        });
    }
    if let Some(p) = &req.docker_archive {
        sources.push(TemplateSource::DockerArchive {
            path: p.clone(),
            name: name.clone(),
        });
    }
    if let Some(p) = &req.rootfs {
        sources.push(TemplateSource::Rootfs { path: p.clone() });
    }
    if let Some(c) = &req.checkpoint {
        sources.push(TemplateSource::Checkpoint {
            checkpoint: c.clone(),
        });
    }
    if sources.len() != 1 {
        return Err(ApiError::bad_request(
            "give exactly one of image, ociDir, ociArchive, dockerArchive, rootfs, checkpoint",
        ));
    }
    Ok(sources.remove(0))
}

async fn create(
    State(st): State<AppState>,
    Auth(who): Auth,
    JsonBody(req): JsonBody<CreateTemplate>,
) -> ApiResult<Response> {
    let source = source(&req)?;
    if let TemplateSource::Checkpoint { checkpoint } = &source {
        if req.username.is_some() || req.password.is_some() || req.image_name.is_some() {
            return Err(ApiError::bad_request(
                "username, password and imageName do not apply to checkpoint",
            ));
        }
        // Nothing to build: the template is ready at once.
        let view = st
            .warren
            .create_checkpoint_template(&who, &req.name, checkpoint)
            .await?;
        return Ok((StatusCode::CREATED, Json(view)).into_response());
    }
    let credentials = match (&req.username, &req.password) {
        (Some(u), Some(p)) => Some(warren_image::pull::Credentials {
            username: u.clone(),
            password: p.clone(),
        }),
        (None, None) => None,
        _ => {
            return Err(ApiError::bad_request(
                "give both username and password, or neither",
            ))
        }
    };
    if credentials.is_some() && !matches!(source, TemplateSource::Image { .. }) {
        return Err(ApiError::bad_request(
            "username and password only apply to image",
        ));
    }
    st.warren.create_template(&req.name, source, credentials)?;
    let view = st.warren.template(&req.name)?;
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

async fn list(State(st): State<AppState>, Auth(_who): Auth) -> ApiResult<Response> {
    Ok(Json(st.warren.list_templates()).into_response())
}

async fn inspect(
    State(st): State<AppState>,
    Auth(_who): Auth,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    Ok(Json(st.warren.template(&name)?).into_response())
}

async fn delete(
    State(st): State<AppState>,
    Auth(_who): Auth,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    st.warren.delete_template(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
