//! Credentials out of URLs, for every log line, error and status message that names a broker,
//! a bucket or an endpoint: `scheme://user:password@host/path` becomes
//! `scheme://***@host/path`. The whole user part goes, not only a password: NATS and Redis
//! take a token as the user (`nats://TOKEN@host`).

/// `url` without the credentials of its authority.
pub fn url(url: &str) -> String {
    urls_in(url)
}

/// `text` with the credentials of every `scheme://…@host` in it removed (a JSON document,
/// an error message quoting a URL).
pub fn urls_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("://") {
        let (head, tail) = rest.split_at(start + 3);
        out.push_str(head);
        let end = tail
            .find(['/', '?', '#', '"', '\'', '`', ' ', ',', '}', '\n'])
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_reach_logs() {
        assert_eq!(
            url("amqp://user:p@ss@rabbit:5672/%2f"),
            "amqp://***@rabbit:5672/%2f"
        );
        assert_eq!(url("nats://s3cr3t-token@nats:4222"), "nats://***@nats:4222");
        assert_eq!(url("amqp://rabbit/vhost"), "amqp://rabbit/vhost");
        assert_eq!(url("s3://bucket/a@b.jpg"), "s3://bucket/a@b.jpg");
        assert_eq!(url("not a url"), "not a url");
    }

    #[test]
    fn every_url_in_a_text_loses_its_credentials() {
        assert_eq!(
            urls_in(r#"{"url":"nats://a:b@h:4222","x":1} and `redis://:pw@r:6379`"#),
            r#"{"url":"nats://***@h:4222","x":1} and `redis://***@r:6379`"#
        );
    }
}
