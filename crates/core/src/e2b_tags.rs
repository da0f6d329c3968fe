//! E2B's template tags on Warren's template names. Pure: no I/O.
//!
//! E2B names a build of a template `name:tag`; a name alone means the tag `default`. Warren keeps
//! one template per tag: tag `default` is the template `name` itself, any other tag `t` is the
//! template `name:t`, an image template over the same image (no layer is copied). A build may
//! give its result several tags, an assignment adds tags to an existing build (moving them when
//! they exist), and a removal deletes the tag's template.

/// The tag a name without one means.
pub const DEFAULT_TAG: &str = "default";
/// Longest tag accepted.
const MAX_TAG_LEN: usize = 128;

/// Splits `name:tag` into the name and the tag; a `:` before the last `/` belongs to a registry
/// host (`host:5000/x`), not a tag.
pub fn split(reference: &str) -> (&str, Option<&str>) {
    let after_slash = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[after_slash..].rfind(':') {
        Some(i) => {
            let at = after_slash + i;
            (&reference[..at], Some(&reference[at + 1..]))
        }
        None => (reference, None),
    }
}

/// The Warren template holding tag `tag` of template `name`.
pub fn template_name(name: &str, tag: &str) -> String {
    if tag == DEFAULT_TAG {
        name.to_string()
    } else {
        format!("{name}:{tag}")
    }
}

/// The Warren template of an E2B reference: `name:default` is `name`.
pub fn canonical(reference: &str) -> &str {
    match split(reference) {
        (name, Some(DEFAULT_TAG)) => name,
        _ => reference,
    }
}

/// Checks a tag: letters, digits, `.`, `_` and `-`, starting with a letter or digit.
pub fn check_tag(tag: &str) -> Result<(), String> {
    let ok = !tag.is_empty()
        && tag.len() <= MAX_TAG_LEN
        && tag
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid tag {tag:?}: use up to {MAX_TAG_LEN} letters, digits, '.', '_' and '-', starting with a letter or digit"
        ))
    }
}

/// What a build request names: the template (without tag) and the tags its result gets, in
/// order without repeats: the name's own tag, then `tags`; `default` when neither names one.
pub fn build_tags(reference: &str, tags: &[String]) -> Result<(String, Vec<String>), String> {
    let (name, own) = split(reference);
    let mut all: Vec<String> = Vec::new();
    for t in own.into_iter().chain(tags.iter().map(String::as_str)) {
        check_tag(t)?;
        if !all.iter().any(|x| x == t) {
            all.push(t.to_string());
        }
    }
    if all.is_empty() {
        all.push(DEFAULT_TAG.to_string());
    }
    Ok((name.to_string(), all))
}

/// The tags of template `name` among Warren's template names: (tag, template name), sorted by
/// tag.
pub fn tags_of<'a>(
    name: &str,
    templates: impl IntoIterator<Item = &'a str>,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = templates
        .into_iter()
        .filter_map(|t| match split(t) {
            _ if t == name => Some((DEFAULT_TAG.to_string(), t.to_string())),
            (n, Some(tag)) if n == name && tag != DEFAULT_TAG => {
                Some((tag.to_string(), t.to_string()))
            }
            _ => None,
        })
        .collect();
    out.sort();
    out
}

/// A build id in E2B's shape (a UUID) for the image of manifest `digest`: the tags of one image
/// share it.
pub fn build_id_of_digest(digest: &str) -> String {
    let hex: String = digest
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_hexdigit)
        .chain(std::iter::repeat('0'))
        .take(32)
        .collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_at_the_tag_not_at_a_registry_port() {
        assert_eq!(split("app"), ("app", None));
        assert_eq!(split("app:v1"), ("app", Some("v1")));
        assert_eq!(split("team/app:v1"), ("team/app", Some("v1")));
        assert_eq!(split("host:5000/app"), ("host:5000/app", None));
        assert_eq!(split("host:5000/app:v2"), ("host:5000/app", Some("v2")));
        assert_eq!(canonical("app:default"), "app");
        assert_eq!(canonical("app:v1"), "app:v1");
        assert_eq!(template_name("app", "default"), "app");
        assert_eq!(template_name("app", "v1"), "app:v1");
    }

    #[test]
    fn a_build_gets_its_names_tag_then_the_listed_ones_else_default() {
        let tags = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            build_tags("app", &[]).unwrap(),
            ("app".into(), tags(&["default"]))
        );
        assert_eq!(
            build_tags("app:v1", &tags(&["stable", "v1"])).unwrap(),
            ("app".into(), tags(&["v1", "stable"]))
        );
        assert_eq!(
            build_tags("app", &tags(&["stable"])).unwrap(),
            ("app".into(), tags(&["stable"]))
        );
        for bad in ["", "-x", "a b", "a/b", "x:y", &"t".repeat(129)] {
            assert!(build_tags("app", &tags(&[bad])).is_err(), "{bad:?}");
        }
        assert!(build_tags("app:", &[]).is_err());
    }

    #[test]
    fn the_tags_of_a_template_are_its_default_and_its_tagged_names() {
        let names = [
            "app",
            "app:v1",
            "app:stable",
            "apple:v1",
            "app:default",
            "other",
        ];
        assert_eq!(
            tags_of("app", names),
            vec![
                ("default".into(), "app".into()),
                ("stable".into(), "app:stable".into()),
                ("v1".into(), "app:v1".into()),
            ]
        );
        assert!(tags_of("none", names).is_empty());
    }

    #[test]
    fn build_ids_of_digests_are_uuids() {
        let id = build_id_of_digest(
            "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        );
        assert_eq!(id, "01234567-89ab-cdef-0123-456789abcdef");
        assert_eq!(build_id_of_digest("").len(), 36);
    }
}
