//! A stream entry as a Spate event, and the parsing of the stream replies it comes from.
//!
//! The event:
//!
//! - `id`: `<stream>:<entry id>`, e.g. `uploads:1700000000000-0`. The entry id never
//!   changes, so every redelivery names the same Job.
//! - `stream`, `entryId`: where the entry is.
//! - `fields`: every field of the entry, as strings (a value that is not UTF-8 is base64, and
//!   its name listed in `base64Fields`).
//! - `data`: the value of the field `data`, or else of the field `event`, parsed when it is
//!   JSON (a JSON string otherwise, base64 with `dataEncoding: base64` when binary); an entry
//!   with neither field has its `fields` object as `data`.

use redis::Value as Reply;
use serde_json::{Map, Value};

use crate::payload::insert_body;
use crate::{Event, EventError};

/// One entry of a stream reply; `fields` is `None` for an entry deleted while pending.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Entry {
    pub(super) id: String,
    pub(super) fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

/// The event for one entry of `stream`.
pub fn to_event(
    stream: &str,
    entry_id: &str,
    fields: &[(Vec<u8>, Vec<u8>)],
) -> Result<Event, EventError> {
    let mut object = Map::new();
    let mut binary = Vec::new();
    for (name, value) in fields {
        let name = String::from_utf8_lossy(name).into_owned();
        let value = match std::str::from_utf8(value) {
            Ok(text) => text.to_string(),
            Err(_) => {
                binary.push(Value::String(name.clone()));
                data_encoding::BASE64.encode(value)
            }
        };
        object.insert(name, Value::String(value));
    }
    let mut event = Map::new();
    event.insert("stream".to_string(), Value::from(stream));
    event.insert("entryId".to_string(), Value::from(entry_id));
    let body = ["data", "event"].iter().find_map(|name| {
        fields
            .iter()
            .find(|(field, _)| field.as_slice() == name.as_bytes())
            .map(|(_, value)| value)
    });
    match body {
        Some(body) => insert_body(&mut event, body),
        None => {
            event.insert("data".to_string(), Value::Object(object.clone()));
        }
    }
    event.insert("fields".to_string(), Value::Object(object));
    if !binary.is_empty() {
        event.insert("base64Fields".to_string(), Value::Array(binary));
    }
    Event::new(format!("{stream}:{entry_id}"), event)
}

/// Text of a bulk or simple string reply.
pub(super) fn text(reply: &Reply) -> Option<String> {
    match reply {
        Reply::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Reply::SimpleString(text) => Some(text.clone()),
        Reply::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn bytes(reply: &Reply) -> Vec<u8> {
    match reply {
        Reply::BulkString(bytes) => bytes.clone(),
        Reply::SimpleString(text) => text.clone().into_bytes(),
        Reply::Int(n) => n.to_string().into_bytes(),
        _ => Vec::new(),
    }
}

/// Entries as `[[id, [field, value, ...]], ...]` (a nil field list for deleted entries).
pub(super) fn entries(reply: &Reply) -> Result<Vec<Entry>, String> {
    let items = match reply {
        Reply::Nil => return Ok(Vec::new()),
        Reply::Array(items) => items,
        other => return Err(format!("unexpected entries reply {other:?}")),
    };
    items
        .iter()
        .map(|item| {
            let Reply::Array(parts) = item else {
                return Err(format!("unexpected entry {item:?}"));
            };
            let id = parts
                .first()
                .and_then(text)
                .ok_or_else(|| format!("entry without id {item:?}"))?;
            let fields = match parts.get(1) {
                None | Some(Reply::Nil) => None,
                Some(Reply::Array(values)) => Some(
                    values
                        .chunks(2)
                        .filter(|pair| pair.len() == 2)
                        .map(|pair| (bytes(&pair[0]), bytes(&pair[1])))
                        .collect(),
                ),
                Some(Reply::Map(pairs)) => {
                    Some(pairs.iter().map(|(k, v)| (bytes(k), bytes(v))).collect())
                }
                Some(other) => return Err(format!("unexpected entry fields {other:?}")),
            };
            Ok(Entry { id, fields })
        })
        .collect()
}

/// The entries of an `XREADGROUP` reply on one stream (`nil` when `BLOCK` timed out).
pub(super) fn read_reply(reply: &Reply) -> Result<Vec<Entry>, String> {
    match reply {
        Reply::Nil => Ok(Vec::new()),
        Reply::Array(streams) => match streams.first() {
            None => Ok(Vec::new()),
            Some(Reply::Array(stream)) => entries(stream.get(1).unwrap_or(&Reply::Nil)),
            Some(other) => Err(format!("unexpected XREADGROUP stream {other:?}")),
        },
        Reply::Map(streams) => match streams.first() {
            None => Ok(Vec::new()),
            Some((_, stream)) => entries(stream),
        },
        other => Err(format!("unexpected XREADGROUP reply {other:?}")),
    }
}

/// An `XAUTOCLAIM ... JUSTID` reply: the next cursor, the ids claimed, and how many pending
/// entries no longer exist (Redis 7 removes them from the pending list itself).
pub(super) fn autoclaim_reply(reply: &Reply) -> Result<(String, Vec<String>, usize), String> {
    let Reply::Array(parts) = reply else {
        return Err(format!("unexpected XAUTOCLAIM reply {reply:?}"));
    };
    let cursor = parts
        .first()
        .and_then(text)
        .ok_or_else(|| format!("XAUTOCLAIM reply without cursor {reply:?}"))?;
    let claimed = match parts.get(1) {
        None | Some(Reply::Nil) => Vec::new(),
        Some(Reply::Array(ids)) => ids
            .iter()
            .map(|id| text(id).ok_or_else(|| format!("unexpected claimed id {id:?}")))
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(format!("unexpected XAUTOCLAIM ids {other:?}")),
    };
    let deleted = match parts.get(2) {
        Some(Reply::Array(ids)) => ids.len(),
        _ => 0,
    };
    Ok((cursor, claimed, deleted))
}

/// Delivery counts from an extended `XPENDING` reply: `[[id, consumer, idle, count], ...]`.
pub(super) fn pending_counts(reply: &Reply) -> Vec<(String, u64)> {
    let Reply::Array(items) = reply else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let Reply::Array(parts) = item else {
                return None;
            };
            let id = parts.first().and_then(text)?;
            let count = parts.get(3).and_then(text)?.parse().ok()?;
            Some((id, count))
        })
        .collect()
}

/// A consumer group's counts, from `XINFO GROUPS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct GroupCounts {
    /// Entries delivered to some consumer of the group and not acknowledged.
    pub(super) pending: u64,
    /// Entries not delivered to the group yet; `None` when Redis cannot count them (before
    /// 7.0, or with entries deleted by `XDEL` between the group's position and the end).
    pub(super) lag: Option<u64>,
}

/// `group`'s counts in an `XINFO GROUPS` reply: one group per element, each a flat
/// `[name, value, ...]` array (RESP2) or a map (RESP3). `None` when the group is not listed.
pub(super) fn group_counts(reply: &Reply, group: &str) -> Result<Option<GroupCounts>, String> {
    let Reply::Array(groups) = reply else {
        return Err(format!("unexpected XINFO GROUPS reply {reply:?}"));
    };
    for item in groups {
        let fields: Vec<(String, &Reply)> = match item {
            Reply::Array(flat) => flat
                .chunks(2)
                .filter(|pair| pair.len() == 2)
                .filter_map(|pair| Some((text(&pair[0])?, &pair[1])))
                .collect(),
            Reply::Map(pairs) => pairs
                .iter()
                .filter_map(|(name, value)| Some((text(name)?, value)))
                .collect(),
            other => return Err(format!("unexpected XINFO GROUPS group {other:?}")),
        };
        let field = |name: &str| {
            fields
                .iter()
                .find(|(field, _)| field == name)
                .map(|(_, value)| *value)
        };
        if field("name").and_then(text).as_deref() != Some(group) {
            continue;
        }
        let count = |value: &Reply| text(value)?.parse::<u64>().ok();
        let pending = field("pending").and_then(count).ok_or_else(|| {
            format!("XINFO GROUPS group {group} without a pending count {item:?}")
        })?;
        let lag = match field("lag") {
            None | Some(Reply::Nil) => None,
            Some(value) => Some(
                count(value).ok_or_else(|| format!("XINFO GROUPS group {group}: lag {value:?}"))?,
            ),
        };
        return Ok(Some(GroupCounts { pending, lag }));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pairs(items: &[(&str, &[u8])]) -> Vec<(Vec<u8>, Vec<u8>)> {
        items
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
            .collect()
    }

    #[test]
    fn a_json_data_field_is_the_events_data() {
        let event = to_event(
            "uploads",
            "1-0",
            &pairs(&[("data", br#"{"key":"a.jpg"}"#), ("tenant", b"acme")]),
        )
        .unwrap();
        assert_eq!(event.id(), "uploads:1-0");
        assert_eq!(
            event.to_json(),
            json!({"id": "uploads:1-0", "stream": "uploads", "entryId": "1-0",
                   "data": {"key": "a.jpg"},
                   "fields": {"data": r#"{"key":"a.jpg"}"#, "tenant": "acme"}})
        );
        let event = to_event("s", "2-0", &pairs(&[("event", b"[1,2]")])).unwrap();
        assert_eq!(event.fields()["data"], json!([1, 2]));
        let event = to_event("s", "2-1", &pairs(&[("event", b"1"), ("data", b"2")])).unwrap();
        assert_eq!(event.fields()["data"], json!(2), "data wins over event");
    }

    #[test]
    fn without_a_data_field_the_fields_are_the_data() {
        let event = to_event("s", "3-0", &pairs(&[("key", b"a.jpg"), ("bin", &[0xff])])).unwrap();
        assert_eq!(
            event.fields()["data"],
            json!({"key": "a.jpg", "bin": "/w=="})
        );
        assert_eq!(event.fields()["base64Fields"], json!(["bin"]));
        let event = to_event("s", "4-0", &pairs(&[("data", b"plain text")])).unwrap();
        assert_eq!(event.fields()["data"], json!("plain text"));
    }

    #[test]
    fn replies_are_parsed() {
        let bulk = |s: &str| Reply::BulkString(s.as_bytes().to_vec());
        let reply = Reply::Array(vec![Reply::Array(vec![
            bulk("s"),
            Reply::Array(vec![
                Reply::Array(vec![bulk("1-0"), Reply::Array(vec![bulk("a"), bulk("b")])]),
                Reply::Array(vec![bulk("2-0"), Reply::Nil]),
            ]),
        ])]);
        assert_eq!(
            read_reply(&reply).unwrap(),
            vec![
                Entry {
                    id: "1-0".into(),
                    fields: Some(vec![(b"a".to_vec(), b"b".to_vec())])
                },
                Entry {
                    id: "2-0".into(),
                    fields: None
                }
            ]
        );
        assert!(read_reply(&Reply::Nil).unwrap().is_empty());
        let claim = Reply::Array(vec![
            bulk("0-0"),
            Reply::Array(vec![bulk("3-0")]),
            Reply::Array(vec![bulk("9-0")]),
        ]);
        assert_eq!(
            autoclaim_reply(&claim).unwrap(),
            ("0-0".into(), vec!["3-0".to_string()], 1)
        );
        let pending = Reply::Array(vec![Reply::Array(vec![
            bulk("1-0"),
            bulk("c"),
            Reply::Int(10),
            Reply::Int(3),
        ])]);
        assert_eq!(pending_counts(&pending), vec![("1-0".to_string(), 3)]);
    }

    #[test]
    fn group_counts_are_read_from_xinfo_groups_in_both_protocols() {
        let bulk = |s: &str| Reply::BulkString(s.as_bytes().to_vec());
        // Redis 7, RESP2: a flat array per group; another group comes first.
        let resp2 = |name: &str, pending: i64, lag: Reply| {
            Reply::Array(vec![
                bulk("name"),
                bulk(name),
                bulk("consumers"),
                Reply::Int(1),
                bulk("pending"),
                Reply::Int(pending),
                bulk("last-delivered-id"),
                bulk("1700000000000-0"),
                bulk("entries-read"),
                Reply::Int(7),
                bulk("lag"),
                lag,
            ])
        };
        let reply = Reply::Array(vec![
            resp2("other", 100, Reply::Int(100)),
            resp2("spate", 3, Reply::Int(40)),
        ]);
        assert_eq!(
            group_counts(&reply, "spate").unwrap(),
            Some(GroupCounts {
                pending: 3,
                lag: Some(40)
            })
        );
        // Entries deleted ahead of the group: Redis answers a nil lag.
        let reply = Reply::Array(vec![resp2("spate", 3, Reply::Nil)]);
        assert_eq!(
            group_counts(&reply, "spate").unwrap(),
            Some(GroupCounts {
                pending: 3,
                lag: None
            })
        );
        // RESP3: a map per group, with simple strings as names.
        let reply = Reply::Array(vec![Reply::Map(vec![
            (Reply::SimpleString("name".into()), bulk("spate")),
            (Reply::SimpleString("pending".into()), Reply::Int(0)),
            (Reply::SimpleString("lag".into()), Reply::Int(12)),
        ])]);
        assert_eq!(
            group_counts(&reply, "spate").unwrap(),
            Some(GroupCounts {
                pending: 0,
                lag: Some(12)
            })
        );
        // Redis 6.2 has no lag field at all.
        let reply = Reply::Array(vec![Reply::Array(vec![
            bulk("name"),
            bulk("spate"),
            bulk("consumers"),
            Reply::Int(0),
            bulk("pending"),
            Reply::Int(5),
            bulk("last-delivered-id"),
            bulk("0-0"),
        ])]);
        assert_eq!(
            group_counts(&reply, "spate").unwrap(),
            Some(GroupCounts {
                pending: 5,
                lag: None
            })
        );
        // No such group, and no groups at all.
        assert_eq!(group_counts(&reply, "missing").unwrap(), None);
        assert_eq!(group_counts(&Reply::Array(vec![]), "spate").unwrap(), None);
        // Not an XINFO GROUPS reply.
        assert!(group_counts(&Reply::Nil, "spate").is_err());
        assert!(group_counts(&Reply::Array(vec![Reply::Int(1)]), "spate").is_err());
        let without_pending = Reply::Array(vec![Reply::Array(vec![bulk("name"), bulk("spate")])]);
        assert!(group_counts(&without_pending, "spate").is_err());
    }
}
