//! Deterministic Job names and Kubernetes-safe names and labels.
//!
//! A Job's name is derived from its pipeline and the ids of its events, never from a clock or
//! a counter: a redelivered event maps to the same name, so the API server answers 409 instead
//! of a second Job running the same work.

use sha2::{Digest, Sha256};

/// The longest Job name Spate produces. Kubernetes allows 63 for the `job-name` label, but the
/// Job controller derives pod names and (in Indexed mode) hostnames `<job>-<index>` from it;
/// 52 leaves room for those suffixes, as the CronJob controller does for its Jobs.
pub const MAX_JOB_NAME: usize = 52;

/// Hash characters in a name: 16 base32 characters are 80 bits, so a collision among even
/// billions of events is vanishingly unlikely.
const HASH_CHARS: usize = 16;

/// The Job name for a batch of events of a pipeline (one event in `perEvent` mode).
///
/// The order of `event_ids` does not matter and duplicates count once, so the same set of
/// events always names the same Job.
pub fn job_name<S: AsRef<str>>(namespace: &str, pipeline: &str, event_ids: &[S]) -> String {
    let hash = batch_hash(namespace, pipeline, event_ids);
    let room = MAX_JOB_NAME - HASH_CHARS - 1;
    let prefix = dns_label_prefix(pipeline, room);
    if prefix.is_empty() {
        format!("spate-{}", &hash[..HASH_CHARS])
    } else {
        format!("{prefix}-{}", &hash[..HASH_CHARS])
    }
}

/// A stable id for a batch, used as the `spate.dev/batch` label: lowercase base32, 16 chars.
pub fn batch_id<S: AsRef<str>>(namespace: &str, pipeline: &str, event_ids: &[S]) -> String {
    batch_hash(namespace, pipeline, event_ids)[..HASH_CHARS].to_string()
}

fn batch_hash<S: AsRef<str>>(namespace: &str, pipeline: &str, event_ids: &[S]) -> String {
    let mut ids: Vec<&str> = event_ids.iter().map(AsRef::as_ref).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut hasher = Sha256::new();
    // Length-prefixed, so that no choice of ids can make two different batches hash alike.
    for part in [namespace, pipeline].into_iter().chain(ids) {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    data_encoding::BASE32_NOPAD
        .encode(&hasher.finalize())
        .to_ascii_lowercase()
}

/// The longest prefix of `name` (up to `max` chars) that can start a DNS-1123 label: lowercase
/// alphanumerics and `-`, starting with a letter or digit, not ending with `-`.
fn dns_label_prefix(name: &str, max: usize) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .skip_while(|c| *c == '-')
        .take(max)
        .collect();
    cleaned.trim_end_matches('-').to_string()
}

/// Makes any text a valid label value: at most 63 characters of `[A-Za-z0-9_.-]`, beginning
/// and ending with an alphanumeric. Text that had to change keeps a hash of the original, so
/// two different values do not become the same label by accident.
pub fn sanitize_label_value(value: &str) -> String {
    if is_label_value(value) {
        return value.to_string();
    }
    let replaced: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let digest = data_encoding::BASE32_NOPAD
        .encode(&Sha256::digest(value.as_bytes()))
        .to_ascii_lowercase();
    let stem = replaced.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    let stem: String = stem.chars().take(63 - 9).collect();
    let stem = stem.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    if stem.is_empty() {
        digest[..8].to_string()
    } else {
        format!("{stem}-{}", &digest[..8])
    }
}

/// A DNS-1123 label: at most 63 lowercase alphanumerics or `-`, alphanumeric at both ends.
pub fn is_dns1123_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A label value: empty, or at most 63 of `[A-Za-z0-9_.-]` with alphanumerics at both ends.
pub fn is_label_value(value: &str) -> bool {
    if value.is_empty() {
        return true;
    }
    let bytes = value.as_bytes();
    value.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_events_always_name_the_same_job() {
        let first = job_name("default", "thumbnails", &["b", "a", "a"]);
        assert_eq!(first, job_name("default", "thumbnails", &["a", "b"]));
        assert_ne!(first, job_name("default", "thumbnails", &["a"]));
        assert_ne!(first, job_name("other", "thumbnails", &["a", "b"]));
        assert!(first.starts_with("thumbnails-"));
        assert!(is_dns1123_label(&first));
    }

    #[test]
    fn ids_cannot_be_shifted_between_fields_to_collide() {
        assert_ne!(
            job_name("ns", "p", &["ab", "c"]),
            job_name("ns", "p", &["a", "bc"])
        );
    }

    #[test]
    fn long_pipeline_names_are_cut_to_fit() {
        let name = job_name("ns", &"x".repeat(200), &["1"]);
        assert_eq!(name.len(), MAX_JOB_NAME);
        assert!(is_dns1123_label(&name));
        let odd = job_name("ns", "---", &["1"]);
        assert!(odd.starts_with("spate-") && is_dns1123_label(&odd), "{odd}");
    }

    #[test]
    fn label_values_are_sanitised_and_stay_distinct() {
        assert_eq!(sanitize_label_value("photo.jpg"), "photo.jpg");
        let a = sanitize_label_value("incoming/photo 1.jpg");
        let b = sanitize_label_value("incoming/photo-1.jpg");
        assert!(is_label_value(&a) && is_label_value(&b));
        assert_ne!(a, b);
        assert!(is_label_value(&sanitize_label_value(&"é".repeat(100))));
        assert!(is_label_value(&sanitize_label_value("-_.")));
    }
}
