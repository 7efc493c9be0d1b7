//! Checks shared by every connector's `validate()`: durations, URLs, NATS subjects.
//!
//! Problems are collected, not returned at the first one, with the field path they concern,
//! so a pipeline file with several mistakes shows them all at their lines.

use std::time::Duration;

/// Problems found in a configuration, each with its field path.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Problems(Vec<(String, String)>);

impl Problems {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push((path.into(), message.into()));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_vec(self) -> Vec<(String, String)> {
        self.0
    }

    /// Parses a duration such as `500ms`, `2s`, `5m` or `1h30m`; it must be longer than zero.
    pub fn duration(&mut self, path: &str, text: &str) -> Option<Duration> {
        match humantime::parse_duration(text) {
            Ok(duration) if !duration.is_zero() => Some(duration),
            Ok(_) => {
                self.push(path, "must be longer than zero");
                None
            }
            Err(error) => {
                self.push(
                    path,
                    format!(
                        "`{text}` is not a duration ({error}); write e.g. `500ms`, `2s`, `5m`, `1h`"
                    ),
                );
                None
            }
        }
    }

    /// Checks that `url` starts with one of `schemes` and names a host or bucket.
    pub fn url(&mut self, path: &str, url: &str, schemes: &[&str]) {
        // Problems end up in a Pipeline's status, readable by more people than its Secrets.
        let shown = crate::redact::url(url);
        match url.split_once("://") {
            Some((scheme, rest)) if schemes.contains(&scheme) => {
                if rest.is_empty() || (rest.starts_with('/') && scheme != "file") {
                    self.push(path, format!("`{shown}` names no host or bucket"));
                }
            }
            _ => {
                let expected: Vec<String> = schemes.iter().map(|s| format!("{s}://")).collect();
                self.push(
                    path,
                    format!("`{shown}` must start with {}", expected.join(" or ")),
                );
            }
        }
    }

    /// Exactly one of `url` and `urlFrom` (the URL kept in a Secret); a literal URL must start
    /// with one of `schemes`. `example` is the URL suggested when neither is set.
    pub fn url_or_secret(
        &mut self,
        path: &str,
        url: Option<&str>,
        from_secret: bool,
        schemes: &[&str],
        example: &str,
    ) {
        match (url, from_secret) {
            (Some(url), false) => self.url(&format!("{path}.url"), url, schemes),
            (None, true) => {}
            (Some(_), true) => self.push(
                format!("{path}.urlFrom"),
                "set either url or urlFrom, not both",
            ),
            (None, false) => self.push(
                format!("{path}.url"),
                format!("set url (e.g. {example}) or urlFrom"),
            ),
        }
    }

    pub fn at_least(&mut self, path: &str, value: u64, minimum: u64, why: &str) {
        if value < minimum {
            self.push(
                path,
                format!("must be at least {minimum}{why}, got {value}"),
            );
        }
    }
}

/// A duration field read when a source is built, refused with the source kind and field when
/// it is not a duration longer than zero (a pipeline not validated first, such as a test's).
pub fn required_duration(
    kind: &str,
    field: &str,
    text: &str,
) -> Result<Duration, crate::SourceError> {
    humantime::parse_duration(text)
        .ok()
        .filter(|duration| !duration.is_zero())
        .ok_or_else(|| {
            crate::SourceError::Config(format!("{kind}: {field} `{text}` is not a duration"))
        })
}

/// Duration fields are written as text; this reads one already validated.
pub fn parse_duration(text: &str) -> Duration {
    humantime::parse_duration(text).unwrap_or_default()
}

pub const BUCKET_SCHEMES: [&str; 4] = ["s3", "gs", "az", "file"];
pub const AMQP_SCHEMES: [&str; 2] = ["amqp", "amqps"];
pub const NATS_SCHEMES: [&str; 4] = ["nats", "tls", "ws", "wss"];
pub const HTTP_SCHEMES: [&str; 2] = ["http", "https"];

/// NATS subjects: dot-separated tokens, `*` a whole token, `>` only as the last token.
pub fn check_subject(problems: &mut Problems, path: &str, subject: &str, wildcards: bool) {
    let tokens: Vec<&str> = subject.split('.').collect();
    let bad = tokens.iter().enumerate().any(|(index, token)| {
        token.is_empty()
            || token.chars().any(char::is_whitespace)
            || (token.contains('*') && *token != "*")
            || (token.contains('>') && (*token != ">" || index + 1 != tokens.len()))
    });
    if bad {
        problems.push(
            path,
            format!(
                "`{subject}` is not a valid subject: dot-separated tokens without spaces, `*` for \
                 one token, `>` only at the end"
            ),
        );
    } else if !wildcards && subject.contains(['*', '>']) {
        problems.push(path, "a publish subject cannot hold wildcards");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_the_nats_rules() {
        for (subject, ok) in [
            ("a.b", true),
            ("a.*.c", true),
            ("a.>", true),
            ("a..b", false),
            ("a.>.b", false),
            ("a b", false),
            ("a.b*", false),
        ] {
            let mut problems = Problems::new();
            check_subject(&mut problems, "s", subject, true);
            assert_eq!(problems.is_empty(), ok, "{subject}");
        }
        let mut problems = Problems::new();
        check_subject(&mut problems, "s", "a.*", false);
        assert!(!problems.is_empty());
    }

    #[test]
    fn urls_need_a_known_scheme_and_a_host() {
        let mut problems = Problems::new();
        problems.url("u", "amqp://h:5672", &AMQP_SCHEMES);
        problems.url("u", "file:///tmp/x", &BUCKET_SCHEMES);
        assert!(problems.is_empty());
        problems.url("u", "http://h", &AMQP_SCHEMES);
        problems.url("u", "s3://", &BUCKET_SCHEMES);
        assert_eq!(problems.into_vec().len(), 2);
    }

    #[test]
    fn a_refused_url_is_quoted_without_its_credentials() {
        let mut problems = Problems::new();
        problems.url("u", "http://guest:s3cret@h:5672", &AMQP_SCHEMES);
        let text = format!("{:?}", problems.into_vec());
        assert!(text.contains("http://***@h:5672"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
    }
}
