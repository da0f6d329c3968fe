//! Warren's template endpoints (`/warren/v1/templates`): create a template from an image
//! reference, an OCI layout or archive, a docker-archive or a rootfs directory; follow its build;
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
        .routes(routes!(inspect, delete))
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
    if sources.len() != 1 {
        return Err(ApiError::bad_request(
            "give exactly one of image, ociDir, ociArchive, dockerArchive, rootfs",
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
    _who: Auth,
    JsonBody(req): JsonBody<CreateTemplate>,
) -> ApiResult<Response> {
    let source = source(&req)?;
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
