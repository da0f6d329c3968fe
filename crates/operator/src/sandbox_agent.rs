//! The Sandbox reconciler's calls to the node agent: once the Pod runs on a node, create the
//! sandbox in it; then make the sandbox follow `spec.paused` — frozen when paused, or hibernated
//! (memory dumped to the node's disk and freed) when `persistentContents` includes `memory`; and
//! on delete, stop it before the Pod goes. The egress policy goes with the create and is
//! replaced live when the spec's changes ([`crate::sandbox_network`]).
//!
//! The agent's outcome is written as conditions `Started` and `Paused` with server-side apply
//! under field manager [`AGENT_FIELD_MANAGER`], as the design has the agent own them; the
//! operator's `Ready` and phase are derived from them at the next reconcile (the status change
//! wakes it).

use crate::agent::{node_id, AgentError, CreateRequest, NodeAgent, PodRef};
use crate::conditions::{self, condition};
use crate::crd::{Condition, PersistentContent, Sandbox, API_VERSION};
use crate::{Error, FIELD_MANAGER};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;

/// Field manager of the conditions the node agent's outcome sets.
pub const AGENT_FIELD_MANAGER: &str = "warren-node-agent";
const _: () = assert!(!FIELD_MANAGER.is_empty());

/// What the sandbox on the node needs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Create,
    Pause {
        hibernate: bool,
    },
    Resume {
        wake: bool,
    },
    /// Replace the egress policy (after any pause or resume).
    UpdateNetwork,
    Nothing,
}

/// Decides from the spec and the agent's conditions.
pub fn next_step(sbx: &Sandbox) -> Step {
    let conds = sbx
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    match conditions::find(&conds, "Started") {
        None => return Step::Create,
        // A failed pull is retried (with the reconciler's backoff: `drive` answers an error).
        Some(c) if c.status != "True" && c.reason == crate::sandbox::IMAGE_PULL_FAILED => {
            return Step::Create
        }
        // Any other failed start is final for this generation: the status explains it.
        Some(c) if c.status != "True" => return Step::Nothing,
        _ => {}
    }
    let paused = conditions::find(&conds, "Paused");
    let is_paused = paused.is_some_and(|c| c.status == "True");
    if sbx.spec.paused && !is_paused {
        Step::Pause {
            hibernate: sbx
                .spec
                .persistent_contents
                .contains(&PersistentContent::Memory),
        }
    } else if !sbx.spec.paused && is_paused {
        Step::Resume {
            wake: paused.is_some_and(|c| c.reason == "Hibernated"),
        }
    } else if crate::sandbox_network::needs_update(sbx) {
        Step::UpdateNetwork
    } else {
        Step::Nothing
    }
}

/// Kubernetes quantity to whole vCPUs (rounded up) or MiB; `None` when it cannot be read.
pub fn vcpus(q: &str) -> Option<u32> {
    let q = q.trim();
    let milli = match q.strip_suffix('m') {
        Some(m) => m.parse::<f64>().ok()?,
        None => q.parse::<f64>().ok()? * 1000.0,
    };
    Some(((milli / 1000.0).ceil() as u32).max(1))
}

pub fn mebibytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let units: [(&str, f64); 8] = [
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024f64.powi(4)),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ];
    let (num, mult) = units
        .iter()
        .find_map(|(u, m)| q.strip_suffix(u).map(|n| (n, *m)))
        .unwrap_or((q, 1.0));
    let bytes = num.trim().parse::<f64>().ok()? * mult;
    Some(((bytes / (1024.0 * 1024.0)).ceil() as u64).max(1))
}

/// The agent's create request for `sbx` in `pod`.
pub fn create_request(sbx: &Sandbox, pod: &Pod, envd_key: Option<&str>) -> CreateRequest {
    let uid = sbx.meta().uid.as_deref().unwrap_or_default();
    let res = &sbx.spec.resources;
    let pick = |k: &str| res.limits.get(k).or_else(|| res.requests.get(k)).cloned();
    CreateRequest {
        id: node_id(sbx.meta().uid.as_deref().unwrap_or_default()),
        template: sbx.spec.template.clone(),
        image: sbx.spec.image.clone(),
        vcpus: pick("cpu").and_then(|q| vcpus(&q)).unwrap_or(0),
        memory_mb: pick("memory").and_then(|q| mebibytes(&q)).unwrap_or(0),
        disk_mb: crate::disk::pod_disk_mb(pod)
            .or_else(|| crate::disk::disk_mb(res))
            .unwrap_or(0),
        env_vars: sbx.spec.env_vars.clone(),
        pod: PodRef {
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            uid: pod.meta().uid.clone().unwrap_or_default(),
            ip: pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
        },
        netns: None,
        cgroup_parent: None,
        access_token: envd_key.map(|k| crate::agent::envd_access_token(k, uid)),
        admin_token: envd_key.map(|k| crate::agent::envd_admin_token(k, uid)),
        network: crate::sandbox_network::egress_of(&sbx.spec),
        // A fork: its Pod carries the checkpoint id the reconciler resolved (see `fork`).
        restore_from: crate::fork::restore_from(pod),
        // Read from the Sandbox's imagePullSecrets by `drive`, only when it creates.
        registry_credentials: None,
        image_pull_policy: sbx.spec.image_pull_policy,
    }
}

/// Writes the agent-owned conditions (always the whole set, so server-side apply keeps them).
pub async fn patch_agent_conditions(
    api: &Api<Sandbox>,
    name: &str,
    conds: &[Condition],
) -> Result<(), Error> {
    let body = json!({"apiVersion": API_VERSION, "kind": "Sandbox",
                      "status": {"conditions": conds}});
    api.patch_status(
        name,
        &PatchParams::apply(AGENT_FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .map_err(Error::kube(
        "patch node agent conditions of",
        "Sandbox",
        name,
    ))?;
    Ok(())
}

/// The agent's create, with the pull credentials of the Sandbox's `imagePullSecrets` (read
/// from `secrets`, its namespace's). A Secret that cannot be used fails like a pull, without
/// calling the agent.
async fn create(
    sbx: &Sandbox,
    pod: &Pod,
    node: &str,
    agent: &dyn NodeAgent,
    secrets: &Api<Secret>,
    envd_key: Option<&str>,
) -> Result<crate::agent::SandboxInfo, AgentError> {
    let mut req = create_request(sbx, pod, envd_key);
    if let Some(image) = sbx.spec.image.as_deref() {
        let names: Vec<String> = sbx
            .spec
            .image_pull_secrets
            .iter()
            .map(|s| s.name.clone())
            .collect();
        req.registry_credentials = crate::registry_auth::pull_credentials(secrets, &names, image)
            .await
            .map_err(|message| AgentError::Failed {
                node: node.to_string(),
                code: crate::agent::IMAGE_PULL_FAILED,
                message: format!("pulling image {image}: {message}"),
            })?;
    }
    agent.create(node, &req).await
}

/// Runs the next step on `node` and records its outcome. `Ok(true)` when something changed.
pub async fn drive(
    sbx: &Sandbox,
    pod: &Pod,
    node: &str,
    agent: &dyn NodeAgent,
    api: &Api<Sandbox>,
    secrets: &Api<Secret>,
    envd_key: Option<&str>,
) -> Result<bool, Error> {
    let step = next_step(sbx);
    if step == Step::Nothing {
        return Ok(false);
    }
    let name = sbx.name_any();
    let id = node_id(sbx.meta().uid.as_deref().unwrap_or_default());
    let old = sbx
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let gen = sbx.meta().generation;
    let now = conditions::now();
    let cond = |t: &str, ok: bool, reason: &str, msg: String| {
        condition(&old, t, ok, reason, msg, gen, &now)
    };
    let unreachable = |e: &AgentError| matches!(e, AgentError::Unreachable { .. });
    let mut started = conditions::find(&old, "Started").cloned();
    let mut paused = conditions::find(&old, "Paused").cloned();
    let mut network = conditions::find(&old, crate::sandbox_network::CONDITION).cloned();
    match step {
        Step::Create => match create(sbx, pod, node, agent, secrets, envd_key).await {
            Ok(info) => {
                started = Some(cond(
                    "Started",
                    true,
                    "Started",
                    format!(
                        "sandbox {id} runs on {node} (init pid {})",
                        info.init_pid.unwrap_or(0)
                    ),
                ));
                paused = Some(cond("Paused", false, "Running", String::new()));
                network = Some(crate::sandbox_network::applied(
                    &old,
                    &crate::sandbox_network::egress_of(&sbx.spec),
                    gen,
                    &now,
                ));
            }
            // The agent may come up later (a new node): retry with backoff, nothing is final.
            Err(e) if unreachable(&e) => {
                return Err(Error::Reconcile {
                    kind: "Sandbox",
                    name,
                    message: e.to_string(),
                })
            }
            Err(e) if e.is_image_pull_failure() => {
                let c = cond(
                    "Started",
                    false,
                    crate::sandbox::IMAGE_PULL_FAILED,
                    e.to_string(),
                );
                let message = format!("{e} (retried with backoff)");
                return record_and_retry(api, name, [Some(c), paused, network], message).await;
            }
            Err(e) => started = Some(cond("Started", false, "StartFailed", e.to_string())),
        },
        Step::Pause { hibernate } => {
            let res = if hibernate {
                agent.hibernate(node, &id).await.map(|i| {
                    cond(
                        "Paused",
                        true,
                        "Hibernated",
                        format!(
                            "memory saved to {node}'s disk ({} bytes in {} ms) and freed",
                            i.size_bytes, i.duration_ms
                        ),
                    )
                })
            } else {
                agent.pause(node, &id).await.map(|()| {
                    cond(
                        "Paused",
                        true,
                        "Frozen",
                        "the sandbox's processes are frozen".into(),
                    )
                })
            };
            match res {
                Ok(c) => paused = Some(c),
                Err(e) => {
                    let c = cond("Paused", false, "PauseFailed", e.to_string());
                    let conds = [started.clone(), Some(c), network.clone()];
                    return record_and_retry(api, name, conds, e.to_string()).await;
                }
            }
        }
        Step::Resume { wake } => {
            let res = if wake {
                agent.wake(node, &id).await
            } else {
                agent.resume(node, &id).await
            };
            if let Err(e) = res {
                return Err(Error::Reconcile {
                    kind: "Sandbox",
                    name,
                    message: e.to_string(),
                });
            }
            paused = Some(cond("Paused", false, "Running", String::new()));
        }
        Step::UpdateNetwork => {
            let res = crate::sandbox_network::update(sbx, pod, node, agent, &old, &now).await;
            match res {
                Ok(c) => network = Some(c),
                Err(e) => {
                    return Err(Error::Reconcile {
                        kind: "Sandbox",
                        name,
                        message: e.to_string(),
                    })
                }
            }
        }
        Step::Nothing => unreachable!("returned above"),
    }
    let conds: Vec<Condition> = [started, paused, network].into_iter().flatten().collect();
    patch_agent_conditions(api, &name, &conds).await?;
    Ok(true)
}

/// Writes the agent conditions `conds` and answers an error, so that the reconciler tries the
/// step again after its backoff.
async fn record_and_retry(
    api: &Api<Sandbox>,
    name: String,
    conds: [Option<Condition>; 3],
    message: String,
) -> Result<bool, Error> {
    let conds: Vec<Condition> = conds.into_iter().flatten().collect();
    patch_agent_conditions(api, &name, &conds).await?;
    Err(Error::Reconcile {
        kind: "Sandbox",
        name,
        message,
    })
}

/// On delete: stops the sandbox on its node before its Pod goes. A node that is gone has
/// nothing left to stop.
pub async fn stop(sbx: &Sandbox, node: &str, agent: &dyn NodeAgent) -> Result<(), Error> {
    let id = node_id(sbx.meta().uid.as_deref().unwrap_or_default());
    match agent.delete(node, &id).await {
        Ok(()) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(Error::Reconcile {
            kind: "Sandbox",
            name: sbx.name_any(),
            message: format!("cannot stop the sandbox on its node: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envd_tokens_are_derived_per_sandbox_and_key() {
        let mut sbx = Sandbox::new("s", Default::default());
        sbx.metadata.uid = Some("1111-2222".into());
        let pod = Pod::default();
        assert_eq!(create_request(&sbx, &pod, None).access_token, None);
        let t = create_request(&sbx, &pod, Some("k1")).access_token.unwrap();
        assert_eq!(t.len(), 64);
        assert_eq!(t, crate::agent::envd_access_token("k1", "1111-2222"));
        assert_ne!(t, crate::agent::envd_access_token("k2", "1111-2222"));
        assert_ne!(t, crate::agent::envd_access_token("k1", "1111-2223"));
        let admin = create_request(&sbx, &pod, Some("k1")).admin_token.unwrap();
        assert_ne!(admin, t, "the client's token never opens /init");
        // Length-prefixed: moving a boundary between key and uid changes the token.
        assert_ne!(
            crate::agent::envd_access_token("ab", "c"),
            crate::agent::envd_access_token("a", "bc")
        );
    }

    #[test]
    fn quantities() {
        assert_eq!(vcpus("500m"), Some(1));
        assert_eq!(vcpus("2"), Some(2));
        assert_eq!(vcpus("2500m"), Some(3));
        assert_eq!(vcpus("lots"), None);
        assert_eq!(mebibytes("512Mi"), Some(512));
        assert_eq!(mebibytes("1Gi"), Some(1024));
        assert_eq!(mebibytes("1G"), Some(954));
        assert_eq!(mebibytes("1048576"), Some(1));
        assert_eq!(mebibytes("x"), None);
    }

    #[test]
    fn steps_follow_spec_and_conditions() {
        let mut s = Sandbox::new("s", Default::default());
        assert_eq!(next_step(&s), Step::Create);
        let c = |t: &str, ok: bool, r: &str| condition(&[], t, ok, r, "", None, "t");
        s.status = Some(crate::crd::SandboxStatus {
            conditions: vec![c("Started", true, "Started"), c("Paused", false, "Running")],
            ..Default::default()
        });
        assert_eq!(next_step(&s), Step::Nothing);
        s.spec.paused = true;
        assert_eq!(next_step(&s), Step::Pause { hibernate: false });
        s.spec.persistent_contents = vec![PersistentContent::Memory];
        assert_eq!(next_step(&s), Step::Pause { hibernate: true });
        s.status.as_mut().unwrap().conditions[1] = c("Paused", true, "Hibernated");
        assert_eq!(next_step(&s), Step::Nothing);
        s.spec.paused = false;
        assert_eq!(next_step(&s), Step::Resume { wake: true });
        s.status.as_mut().unwrap().conditions[1] = c("Paused", true, "Frozen");
        assert_eq!(next_step(&s), Step::Resume { wake: false });
        s.status.as_mut().unwrap().conditions[0] = c("Started", false, "StartFailed");
        assert_eq!(next_step(&s), Step::Nothing, "a failed start is final");
        s.status.as_mut().unwrap().conditions[0] = c("Started", false, "ImagePullFailed");
        assert_eq!(next_step(&s), Step::Create, "a failed pull is retried");
    }
}
