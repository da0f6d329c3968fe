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
use axum::Json;
use serde::Deserialize;
use std::path::PathBuf;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use warren_core::image_templates::TemplateSource;

type ApiResult<T> = Result<T, ApiError>;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(inspect, apply, delete))
}

/// Exactly one source field must be set.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateTemplate {
    pub name: String,
    pub image: Option<String>,
    /// A path on the daemon's host.
    #[schema(value_type = Option<String>)]
    pub oci_dir: Option<PathBuf>,
    /// A path on the daemon's host.
    #[schema(value_type = Option<String>)]
    pub oci_archive: Option<PathBuf>,
    /// A path on the daemon's host.
    #[schema(value_type = Option<String>)]
    pub docker_archive: Option<PathBuf>,
    /// A path on the daemon's host.
    #[schema(value_type = Option<String>)]
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

/// Starts building a template; poll `GET /warren/v1/templates/{name}` for its progress.
#[utoipa::path(post, path = "/warren/v1/templates", operation_id = "create_template", tag = "templates",
    request_body = CreateTemplate,
    responses((status = 202, description = "Build started", body = Object)))]
async fn create(
    State(st): State<AppState>,
    Auth(who): Auth,
    JsonBody(req): JsonBody<CreateTemplate>,
) -> ApiResult<Response> {
    create_from(&st, &who, req).await
}

/// `kind: Template` for `warren apply -f`: the source fields of a create under `spec`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TemplateObject {
    #[serde(default)]
    pub api_version: Option<String>,
    pub kind: String,
    pub metadata: TemplateMeta,
    pub spec: TemplateSpec,
    /// What a `GET` returned, sent back: ignored.
    #[serde(default)]
    pub status: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateMeta {
    pub name: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TemplateSpec {
    pub image: Option<String>,
    pub oci_dir: Option<PathBuf>,
    pub oci_archive: Option<PathBuf>,
    pub docker_archive: Option<PathBuf>,
    pub rootfs: Option<PathBuf>,
    pub checkpoint: Option<String>,
    pub image_name: Option<String>,
}

#[utoipa::path(put, path = "/warren/v1/templates/{name}", operation_id = "apply_template", tag = "templates", params(("name" = String, Path)),
    request_body = Object,
    responses((status = 200, description = "Exists with this source", body = Object),
        (status = 201, description = "Created from a checkpoint", body = Object),
        (status = 202, description = "Build started", body = Object)))]
/// `PUT /warren/v1/templates/{name}`: creates the template as a `POST` would; applying it again
/// with the same source is a no-op (`200`), with another one a conflict (templates are not
/// replaced in place: sandboxes and pools stack their layers).
async fn apply(
    State(st): State<AppState>,
    Auth(who): Auth,
    Path(name): Path<String>,
    JsonBody(obj): JsonBody<TemplateObject>,
) -> ApiResult<Response> {
    if obj.kind != "Template" {
        return Err(ApiError::bad_request(format!(
            "kind is {:?}, expected \"Template\"",
            obj.kind
        )));
    }
    if let Some(v) = &obj.api_version {
        if !warren_core::objects::accepted_api_version(v) {
            return Err(ApiError::bad_request(format!(
                "apiVersion {v:?} is not supported (use {})",
                warren_core::objects::API_VERSION
            )));
        }
    }
    if obj.metadata.name != name {
        return Err(ApiError::bad_request(format!(
            "metadata.name {:?} does not match the path's {name:?}",
            obj.metadata.name
        )));
    }
    let s = obj.spec;
    let req = CreateTemplate {
        name: name.clone(),
        image: s.image,
        oci_dir: s.oci_dir,
        oci_archive: s.oci_archive,
        docker_archive: s.docker_archive,
        rootfs: s.rootfs,
        checkpoint: s.checkpoint,
        image_name: s.image_name,
        username: None,
        password: None,
    };
    let wanted = source(&req)?;
    if let Ok(view) = st.warren.template(&name) {
        let have = view
            .template
            .as_ref()
            .map(|t| &t.source)
            .or(view.build.as_ref().map(|b| &b.source));
        return match have {
            Some(h) if *h == wanted && view.status != "failed" => {
                Ok((StatusCode::OK, Json(view)).into_response())
            }
            Some(h) => Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "template {name} exists with source {}; delete it first to change it",
                    h.describe()
                ),
            )),
            None => Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("template {name} is built into the daemon and cannot be replaced"),
            )),
        };
    }
    create_from(&st, &who, req).await
}

async fn create_from(
    st: &AppState,
    who: &warren_core::auth::Principal,
    req: CreateTemplate,
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
            .create_checkpoint_template(who, &req.name, checkpoint)
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

#[utoipa::path(get, path = "/warren/v1/templates", operation_id = "list_templates", tag = "templates",
    responses((status = 200, description = "Every template", body = Vec<Object>)))]
async fn list(State(st): State<AppState>, _who: Auth) -> ApiResult<Response> {
    Ok(Json(st.warren.list_templates()).into_response())
}

#[utoipa::path(get, path = "/warren/v1/templates/{name}", operation_id = "get_template", tag = "templates", params(("name" = String, Path)),
    responses((status = 200, description = "The template and its build", body = Object)))]
async fn inspect(
    State(st): State<AppState>,
    _who: Auth,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    Ok(Json(st.warren.template(&name)?).into_response())
}

#[utoipa::path(delete, path = "/warren/v1/templates/{name}", operation_id = "delete_template", tag = "templates", params(("name" = String, Path)),
    responses((status = 204, description = "Deleted")))]
async fn delete(
    State(st): State<AppState>,
    _who: Auth,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    st.warren.delete_template(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
