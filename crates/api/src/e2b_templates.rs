//! E2B's template build API, as the e2b SDKs' `Template.build` calls it (the decisions are in
//! `warren_core::orchestrator::e2b_builds`):
//!
//! * `POST /v3/templates` `{"name", "tags"?, "cpuCount"?, "memoryMB"?}` → 202 `{"templateID",
//!   "buildID", ...}`; the template id is the name;
//! * `GET /templates/{id}/files/{hash}` → 201 `{"present", "url"}`: whether the files of a COPY
//!   are already here, and a one-use URL to `PUT` them to (a tar, gzipped or not);
//! * `PUT /warren/v1/e2b-uploads/{token}`: that URL (the token authorizes it, as a presigned URL
//!   would; the SDK sends no API key there);
//! * `POST /v2/templates/{id}/builds/{build}` with the definition → 202, the build runs;
//! * `GET /templates/{id}/builds/{build}/status?logsOffset=` → 200 the state and log entries;
//! * `GET /templates/aliases/{alias}` → 200 if a template of that name exists, else 404;
//! * tags (`Template.assign_tags`, `remove_tags`, `get_tags`): `POST /templates/tags`
//!   `{"target", "tags"}` → 201, `DELETE /templates/tags` `{"name", "tags"}` → 204,
//!   `GET /templates/{id}/tags` → 200 (see `warren_core::e2b_tags`).

use crate::error::ApiError;
use crate::extract::{Auth, JsonBody, QueryParams};
use crate::AppState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use warren_core::e2b_template::E2bTemplateSpec;

type ApiResult<T> = Result<T, ApiError>;

/// Largest upload of one COPY's files.
const MAX_UPLOAD: u64 = 2 << 30;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(request_build))
        .routes(routes!(file_upload_link))
        .routes(routes!(upload))
        .routes(routes!(start_build))
        .routes(routes!(build_status))
        .routes(routes!(alias))
        .routes(routes!(assign_tags, remove_tags))
        .routes(routes!(template_tags))
}

/// `TemplateBuildRequestV3`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuildRequest {
    name: Option<String>,
    /// The older SDKs' name.
    alias: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[schema(minimum = 1)]
    cpu_count: Option<u32>,
    #[serde(rename = "memoryMB")]
    #[schema(minimum = 1)]
    memory_mb: Option<u64>,
    min_free_disk_mb: Option<u64>,
    team_id: Option<String>,
}

/// `TemplateRequestResponseV3`.
#[derive(Debug, Serialize, ToSchema)]
pub struct BuildRequested {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "buildID")]
    build_id: String,
    public: bool,
    names: Vec<String>,
    tags: Vec<String>,
    aliases: Vec<String>,
}

/// E2B's `Template.build`: registers a build of the named template.
#[utoipa::path(post, path = "/v3/templates", operation_id = "e2b_request_template_build", tag = "templates",
    request_body = BuildRequest,
    responses((status = 202, description = "Build registered", body = BuildRequested)))]
async fn request_build(
    State(st): State<AppState>,
    Auth(who): Auth,
    JsonBody(req): JsonBody<BuildRequest>,
) -> ApiResult<(StatusCode, Json<BuildRequested>)> {
    let _ = (
        req.cpu_count,
        req.memory_mb,
        req.min_free_disk_mb,
        req.team_id,
    );
    let name = req
        .name
        .or(req.alias)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request("name is required"))?;
    let requested =
        st.warren
            .e2b_request_build(&who, &name, &req.tags, req.cpu_count, req.memory_mb)?;
    let name = requested.template_id;
    Ok((
        StatusCode::ACCEPTED,
        Json(BuildRequested {
            template_id: name.clone(),
            build_id: requested.build_id,
            public: false,
            names: vec![name.clone()],
            tags: requested.tags,
            aliases: vec![name],
        }),
    ))
}

/// `TemplateBuildFileUpload`.
#[derive(Debug, Serialize, ToSchema)]
pub struct FileUpload {
    present: bool,
    url: String,
}

/// Whether the files of a COPY (by content hash) are here, and where to upload them.
#[utoipa::path(get, path = "/templates/{templateID}/files/{hash}", operation_id = "e2b_template_file_upload", tag = "templates",
    params(("templateID" = String, Path), ("hash" = String, Path, description = "The files' sha256, 64 hex digits")),
    responses((status = 201, description = "Upload link", body = FileUpload)))]
async fn file_upload_link(
    State(st): State<AppState>,
    Auth(who): Auth,
    Path((template_id, hash)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<(StatusCode, Json<FileUpload>)> {
    let (present, token) = st.warren.e2b_file_upload(&who, &template_id, &hash)?;
    // The client reached the API at this host: the upload goes back to it.
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && !h.contains(['/', ' ', '@']))
        .ok_or_else(|| ApiError::bad_request("a Host header is required"))?;
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .filter(|p| *p == "https")
        .unwrap_or("http");
    Ok((
        StatusCode::CREATED,
        Json(FileUpload {
            present,
            url: format!("{scheme}://{host}/warren/v1/e2b-uploads/{token}"),
        }),
    ))
}

/// The upload URL of [`file_upload_link`]: the files of one COPY as a tar (gzipped or not).
#[utoipa::path(put, path = "/warren/v1/e2b-uploads/{token}", operation_id = "e2b_template_upload", tag = "templates",
    params(("token" = String, Path, description = "From the upload link; used once")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, description = "Stored")))]
async fn upload(
    State(st): State<AppState>,
    Path(token): Path<String>,
    body: Body,
) -> ApiResult<StatusCode> {
    let (tmp, dest) = st.warren.e2b_take_upload(&token)?;
    if let Err(e) = crate::builds::receive_file(body, &tmp, MAX_UPLOAD, "an upload").await {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    tokio::fs::rename(&tmp, &dest).await.map_err(|e| {
        ApiError::from(warren_core::CoreError::Internal(format!(
            "storing the upload at {}: {e}",
            dest.display()
        )))
    })?;
    Ok(StatusCode::OK)
}

/// Starts the build with the template's definition (`TemplateBuildStartV2`).
#[utoipa::path(post, path = "/v2/templates/{templateID}/builds/{buildID}", operation_id = "e2b_start_template_build", tag = "templates",
    params(("templateID" = String, Path), ("buildID" = String, Path)),
    request_body(content = Object, description = "`{\"fromTemplate\"|\"fromImage\", \"steps\": [{\"type\", \"args\", \"filesHash\"?}], \"startCmd\"?, \"readyCmd\"?, \"force\"}`"),
    responses((status = 202, description = "Build started")))]
async fn start_build(
    State(st): State<AppState>,
    Auth(who): Auth,
    Path((template_id, build_id)): Path<(String, String)>,
    JsonBody(spec): JsonBody<E2bTemplateSpec>,
) -> ApiResult<StatusCode> {
    st.warren
        .e2b_start_build(&who, &template_id, &build_id, spec)
        .await?;
    Ok(StatusCode::ACCEPTED)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatusQuery {
    logs_offset: Option<usize>,
    #[allow(dead_code)]
    limit: Option<u32>,
    #[allow(dead_code)]
    level: Option<String>,
}

/// A build's state and its log entries from `logsOffset` on (at most 100 per answer).
#[utoipa::path(get, path = "/templates/{templateID}/builds/{buildID}/status", operation_id = "e2b_template_build_status", tag = "templates",
    params(("templateID" = String, Path), ("buildID" = String, Path), ("logsOffset" = Option<usize>, Query)),
    responses((status = 200, description = "`TemplateBuildInfo`", body = Object)))]
async fn build_status(
    State(st): State<AppState>,
    Auth(who): Auth,
    Path((template_id, build_id)): Path<(String, String)>,
    QueryParams(q): QueryParams<StatusQuery>,
) -> ApiResult<Response> {
    let status =
        st.warren
            .e2b_build_status(&who, &template_id, &build_id, q.logs_offset.unwrap_or(0))?;
    Ok(Json(status).into_response())
}

/// `TemplateAliasResponse`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AliasInfo {
    #[serde(rename = "templateID")]
    template_id: String,
    public: bool,
}

/// Whether a template of that name exists (the SDK's `Template.exists`).
#[utoipa::path(get, path = "/templates/aliases/{alias}", operation_id = "e2b_template_alias", tag = "templates",
    params(("alias" = String, Path)),
    responses((status = 200, description = "It exists", body = AliasInfo)))]
async fn alias(
    State(st): State<AppState>,
    Auth(_who): Auth,
    Path(alias): Path<String>,
) -> ApiResult<Json<AliasInfo>> {
    st.warren
        .template(warren_core::e2b_tags::canonical(&alias))?;
    Ok(Json(AliasInfo {
        template_id: alias,
        public: false,
    }))
}

/// `AssignTemplateTagsRequest`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct AssignTags {
    /// The build to tag: `name:tag`, or `name` for its default tag.
    target: String,
    tags: Vec<String>,
}

/// `AssignedTemplateTags`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AssignedTags {
    tags: Vec<String>,
    #[serde(rename = "buildID")]
    build_id: String,
}

/// Gives a template's build more tags (`Template.assign_tags`), moving them from other builds.
#[utoipa::path(post, path = "/templates/tags", operation_id = "e2b_assign_template_tags", tag = "templates",
    request_body = AssignTags,
    responses((status = 201, description = "Assigned", body = AssignedTags)))]
async fn assign_tags(
    State(st): State<AppState>,
    Auth(_who): Auth,
    JsonBody(req): JsonBody<AssignTags>,
) -> ApiResult<(StatusCode, Json<AssignedTags>)> {
    let build_id = st.warren.e2b_assign_tags(&req.target, &req.tags).await?;
    Ok((
        StatusCode::CREATED,
        Json(AssignedTags {
            tags: req.tags,
            build_id,
        }),
    ))
}

/// `DeleteTemplateTagsRequest`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RemoveTags {
    name: String,
    tags: Vec<String>,
}

/// Removes tags of a template (`Template.remove_tags`).
#[utoipa::path(delete, path = "/templates/tags", operation_id = "e2b_remove_template_tags", tag = "templates",
    request_body = RemoveTags,
    responses((status = 204, description = "Removed")))]
async fn remove_tags(
    State(st): State<AppState>,
    Auth(_who): Auth,
    JsonBody(req): JsonBody<RemoveTags>,
) -> ApiResult<StatusCode> {
    st.warren.e2b_remove_tags(&req.name, &req.tags).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The tags of a template (`Template.get_tags`).
#[utoipa::path(get, path = "/templates/{templateID}/tags", operation_id = "e2b_template_tags", tag = "templates",
    params(("templateID" = String, Path)),
    responses((status = 200, description = "`TemplateTag` list: tag, buildID, createdAt", body = Object)))]
async fn template_tags(
    State(st): State<AppState>,
    Auth(_who): Auth,
    Path(template_id): Path<String>,
) -> ApiResult<Response> {
    Ok(Json(st.warren.e2b_template_tags(&template_id)?).into_response())
}
