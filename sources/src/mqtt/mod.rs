//! MQTT topics (MQTT 3.1.1, through `rumqttc`): a persistent session (`cleanSession: false`)
//! so messages published while Spate is down wait at the broker, QoS 1 with the PUBACK sent
//! only once the event's Job exists, shared subscriptions (`$share/GROUP/TOPIC`) to split a
//! topic between consumers, reconnection with backoff.
//!
//! Delivery guarantee with `qos: 1`: at-least-once. A message may be delivered more than once
//! (after a reconnect, a crash before the PUBACK), and its stable id (see `message.rs`) makes
//! the copies one Job. With `qos: 0`: at-most-once, messages in flight when Spate stops are
//! lost. This module holds the configuration; `consumer.rs` the runtime, `message.rs` the
//! mapping from message to event.

mod consumer;
mod message;

use std::time::Duration;

use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::check::{Problems, parse_duration};
use crate::secret::SecretValue;
use crate::{Source, SourceContext, SourceError};

pub use message::to_event;

/// Schemes `url` may use. TLS (`mqtts://`) is not built in.
pub const MQTT_SCHEMES: [&str; 2] = ["mqtt", "tcp"];

/// An MQTT topic filter, consumed through a persistent session. QoS 1 messages are
/// acknowledged (PUBACK) only once their Job exists.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MqttSource {
    /// `mqtt://host:1883` (`mqtt://user:password@host:1883` is accepted, but put credentials
    /// in `urlFrom` or `passwordFrom` instead of here). TLS (`mqtts://`) is not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The whole URL, credentials included, from a Secret or the environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_from: Option<SecretValue>,
    /// The topic filter to subscribe to: wildcards `+` (one level) and `#` (the rest) allowed,
    /// and `$share/GROUP/FILTER` for a shared subscription whose messages the broker splits
    /// between the consumers of GROUP (each with its own `clientId`).
    pub topic: String,
    /// The MQTT client id, which names the persistent session at the broker: it must stay the
    /// same across restarts and be unique among the broker's clients. Default: `spate-`
    /// followed by the pipeline's namespace and name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// `1` (at-least-once: PUBACK once the Job exists) or `0` (at-most-once: a message in
    /// flight when Spate stops is lost). QoS 2 is not supported.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// `false` keeps the session at the broker while Spate is disconnected, so messages
    /// published meanwhile (QoS 1) wait for it. `true` starts afresh on every connection and
    /// loses them.
    #[serde(default)]
    pub clean_session: bool,
    /// How often the connection is checked with a ping, e.g. `30s` (at least `1s`).
    #[serde(default = "default_keep_alive")]
    pub keep_alive: String,
    /// The user name to connect with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The password, from a Secret or the environment; needs `username`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_from: Option<SecretValue>,
}

fn default_qos() -> u8 {
    1
}

fn default_keep_alive() -> String {
    "30s".to_string()
}

impl MqttSource {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        problems.url_or_secret(
            path,
            self.url.as_deref(),
            self.url_from.is_some(),
            &MQTT_SCHEMES,
            "mqtt://127.0.0.1:1883",
        );
        if let (Some(url), None) = (&self.url, &self.url_from)
            && MQTT_SCHEMES
                .iter()
                .any(|s| url.starts_with(&format!("{s}://")))
            && let Err(reason) = parse_url(url)
        {
            problems.push(format!("{path}.url"), reason);
        }
        if let Err(reason) = check_topic_filter(&self.topic) {
            problems.push(format!("{path}.topic"), reason);
        }
        if let Some(client_id) = &self.client_id
            && let Err(reason) = check_client_id(client_id)
        {
            problems.push(format!("{path}.clientId"), reason);
        }
        if self.qos > 1 {
            problems.push(
                format!("{path}.qos"),
                format!(
                    "must be 1 (at-least-once) or 0 (at-most-once), got {}",
                    self.qos
                ),
            );
        }
        if let Some(keep_alive) = problems.duration(&format!("{path}.keepAlive"), &self.keep_alive)
            && (keep_alive < Duration::from_secs(1) || keep_alive.as_secs() > u64::from(u16::MAX))
        {
            problems.push(format!("{path}.keepAlive"), "must be between 1s and 65535s");
        }
        if self.password_from.is_some() && self.username.is_none() {
            problems.push(format!("{path}.username"), "passwordFrom needs a username");
        }
    }

    /// An event as this source produces it.
    pub fn sample_event(&self) -> Value {
        let topic = shared_filter(&self.topic).unwrap_or(&self.topic);
        json!({"id": "sample-0001", "topic": topic, "subject": topic, "retain": false, "data": {}})
    }
}

/// The filter of a `$share/GROUP/FILTER` subscription.
fn shared_filter(topic: &str) -> Option<&str> {
    let rest = topic.strip_prefix("$share/")?;
    rest.split_once('/').map(|(_, filter)| filter)
}

/// Checks an MQTT topic filter (MQTT 3.1.1 §4.7, plus shared subscriptions).
pub fn check_topic_filter(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("must name a topic filter, e.g. `uploads/#`".to_string());
    }
    if topic.len() > usize::from(u16::MAX) {
        return Err("is longer than MQTT's 65535 bytes".to_string());
    }
    if topic.contains('\0') {
        return Err("must not contain a NUL character".to_string());
    }
    let filter = match topic.strip_prefix("$share/") {
        Some(rest) => {
            let Some((group, filter)) = rest.split_once('/') else {
                return Err(format!(
                    "`{topic}`: a shared subscription is `$share/GROUP/FILTER`"
                ));
            };
            if group.is_empty() || group.contains(['+', '#']) {
                return Err(format!(
                    "`{topic}`: the share group must be a non-empty name without `+` or `#`"
                ));
            }
            if filter.is_empty() {
                return Err(format!(
                    "`{topic}`: a shared subscription needs a filter after the group"
                ));
            }
            filter
        }
        None => topic,
    };
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err(format!(
                "`{topic}`: `#` must be a whole level and the last one (`uploads/#`)"
            ));
        }
        if level.contains('+') && *level != "+" {
            return Err(format!(
                "`{topic}`: `+` must be a whole level (`uploads/+/jpg`)"
            ));
        }
    }
    Ok(())
}

fn check_client_id(client_id: &str) -> Result<(), String> {
    if client_id.is_empty() {
        return Err("must not be empty: it names the persistent session".to_string());
    }
    if client_id.len() > usize::from(u16::MAX) {
        return Err("is longer than MQTT's 65535 bytes".to_string());
    }
    Ok(())
}

/// The default client id: `spate-NAMESPACE-NAME` with anything but letters, digits, `-` and `_`
/// replaced by `-`; names over 64 characters keep their start and a hash of the whole.
pub fn default_client_id(pipeline: &str) -> String {
    let cleaned: String = format!("spate-{pipeline}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if cleaned.len() <= 64 {
        return cleaned;
    }
    let hash = data_encoding::HEXLOWER.encode(&Sha256::digest(cleaned.as_bytes()));
    format!("{}-{}", &cleaned[..47], &hash[..16])
}

/// Where to connect and as whom, read from an `mqtt://[user[:password]@]host[:port]` URL.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Endpoint {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
}

pub(crate) fn parse_url(url: &str) -> Result<Endpoint, String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!(
            "`{}` is not an mqtt:// URL",
            crate::redact::url(url)
        ));
    };
    if !MQTT_SCHEMES.contains(&scheme) {
        return Err(format!(
            "`{}`: only mqtt:// is supported (no TLS)",
            crate::redact::url(url)
        ));
    }
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#']) {
        return Err(format!(
            "`{}`: an MQTT URL has no path or query, only mqtt://host:port",
            crate::redact::url(url)
        ));
    }
    let (userinfo, hostport) = match authority.rfind('@') {
        Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
        None => (None, authority),
    };
    let decode = |text: &str| {
        percent_encoding::percent_decode_str(text)
            .decode_utf8_lossy()
            .into_owned()
    };
    let (username, password) = match userinfo {
        Some(info) => match info.split_once(':') {
            Some((user, password)) => (Some(decode(user)), Some(decode(password))),
            None => (Some(decode(info)), None),
        },
        None => (None, None),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || hostport.starts_with('[') => {
            let port = port
                .parse::<u16>()
                .map_err(|_| format!("`{}`: `{port}` is not a port", crate::redact::url(url)))?;
            (host, port)
        }
        _ => (hostport, 1883),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("`{}` names no host", crate::redact::url(url)));
    }
    Ok(Endpoint {
        host: host.to_string(),
        port,
        username,
        password,
    })
}

/// Resolves the URL and credentials and returns the source; connecting happens in
/// [`Source::run`], which retries, so a broker briefly down at start-up does not fail the
/// pipeline.
pub fn build(
    config: &MqttSource,
    cx: &SourceContext,
) -> BoxFuture<'static, Result<Box<dyn Source>, SourceError>> {
    let config = config.clone();
    let cx = cx.clone();
    Box::pin(async move {
        let url = match (&config.url, &config.url_from) {
            (_, Some(secret)) => cx.secrets.resolve(secret).await?,
            (Some(url), None) => url.clone(),
            (None, None) => {
                return Err(SourceError::Config(
                    "mqtt source: set url or urlFrom".to_string(),
                ));
            }
        };
        let mut endpoint = parse_url(&url)
            .map_err(|reason| SourceError::Config(format!("mqtt source: {reason}")))?;
        check_topic_filter(&config.topic)
            .map_err(|reason| SourceError::Config(format!("mqtt source: topic {reason}")))?;
        if let Some(username) = &config.username {
            endpoint.username = Some(username.clone());
        }
        if let Some(password) = &config.password_from {
            endpoint.password = Some(cx.secrets.resolve(password).await?);
        }
        let keep_alive = parse_duration(&config.keep_alive).max(Duration::from_secs(1));
        Ok(Box::new(consumer::MqttConsumer {
            address: crate::redact::url(&url),
            endpoint,
            topic: config.topic,
            client_id: config
                .client_id
                .unwrap_or_else(|| default_client_id(&cx.pipeline)),
            qos: if config.qos == 0 {
                rumqttc::QoS::AtMostOnce
            } else {
                rumqttc::QoS::AtLeastOnce
            },
            clean_session: config.clean_session,
            keep_alive,
        }) as Box<dyn Source>)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_filters_follow_the_mqtt_rules() {
        for good in [
            "a",
            "a/b",
            "a/+/c",
            "+",
            "#",
            "a/#",
            "+/+/#",
            "/a",
            "$share/g/a/#",
            "$SYS/#",
        ] {
            assert_eq!(check_topic_filter(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "a#",
            "a/#/b",
            "a/b+",
            "a/+b/c",
            "$share/g",
            "$share//a",
            "$share/g+/a",
            "$share/g/",
            "$share/g/a#",
            "a\0",
        ] {
            assert!(check_topic_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn urls_give_host_port_and_credentials() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1883").unwrap(),
            Endpoint {
                host: "127.0.0.1".into(),
                port: 1883,
                username: None,
                password: None
            }
        );
        let with_user = parse_url("mqtt://spate:p%40ss@broker/").unwrap();
        assert_eq!(with_user.host, "broker");
        assert_eq!(with_user.port, 1883);
        assert_eq!(with_user.username.as_deref(), Some("spate"));
        assert_eq!(with_user.password.as_deref(), Some("p@ss"));
        assert_eq!(parse_url("tcp://[::1]:1884").unwrap().host, "::1");
        assert!(parse_url("mqtts://broker").is_err());
        assert!(parse_url("mqtt://broker:x").is_err());
        assert!(parse_url("mqtt://broker/topic").is_err());
        assert!(parse_url("mqtt://:1883").is_err());
        let error = parse_url("mqtt://u:secret@broker:x").unwrap_err();
        assert!(!error.contains("secret"), "{error}");
    }

    #[test]
    fn default_client_ids_are_stable_and_bounded() {
        assert_eq!(
            default_client_id("default/uploads"),
            "spate-default-uploads"
        );
        let long = format!("default/{}", "x".repeat(100));
        let id = default_client_id(&long);
        assert_eq!(id.len(), 64);
        assert_eq!(id, default_client_id(&long));
        assert_ne!(id, default_client_id(&format!("{long}y")));
    }
}
