//! Which keys a source reports: prefix, suffix and glob, all of which must match.

use globset::{GlobBuilder, GlobMatcher};

use crate::SourceError;

#[derive(Clone, Debug)]
pub struct KeyFilter {
    prefix: String,
    suffix: Option<String>,
    glob: Option<GlobMatcher>,
}

impl KeyFilter {
    /// `prefix` is the full key prefix (bucket URL path included).
    pub fn new(
        prefix: String,
        suffix: Option<&str>,
        glob: Option<&str>,
    ) -> Result<Self, SourceError> {
        let glob = match glob {
            Some(glob) => Some(
                // `*` stays within a path segment so `incoming/*.jpg` does not reach into
                // `incoming/thumbs/`; `**` is how a pattern crosses segments.
                GlobBuilder::new(glob)
                    .literal_separator(true)
                    .backslash_escape(true)
                    .build()
                    .map_err(|e| SourceError::Config(format!("glob `{glob}`: {e}")))?
                    .compile_matcher(),
            ),
            None => None,
        };
        Ok(KeyFilter {
            prefix,
            suffix: suffix.filter(|s| !s.is_empty()).map(str::to_string),
            glob,
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The folder to list: the prefix up to its last `/`. Listings are by whole path
    /// segments, so a prefix such as `in/2026-` is listed as `in/` and filtered here.
    pub fn list_root(&self) -> &str {
        match self.prefix.rfind('/') {
            Some(end) => &self.prefix[..end],
            None => "",
        }
    }

    pub fn matches(&self, key: &str) -> bool {
        key.starts_with(&self.prefix)
            && self.suffix.as_deref().is_none_or(|s| key.ends_with(s))
            && self.glob.as_ref().is_none_or(|g| g.is_match(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_suffix_and_glob_all_apply() {
        let filter =
            KeyFilter::new("in/2026-".into(), Some(".jpg"), Some("in/**/*.{jpg,png}")).unwrap();
        assert_eq!(filter.list_root(), "in");
        assert!(filter.matches("in/2026-01/a.jpg"));
        assert!(!filter.matches("in/2026-01/a.png"), "suffix");
        assert!(!filter.matches("in/2025-01/a.jpg"), "prefix");
        assert!(!filter.matches("in/2026-a.gif"));
    }

    #[test]
    fn a_star_stays_within_a_segment() {
        let filter = KeyFilter::new(String::new(), None, Some("incoming/*.jpg")).unwrap();
        assert_eq!(filter.list_root(), "");
        assert!(filter.matches("incoming/a b.jpg"));
        assert!(!filter.matches("incoming/thumbs/a.jpg"));
        let deep = KeyFilter::new(String::new(), None, Some("incoming/**/*.jpg")).unwrap();
        assert!(deep.matches("incoming/thumbs/x/a.jpg"));
        assert!(deep.matches("incoming/a.jpg"));
    }

    #[test]
    fn a_bad_glob_is_a_config_error() {
        assert!(KeyFilter::new(String::new(), None, Some("a/{b")).is_err());
    }
}
