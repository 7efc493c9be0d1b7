//! Webhook caller authentication: a bearer token, or an HMAC-SHA256 signature of the raw
//! body (optionally of `"<timestamp>.<body>"`, with replay protection). The comparisons take
//! constant time, and the resolved secrets never leave this module (no `Debug`, no logging,
//! their headers are kept out of events).
//!
//! Replay protection, when the HMAC rule has a timestamp: the caller sends unix seconds in the
//! timestamp header and signs `"<timestamp>.<raw body>"`, so the timestamp cannot be changed
//! without the secret. A request more than `tolerance` away from Spate's clock is refused
//! (401), and within the window each signature is accepted once: a second request with the
//! same signature gets 409. Only requests whose signature verified are remembered, so callers
//! without the secret cannot fill the memory.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName, StatusCode, header};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// The most signatures remembered per webhook path. Each entry is about 100 bytes, so this
/// bounds the memory at roughly 10 MB per path; see [`SeenSignatures`] for what happens when
/// it is full.
pub(super) const MAX_SEEN_SIGNATURES: usize = 100_000;

/// An HMAC-SHA256 is 32 bytes.
type Signature = [u8; 32];

/// A resolved authentication rule.
pub(super) enum Authenticator {
    Bearer {
        token: Vec<u8>,
    },
    Hmac {
        secret: Vec<u8>,
        header: HeaderName,
        /// `None`: the signature covers the body only and replays are possible.
        timestamp: Option<TimestampRule>,
    },
    None,
}

/// Timestamped signing: where the timestamp is and how far from now it may be.
pub(super) struct TimestampRule {
    pub(super) header: HeaderName,
    /// Whole seconds, at least 1.
    pub(super) tolerance: u64,
    pub(super) seen: SeenSignatures,
}

impl TimestampRule {
    pub(super) fn new(header: HeaderName, tolerance: u64, capacity: usize) -> TimestampRule {
        TimestampRule {
            header,
            tolerance: tolerance.max(1),
            seen: SeenSignatures::new(capacity),
        }
    }
}

/// Why a request is refused, and with which status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Refusal {
    pub(super) status: StatusCode,
    pub(super) message: Cow<'static, str>,
    /// For 503: when a retry can succeed, in seconds.
    pub(super) retry_after: Option<u64>,
}

impl Refusal {
    fn unauthorized(message: impl Into<Cow<'static, str>>) -> Refusal {
        Refusal {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            retry_after: None,
        }
    }
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Authenticator::Bearer { .. } => "Bearer(redacted)",
            Authenticator::Hmac {
                timestamp: None, ..
            } => "Hmac(redacted)",
            Authenticator::Hmac {
                timestamp: Some(_), ..
            } => "Hmac(redacted, timestamped)",
            Authenticator::None => "None",
        })
    }
}

/// Spate's clock, in unix seconds.
pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

impl Authenticator {
    /// Checks what can be checked before reading the body: the bearer token, the presence of
    /// the signature, and the timestamp's window. `now` is in unix seconds.
    pub(super) fn check_headers(&self, headers: &HeaderMap, now: u64) -> Result<(), Refusal> {
        match self {
            Authenticator::Bearer { token } => {
                let given = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "))
                    .ok_or_else(|| {
                        Refusal::unauthorized("missing `Authorization: Bearer` header")
                    })?;
                if bool::from(given.ct_eq(token)) {
                    Ok(())
                } else {
                    Err(Refusal::unauthorized("wrong bearer token"))
                }
            }
            Authenticator::Hmac {
                header, timestamp, ..
            } => {
                if headers.get(header).is_none() {
                    return Err(Refusal::unauthorized("missing signature header"));
                }
                match timestamp {
                    Some(rule) => rule.check_window(headers, now).map(|_| ()),
                    None => Ok(()),
                }
            }
            Authenticator::None => Ok(()),
        }
    }

    /// Checks the signature, for HMAC, and with a timestamp, that this signature was not
    /// accepted before. The returned [`Seen`] keeps the signature marked as seen only if
    /// [`Seen::keep`] is called (once the request is accepted); dropped, it forgets the
    /// signature, so a caller can retry a request Spate refused for another reason.
    pub(super) fn check_body(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: u64,
    ) -> Result<Option<Seen<'_>>, Refusal> {
        let Authenticator::Hmac {
            secret,
            header,
            timestamp,
        } = self
        else {
            return Ok(None);
        };
        let given = headers
            .get(header)
            .map(|value| value.as_bytes())
            .ok_or_else(|| Refusal::unauthorized("missing signature header"))?;
        let hex = given.strip_prefix(b"sha256=").unwrap_or(given);
        let signature = data_encoding::HEXLOWER_PERMISSIVE
            .decode(hex)
            .map_err(|_| Refusal::unauthorized("the signature is not hex"))?;
        let mut mac = Hmac::<Sha256>::new_from_slice(secret)
            .map_err(|_| Refusal::unauthorized("the signature cannot be checked"))?;
        let Some(rule) = timestamp else {
            mac.update(body);
            mac.verify_slice(&signature)
                .map_err(|_| Refusal::unauthorized("wrong signature"))?;
            return Ok(None);
        };
        let (text, signed_at) = rule.check_window(headers, now)?;
        for part in signing_input(text, body) {
            mac.update(part);
        }
        mac.verify_slice(&signature).map_err(|_| {
            Refusal::unauthorized(format!(
                "wrong signature: sign \"<timestamp>.<body>\" with the {} header's exact value",
                rule.header
            ))
        })?;
        // Verified, so exactly 32 bytes.
        let signature: Signature = signature
            .try_into()
            .map_err(|_| Refusal::unauthorized("wrong signature"))?;
        let expires = signed_at.saturating_add(rule.tolerance);
        rule.seen.insert(signature, expires, now)?;
        Ok(Some(Seen {
            seen: &rule.seen,
            signature,
            expires,
            kept: false,
        }))
    }

    /// Whether `name` carries a credential, to keep it out of events.
    pub(super) fn is_credential_header(&self, name: &HeaderName) -> bool {
        matches!(self, Authenticator::Hmac { header, .. } if header == name)
    }
}

/// What a timestamped caller signs, in parts (the body is not copied):
/// `"<timestamp>.<raw body>"`, the timestamp exactly as sent in its header.
pub(super) fn signing_input<'a>(timestamp: &'a [u8], body: &'a [u8]) -> [&'a [u8]; 3] {
    [timestamp, b".", body]
}

impl TimestampRule {
    /// The timestamp header's exact bytes and their value, if within `tolerance` of `now`.
    fn check_window<'h>(
        &self,
        headers: &'h HeaderMap,
        now: u64,
    ) -> Result<(&'h [u8], u64), Refusal> {
        let text = headers
            .get(&self.header)
            .map(|value| value.as_bytes())
            .ok_or_else(|| {
                Refusal::unauthorized(format!(
                    "missing {} header: send the current unix time in seconds and sign \"<timestamp>.<body>\"",
                    self.header
                ))
            })?;
        let signed_at = parse_unix_seconds(text).ok_or_else(|| {
            Refusal::unauthorized(format!(
                "the {} header must be unix seconds (digits only)",
                self.header
            ))
        })?;
        let tolerance = self.tolerance;
        if signed_at.saturating_add(tolerance) < now {
            return Err(Refusal::unauthorized(format!(
                "the timestamp is {}s in the past, outside the {tolerance}s tolerance: sign each request with the current time",
                now - signed_at
            )));
        }
        if signed_at > now.saturating_add(tolerance) {
            return Err(Refusal::unauthorized(format!(
                "the timestamp is {}s in the future, outside the {tolerance}s tolerance: check the caller's clock",
                signed_at - now
            )));
        }
        Ok((text, signed_at))
    }
}

/// Unix seconds: 1 to 12 ASCII digits (up to year 33658), nothing else.
fn parse_unix_seconds(text: &[u8]) -> Option<u64> {
    if text.is_empty() || text.len() > 12 || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

/// The signatures accepted within the tolerance window, for one webhook path, each with the
/// unix second after which its timestamp is outside the window (`timestamp + tolerance`).
///
/// Forgetting an entry once that second has passed is safe: a replay of it is then refused by
/// the window check, whatever the set holds. Forgetting an entry *earlier* would re-open the
/// replay, so when the set is full of entries still inside the window a new request is
/// refused with 503 and a `Retry-After` of when the oldest one expires, instead of evicting
/// one. Only verified signatures enter the set, so only a caller holding the secret can fill
/// it (more than [`MAX_SEEN_SIGNATURES`] accepted requests within the window: about 330 per
/// second sustained with a 5-minute tolerance); an unauthenticated flood cannot. The window
/// follows the wall clock: a backwards step of the clock larger than the tolerance can bring
/// a forgotten timestamp back into the window.
pub(super) struct SeenSignatures {
    capacity: usize,
    inner: Mutex<SeenInner>,
}

#[derive(Default)]
struct SeenInner {
    expiry: HashMap<Signature, u64>,
    /// The same entries ordered by expiry, oldest first, to evict in order.
    by_expiry: BTreeSet<(u64, Signature)>,
}

impl SeenSignatures {
    pub(super) fn new(capacity: usize) -> SeenSignatures {
        SeenSignatures {
            capacity: capacity.max(1),
            inner: Mutex::new(SeenInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SeenInner> {
        // Every update leaves both maps consistent before it can panic, so keep serving.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `signature` (valid until `expires`), refusing a replay (409) or, when full of
    /// unexpired entries, the request (503). Expired entries are forgotten first.
    fn insert(&self, signature: Signature, expires: u64, now: u64) -> Result<(), Refusal> {
        let mut inner = self.lock();
        while let Some(&(oldest, key)) = inner.by_expiry.first() {
            if oldest >= now {
                break;
            }
            inner.by_expiry.pop_first();
            inner.expiry.remove(&key);
        }
        if inner.expiry.contains_key(&signature) {
            return Err(Refusal {
                status: StatusCode::CONFLICT,
                message: "replay: a request with this signature was already accepted (or is being handled); sign each new request with a fresh timestamp".into(),
                retry_after: None,
            });
        }
        if inner.expiry.len() >= self.capacity {
            let oldest = inner.by_expiry.first().map_or(now, |&(expires, _)| expires);
            return Err(Refusal {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: format!(
                    "too many signed requests within the tolerance window ({} remembered); retry later",
                    self.capacity
                )
                .into(),
                // Entries are kept through their expiry second and forgotten after it.
                retry_after: Some(oldest.saturating_sub(now) + 1),
            });
        }
        inner.expiry.insert(signature, expires);
        inner.by_expiry.insert((expires, signature));
        Ok(())
    }

    fn remove(&self, signature: &Signature, expires: u64) {
        let mut inner = self.lock();
        if inner.expiry.get(signature) == Some(&expires) {
            inner.expiry.remove(signature);
            inner.by_expiry.remove(&(expires, *signature));
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        let inner = self.lock();
        assert_eq!(inner.expiry.len(), inner.by_expiry.len());
        inner.expiry.len()
    }
}

/// A signature marked as seen for the duration of a request; see
/// [`Authenticator::check_body`].
#[must_use = "dropping it forgets the signature; call keep() once the request is accepted"]
pub(super) struct Seen<'a> {
    seen: &'a SeenSignatures,
    signature: Signature,
    expires: u64,
    kept: bool,
}

impl Seen<'_> {
    /// An event id for a request without an `Idempotency-Key`: the same signed request gives
    /// the same id in any process, so its Job name.
    pub(super) fn event_id(&self) -> String {
        format!(
            "hmac-{}",
            data_encoding::HEXLOWER.encode(&self.signature[..16])
        )
    }

    /// The request was accepted: replays of it are refused until it leaves the window.
    pub(super) fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Seen<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.seen.remove(&self.signature, self.expires);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const NOW: u64 = 1_800_000_000;

    fn sign(secret: &[u8], body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(body);
        data_encoding::HEXLOWER.encode(&mac.finalize().into_bytes())
    }

    fn timestamped(tolerance: u64, capacity: usize) -> Authenticator {
        Authenticator::Hmac {
            secret: b"s3cret".to_vec(),
            header: HeaderName::from_static("x-sig"),
            timestamp: Some(TimestampRule::new(
                HeaderName::from_static("x-ts"),
                tolerance,
                capacity,
            )),
        }
    }

    /// Headers of a request signed at `at` over `body`.
    fn signed(at: u64, body: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let at = at.to_string();
        let signature = sign(b"s3cret", &signing_input(at.as_bytes(), body).concat());
        headers.insert("x-ts", HeaderValue::from_str(&at).unwrap());
        headers.insert(
            "x-sig",
            HeaderValue::from_str(&format!("sha256={signature}")).unwrap(),
        );
        headers
    }

    fn status(result: Result<Option<Seen<'_>>, Refusal>) -> u16 {
        match result {
            Ok(Some(seen)) => {
                seen.keep();
                200
            }
            Ok(None) => panic!("a timestamped rule always returns a Seen"),
            Err(refusal) => refusal.status.as_u16(),
        }
    }

    #[test]
    fn hmac_accepts_bare_and_prefixed_hex_and_refuses_others() {
        let auth = Authenticator::Hmac {
            secret: b"s3cret".to_vec(),
            header: HeaderName::from_static("x-sig"),
            timestamp: None,
        };
        let body = br#"{"a":1}"#;
        let mut headers = HeaderMap::new();
        let signature = sign(b"s3cret", body);
        headers.insert("x-sig", HeaderValue::from_str(&signature).unwrap());
        assert!(matches!(auth.check_body(&headers, body, NOW), Ok(None)));
        // Without a timestamp, the same request is accepted again: no replay protection.
        assert!(matches!(auth.check_body(&headers, body, NOW), Ok(None)));
        let upper = format!("sha256={}", signature.to_uppercase());
        headers.insert("x-sig", HeaderValue::from_str(&upper).unwrap());
        assert!(matches!(auth.check_body(&headers, body, NOW), Ok(None)));
        headers.insert(
            "x-sig",
            HeaderValue::from_str(&sign(b"other", body)).unwrap(),
        );
        let refusal = auth.check_body(&headers, body, NOW).err().unwrap();
        assert_eq!(refusal, Refusal::unauthorized("wrong signature"));
        headers.insert("x-sig", HeaderValue::from_static("zz"));
        let refusal = auth.check_body(&headers, body, NOW).err().unwrap();
        assert_eq!(refusal, Refusal::unauthorized("the signature is not hex"));
    }

    #[test]
    fn the_signing_input_is_the_timestamp_a_dot_and_the_raw_body() {
        assert_eq!(
            signing_input(b"1800000000", br#"{"a": 1}"#).concat(),
            br#"1800000000.{"a": 1}"#
        );
        assert_eq!(signing_input(b"1", b"").concat(), b"1.");
        // The shell recipe in docs/pipeline.md, `printf '%s.%s' "$ts" "$body" | openssl dgst
        // -sha256 -hmac s3cret`, gives this for these values.
        let auth = timestamped(300, 10);
        let body = br#"{"a":1}"#;
        let headers = signed(NOW, body);
        assert_eq!(
            headers["x-sig"],
            "sha256=476d445fc5d734bcaf69961f0de38cb8c2ec42450829655895ca5e064c0765c9"
        );
        assert_eq!(status(auth.check_body(&headers, body, NOW)), 200);
        // A body-only signature does not pass a timestamped rule.
        let mut body_only = headers.clone();
        body_only.insert(
            "x-sig",
            HeaderValue::from_str(&sign(b"s3cret", body)).unwrap(),
        );
        assert_eq!(status(auth.check_body(&body_only, body, NOW)), 401);
    }

    #[test]
    fn the_signature_covers_the_timestamp() {
        let auth = timestamped(300, 10);
        let body = br#"{"a":1}"#;
        let mut headers = signed(NOW, body);
        // Another timestamp, still within the window, without re-signing.
        headers.insert(
            "x-ts",
            HeaderValue::from_str(&(NOW + 1).to_string()).unwrap(),
        );
        assert_eq!(auth.check_headers(&headers, NOW), Ok(()));
        let refusal = auth.check_body(&headers, body, NOW).err().unwrap();
        assert_eq!(refusal.status, StatusCode::UNAUTHORIZED);
        assert!(
            refusal.message.starts_with("wrong signature"),
            "{refusal:?}"
        );
        // The same number written differently is a different signing input.
        headers.insert("x-ts", HeaderValue::from_str(&format!("0{NOW}")).unwrap());
        assert_eq!(status(auth.check_body(&headers, body, NOW)), 401);
    }

    #[test]
    fn the_window_is_tolerance_either_side_of_now() {
        let auth = timestamped(300, 100);
        let body = b"{}";
        for (at, expected) in [
            (NOW, 200),
            (NOW - 300, 200),
            (NOW + 300, 200),
            (NOW - 301, 401),
            (NOW + 301, 401),
            (0, 401),
            (NOW + 86_400, 401),
        ] {
            let headers = signed(at, body);
            let from_headers = auth
                .check_headers(&headers, NOW)
                .map_err(|r| r.status.as_u16());
            assert_eq!(
                from_headers.err().unwrap_or(200),
                expected,
                "headers, signed at now{:+}",
                at as i64 - NOW as i64
            );
            assert_eq!(
                status(auth.check_body(&headers, body, NOW)),
                expected,
                "body, signed at now{:+}",
                at as i64 - NOW as i64
            );
        }
        let old = auth
            .check_headers(&signed(NOW - 400, body), NOW)
            .err()
            .unwrap();
        assert!(old.message.contains("400s in the past"), "{old:?}");
        let ahead = auth
            .check_headers(&signed(NOW + 400, body), NOW)
            .err()
            .unwrap();
        assert!(ahead.message.contains("400s in the future"), "{ahead:?}");
    }

    #[test]
    fn a_missing_or_malformed_timestamp_is_refused() {
        let auth = timestamped(300, 10);
        let body = b"{}";
        let mut headers = signed(NOW, body);
        headers.remove("x-ts");
        let refusal = auth.check_headers(&headers, NOW).err().unwrap();
        assert_eq!(refusal.status, StatusCode::UNAUTHORIZED);
        assert!(
            refusal.message.contains("missing x-ts header"),
            "{refusal:?}"
        );
        assert_eq!(status(auth.check_body(&headers, body, NOW)), 401);
        for bad in [
            "",
            "abc",
            "-1",
            "+1800000000",
            " 1800000000",
            "1800000000.5",
            "1800000000000",
            "1.8e9",
        ] {
            headers.insert("x-ts", HeaderValue::from_str(bad).unwrap());
            let refusal = auth.check_headers(&headers, NOW).err().unwrap();
            assert!(
                refusal.message.contains("unix seconds"),
                "{bad:?}: {refusal:?}"
            );
        }
    }

    #[test]
    fn a_signature_is_accepted_once_within_the_window() {
        let auth = timestamped(300, 100);
        let body = br#"{"n":1}"#;
        let headers = signed(NOW, body);
        assert_eq!(status(auth.check_body(&headers, body, NOW)), 200);
        let replay = auth.check_body(&headers, body, NOW + 10).err().unwrap();
        assert_eq!(replay.status, StatusCode::CONFLICT);
        assert!(replay.message.starts_with("replay"), "{replay:?}");
        // The same signature written in upper case is the same signature.
        let mut upper = headers.clone();
        let text = headers["x-sig"]
            .to_str()
            .unwrap()
            .to_uppercase()
            .replace("SHA256=", "");
        upper.insert("x-sig", HeaderValue::from_str(&text).unwrap());
        assert_eq!(status(auth.check_body(&upper, body, NOW + 10)), 409);
        // Once outside the window it is forgotten, and refused by the window instead.
        assert_eq!(status(auth.check_body(&headers, body, NOW + 301)), 401);
        // Another timestamp is another request.
        assert_eq!(
            status(auth.check_body(&signed(NOW + 1, body), body, NOW)),
            200
        );
    }

    #[test]
    fn a_signature_not_kept_can_be_sent_again() {
        let auth = timestamped(300, 100);
        let body = b"{}";
        let headers = signed(NOW, body);
        let first = auth.check_body(&headers, body, NOW).unwrap().unwrap();
        // While the first is being handled, the same request is refused.
        assert_eq!(status(auth.check_body(&headers, body, NOW)), 409);
        // The first was refused later (e.g. 503): dropping it forgets the signature.
        drop(first);
        assert_eq!(status(auth.check_body(&headers, body, NOW)), 200);
        assert_eq!(status(auth.check_body(&headers, body, NOW)), 409);
    }

    #[test]
    fn expired_signatures_are_evicted_and_a_full_set_refuses_instead_of_forgetting() {
        let seen = SeenSignatures::new(3);
        let key = |n: u8| [n; 32];
        // Expiries out of order, as timestamps within the window can be.
        seen.insert(key(1), NOW + 20, NOW).unwrap();
        seen.insert(key(2), NOW + 10, NOW).unwrap();
        seen.insert(key(3), NOW + 30, NOW).unwrap();
        assert_eq!(seen.len(), 3);
        // Full of unexpired entries: refused with 503 until the oldest expires, nothing
        // forgotten.
        let full = seen.insert(key(4), NOW + 40, NOW + 5).err().unwrap();
        assert_eq!(full.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(full.retry_after, Some(6));
        assert_eq!(seen.len(), 3);
        assert_eq!(
            seen.insert(key(2), NOW + 10, NOW + 5).err().unwrap().status,
            StatusCode::CONFLICT
        );
        // At its expiry second an entry is still kept (the window includes it)...
        assert_eq!(
            seen.insert(key(4), NOW + 40, NOW + 10)
                .err()
                .unwrap()
                .status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        // ...and after it, the oldest (key 2) is evicted first, and only it.
        seen.insert(key(4), NOW + 40, NOW + 11).unwrap();
        assert_eq!(seen.len(), 3);
        assert_eq!(
            seen.insert(key(1), NOW + 20, NOW + 11)
                .err()
                .unwrap()
                .status,
            StatusCode::CONFLICT
        );
        // Later everything older than now goes at once.
        seen.insert(key(5), NOW + 100, NOW + 35).unwrap();
        assert_eq!(seen.len(), 2);
        // The bound holds over many requests: never more than the capacity.
        let many = SeenSignatures::new(1000);
        for n in 0..5000u64 {
            let mut signature = [0u8; 32];
            signature[..8].copy_from_slice(&n.to_be_bytes());
            // One request a second, each valid for 300s: 301 are alive at any time.
            many.insert(signature, NOW + n + 300, NOW + n).unwrap();
            assert!(many.len() <= 301);
        }
    }

    #[test]
    fn bearer_needs_the_exact_token() {
        let auth = Authenticator::Bearer {
            token: b"t0ken".to_vec(),
        };
        let mut headers = HeaderMap::new();
        assert!(auth.check_headers(&headers, NOW).is_err());
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer t0ke"),
        );
        assert_eq!(
            auth.check_headers(&headers, NOW),
            Err(Refusal::unauthorized("wrong bearer token"))
        );
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer t0ken"),
        );
        assert_eq!(auth.check_headers(&headers, NOW), Ok(()));
        assert_eq!(format!("{auth:?}"), "Bearer(redacted)");
        assert_eq!(
            format!("{:?}", timestamped(300, 1)),
            "Hmac(redacted, timestamped)"
        );
    }
}
