//! Sandboxes' disk caps on a cluster. On a node each sandbox's files live on a file system of
//! its own (the single-host cap: a sparse ext4 image, loop-mounted, under the node's data dir),
//! so the Pod's own ephemeral-storage accounting never sees them. The figure is therefore put on
//! the Pod as its `ephemeral-storage` request and limit: the scheduler then reserves the node
//! disk the sandbox may fill, and the node agent caps the sandbox at that figure.
//!
//! The figure is the Sandbox's `resources.limits["ephemeral-storage"]`, else its request, else
//! the operator's `--sandbox-disk-mb` (1 GiB by default, as `warren serve`).

use crate::crd::Resources;
use k8s_openapi::api::core::v1::Pod;

/// The resource name Kubernetes accounts node-local disk under.
pub const EPHEMERAL_STORAGE: &str = "ephemeral-storage";

/// A sandbox's disk cap when neither its Sandbox nor a flag says (`warren serve`'s default).
pub const DEFAULT_SANDBOX_DISK_MB: u64 = 1024;

/// The least cap: ext4 needs room for its metadata (`warren_runtime::linux::disk::MIN_MB`).
pub const MIN_DISK_MB: u64 = 16;

/// Bytes of a Kubernetes quantity (`2Gi`, `500Mi`, `1G`, `1.5e9`, `4096`); `None` when it is not
/// one or is negative. Fractions of a byte round up.
pub fn quantity_bytes(q: &str) -> Option<u128> {
    let q = q.trim();
    // Binary suffixes first: `Mi` must not be read as `M` followed by garbage.
    let suffixes: [(&str, u32, i32); 12] = [
        ("Ki", 2, 10),
        ("Mi", 2, 20),
        ("Gi", 2, 30),
        ("Ti", 2, 40),
        ("Pi", 2, 50),
        ("Ei", 2, 60),
        ("k", 10, 3),
        ("M", 10, 6),
        ("G", 10, 9),
        ("T", 10, 12),
        ("P", 10, 15),
        ("E", 10, 18),
    ];
    let (num, base, exp) = suffixes
        .iter()
        .find_map(|(s, b, e)| q.strip_suffix(s).map(|n| (n, *b, *e)))
        .or_else(|| q.strip_suffix('m').map(|n| (n, 10, -3)))
        .unwrap_or((q, 10, 0));
    // A decimal number, optionally with an exponent (`1e3`, `1E3`).
    let (mantissa, e10) = match num.find(['e', 'E']) {
        Some(i) if base == 10 && exp == 0 => (&num[..i], num[i + 1..].parse::<i32>().ok()?),
        Some(_) => return None,
        None => (num, 0),
    };
    let mantissa = mantissa.strip_prefix('+').unwrap_or(mantissa);
    if mantissa.is_empty()
        || !mantissa.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        || mantissa.matches('.').count() > 1
    {
        return None;
    }
    let (whole, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    // Exact arithmetic: digits as an integer, scaled by 10^-(fraction digits).
    let digits: u128 = format!("{whole}{frac}").parse().ok()?;
    let scale10 = e10 - frac.len() as i32 + if base == 10 { exp } else { 0 };
    let scale2 = if base == 2 { exp as u32 } else { 0 };
    let mut n = digits.checked_mul(1u128.checked_shl(scale2)?)?;
    if scale10 >= 0 {
        n = n.checked_mul(10u128.checked_pow(scale10 as u32)?)?;
    } else {
        let d = 10u128.checked_pow(scale10.unsigned_abs())?;
        n = n.div_ceil(d);
    }
    Some(n)
}

/// MiB of a quantity, rounded up.
pub fn quantity_mib(q: &str) -> Option<u64> {
    quantity_bytes(q).and_then(|b| u64::try_from(b.div_ceil(1 << 20)).ok())
}

/// The disk cap the Sandbox's resources name (limit, else request), in MiB.
pub fn disk_mb(res: &Resources) -> Option<u64> {
    res.limits
        .get(EPHEMERAL_STORAGE)
        .or_else(|| res.requests.get(EPHEMERAL_STORAGE))
        .and_then(|q| quantity_mib(q))
}

/// The disk cap on the sandbox's Pod (its container's ephemeral-storage limit), in MiB: what
/// the scheduler accounted for, so what the node agent gives.
pub fn pod_disk_mb(pod: &Pod) -> Option<u64> {
    pod.spec
        .as_ref()?
        .containers
        .first()?
        .resources
        .as_ref()?
        .limits
        .as_ref()?
        .get(EPHEMERAL_STORAGE)
        .and_then(|q| quantity_mib(&q.0))
}

/// Checks the Sandbox's `ephemeral-storage` quantities; the message names the field.
pub fn validate(res: &Resources) -> Result<(), String> {
    let mut figures = [None, None];
    for (i, (what, map)) in [("requests", &res.requests), ("limits", &res.limits)]
        .into_iter()
        .enumerate()
    {
        let Some(q) = map.get(EPHEMERAL_STORAGE) else {
            continue;
        };
        let mib = quantity_mib(q).ok_or_else(|| {
            format!(
                "spec.resources.{what}.{EPHEMERAL_STORAGE}: {q:?} is not a quantity like 2Gi or \
                 500Mi"
            )
        })?;
        figures[i] = Some(mib);
    }
    if let [Some(req), Some(lim)] = figures {
        if req > lim {
            return Err(format!(
                "spec.resources: the {EPHEMERAL_STORAGE} request ({req} MiB) is above its limit \
                 ({lim} MiB)"
            ));
        }
    }
    if let Some(cap) = disk_mb(res) {
        if cap < MIN_DISK_MB {
            return Err(format!(
                "spec.resources: {EPHEMERAL_STORAGE} of {cap} MiB is too small for a sandbox \
                 disk; the least is {MIN_DISK_MB}Mi"
            ));
        }
    }
    Ok(())
}

/// The Pod's resources for a Sandbox with `res`: its own, plus the disk cap as the
/// `ephemeral-storage` request and limit where the Sandbox names none (`default_mb`, the
/// operator's `--sandbox-disk-mb`; 0 adds nothing).
pub fn with_disk(res: &Resources, default_mb: u64) -> Resources {
    let mut out = res.clone();
    let given = disk_mb(res);
    let cap = match given {
        Some(mb) => format!("{mb}Mi"),
        None if default_mb > 0 => format!("{default_mb}Mi"),
        None => return out,
    };
    // A request alone becomes the limit too (the sandbox can never use more); a limit alone is
    // left as it is (Kubernetes defaults the request to it).
    if given.is_none() || !res.limits.contains_key(EPHEMERAL_STORAGE) {
        out.limits.insert(EPHEMERAL_STORAGE.into(), cap.clone());
    }
    if given.is_none() {
        out.requests.insert(EPHEMERAL_STORAGE.into(), cap);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn kubernetes_quantities_parse() {
        for (q, bytes) in [
            ("2Gi", 2u128 << 30),
            ("500Mi", 500 << 20),
            ("1G", 1_000_000_000),
            ("1.5Gi", 3 << 29),
            ("4096", 4096),
            ("1e9", 1_000_000_000),
            ("1E3", 1000),
            ("128k", 128_000),
            ("+64Mi", 64 << 20),
            ("1500m", 2),
            ("0.5Ki", 512),
        ] {
            assert_eq!(quantity_bytes(q), Some(bytes), "{q}");
        }
        for bad in ["", "Gi", "-1Gi", "2 GB", "1.2.3", "abc", "1e3Mi", "2GiB"] {
            assert_eq!(quantity_bytes(bad), None, "{bad:?}");
        }
        assert_eq!(quantity_mib("1G"), Some(954));
        assert_eq!(quantity_mib("2Gi"), Some(2048));
    }

    fn res(req: Option<&str>, lim: Option<&str>) -> Resources {
        let m = |v: Option<&str>| {
            v.map(|v| BTreeMap::from([(EPHEMERAL_STORAGE.to_string(), v.to_string())]))
                .unwrap_or_default()
        };
        Resources {
            requests: m(req),
            limits: m(lim),
        }
    }

    #[test]
    fn the_cap_is_the_limit_else_the_request_else_the_default() {
        assert_eq!(disk_mb(&res(Some("1Gi"), Some("2Gi"))), Some(2048));
        assert_eq!(disk_mb(&res(Some("500Mi"), None)), Some(500));
        assert_eq!(disk_mb(&res(None, None)), None);

        let pod = with_disk(&res(None, None), 1024);
        assert_eq!(pod.requests[EPHEMERAL_STORAGE], "1024Mi");
        assert_eq!(pod.limits[EPHEMERAL_STORAGE], "1024Mi");
        let pod = with_disk(&res(Some("500Mi"), None), 1024);
        assert_eq!(pod.requests[EPHEMERAL_STORAGE], "500Mi");
        assert_eq!(pod.limits[EPHEMERAL_STORAGE], "500Mi");
        let pod = with_disk(&res(None, Some("2Gi")), 1024);
        assert!(!pod.requests.contains_key(EPHEMERAL_STORAGE));
        assert_eq!(pod.limits[EPHEMERAL_STORAGE], "2Gi");
        assert_eq!(with_disk(&res(None, None), 0), res(None, None));
    }

    #[test]
    fn bad_disk_quantities_are_refused_with_the_field() {
        assert!(validate(&res(Some("1Gi"), Some("2Gi"))).is_ok());
        let e = validate(&res(None, Some("lots"))).unwrap_err();
        assert!(
            e.contains("limits.ephemeral-storage") && e.contains("lots"),
            "{e}"
        );
        let e = validate(&res(Some("2Gi"), Some("1Gi"))).unwrap_err();
        assert!(e.contains("above its limit"), "{e}");
        let e = validate(&res(None, Some("8Mi"))).unwrap_err();
        assert!(e.contains("too small"), "{e}");
    }
}

#[cfg(test)]
mod pod_tests {
    use super::*;
    use crate::crd::{Sandbox, SandboxSpec};
    use crate::sandbox::{build_pod, PodConfig};
    use std::collections::BTreeMap;

    fn sandbox(res: Resources) -> Sandbox {
        let mut s = Sandbox::new(
            "s",
            SandboxSpec {
                template: Some("base".into()),
                resources: res,
                ..Default::default()
            },
        );
        s.metadata.uid = Some("u-1".into());
        s
    }

    #[test]
    fn the_agent_gets_the_figure_the_pod_was_scheduled_with() {
        let s = sandbox(Resources::default());
        let pod = build_pod(&s, &PodConfig::default()).unwrap();
        assert_eq!(pod_disk_mb(&pod), Some(DEFAULT_SANDBOX_DISK_MB));
        let req = crate::sandbox_agent::create_request(&s, &pod, None);
        assert_eq!(req.disk_mb, DEFAULT_SANDBOX_DISK_MB);

        let s = sandbox(Resources {
            requests: BTreeMap::from([(EPHEMERAL_STORAGE.into(), "2Gi".into())]),
            ..Default::default()
        });
        let pod = build_pod(&s, &PodConfig::default()).unwrap();
        let res = pod.spec.as_ref().unwrap().containers[0]
            .resources
            .clone()
            .unwrap();
        assert_eq!(res.requests.unwrap()[EPHEMERAL_STORAGE].0, "2Gi");
        assert_eq!(res.limits.unwrap()[EPHEMERAL_STORAGE].0, "2048Mi");
        assert_eq!(
            crate::sandbox_agent::create_request(&s, &pod, None).disk_mb,
            2048
        );

        // An operator without caps adds nothing, and the agent uses its own default.
        let cfg = PodConfig {
            sandbox_disk_mb: 0,
            ..PodConfig::default()
        };
        let s = sandbox(Resources::default());
        let pod = build_pod(&s, &cfg).unwrap();
        assert_eq!(pod_disk_mb(&pod), None);
        assert_eq!(
            crate::sandbox_agent::create_request(&s, &pod, None).disk_mb,
            0
        );
    }
}
