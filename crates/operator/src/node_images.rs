//! What root a Sandbox can have on a node, checked by the operator before any Pod is made.
//!
//! A node has one built-in template, `base` (the node's `/usr` under a minimal root, as in
//! single-host mode); everything else is an OCI image (`spec.image`), which the node agent pulls
//! into the node's store ([`crate::agent::images`]). Single-host templates made with `warren
//! template create` live in one daemon's store and do not exist on nodes, so a Sandbox naming
//! one is refused with `InvalidSpec` instead of failing on whichever node it lands. On a
//! cluster, an E2B `templateID` names a SandboxSet, whose member spec says `template: base` or
//! `image: <ref>`; the cluster API's cold starts take that spec ([`cold_start_spec`]).

use crate::crd::{SandboxSet, SandboxSpec};

/// The one template every node has.
pub const BASE_TEMPLATE: &str = "base";

/// Checks `spec.template` and `spec.image`; the message names the field.
pub fn validate(spec: &SandboxSpec) -> Result<(), String> {
    if let Some(t) = &spec.template {
        if t != BASE_TEMPLATE {
            return Err(format!(
                "spec.template: {t:?} does not exist on nodes; a node has only the \
                 {BASE_TEMPLATE:?} template, other root filesystems are OCI images (spec.image: \
                 <registry>/<repository>:<tag>), and an E2B templateID names a SandboxSet"
            ));
        }
    }
    if let Some(i) = &spec.image {
        warren_image::pull::parse_reference(i).map_err(|e| format!("spec.image: {e}"))?;
    }
    Ok(())
}

/// The spec of a cold-started Sandbox for E2B `templateID` `template`: the member spec of the
/// SandboxSet of that name when there is one (its image or template, pull Secrets and policy,
/// resources, persistent contents and internet access), else the template itself (`base`;
/// anything else is refused by the operator with `InvalidSpec`, which the API reports).
pub fn cold_start_spec(set: Option<&SandboxSet>, template: &str) -> SandboxSpec {
    match set {
        // The client's create sets the network rules.
        Some(set) => SandboxSpec {
            network: None,
            ..crate::sandboxset::member_spec(&set.spec)
        },
        None => SandboxSpec {
            template: Some(template.to_string()),
            ..Default::default()
        },
    }
}

/// [`cold_start_spec`] for E2B `templateID` `template`, reading its SandboxSet (`base` needs
/// none). A template that names no SandboxSet is a 404 for the client, not a Sandbox the
/// operator would refuse.
pub async fn cold_start_spec_for(
    sets: &kube::Api<SandboxSet>,
    template: &str,
) -> Result<SandboxSpec, (u16, String)> {
    if template == BASE_TEMPLATE {
        return Ok(cold_start_spec(None, template));
    }
    match sets.get_opt(template).await {
        Ok(Some(set)) => Ok(cold_start_spec(Some(&set), template)),
        Ok(None) => Err((
            404,
            format!(
                "template {template} not found: on a cluster a templateID names a SandboxSet \
                 in the sandbox namespace (its spec gives the template or image), or \
                 {BASE_TEMPLATE}"
            ),
        )),
        Err(e) => Err((
            502,
            format!("reading SandboxSet {template}: Kubernetes API error: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::SandboxSetSpec;

    #[test]
    fn only_base_and_images_run_on_nodes() {
        let t = |t: &str| SandboxSpec {
            template: Some(t.into()),
            ..Default::default()
        };
        assert!(validate(&t("base")).is_ok());
        let e = validate(&t("code-interpreter-v1")).unwrap_err();
        assert!(
            e.contains("spec.template") && e.contains("spec.image"),
            "{e}"
        );
        let i = |i: &str| SandboxSpec {
            image: Some(i.into()),
            ..Default::default()
        };
        assert!(validate(&i("127.0.0.1:5000/tools:v1")).is_ok());
        assert!(validate(&i("python:3.12-slim")).is_ok());
        let e = validate(&i("Not A Ref")).unwrap_err();
        assert!(e.starts_with("spec.image:"), "{e}");
    }

    #[test]
    fn a_template_id_naming_a_set_cold_starts_its_member_spec() {
        let set = SandboxSet::new(
            "py",
            SandboxSetSpec {
                replicas: 0,
                image: Some("127.0.0.1:5000/py:1".into()),
                ..serde_json::from_value(serde_json::json!({"replicas": 0})).unwrap()
            },
        );
        let s = cold_start_spec(Some(&set), "py");
        assert_eq!(s.image.as_deref(), Some("127.0.0.1:5000/py:1"));
        assert_eq!(s.template, None);
        let s = cold_start_spec(None, "base");
        assert_eq!(s.template.as_deref(), Some("base"));
    }
}
