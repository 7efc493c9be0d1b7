//! Webhook caller authentication: a bearer token, or an HMAC-SHA256 signature of the raw
//! body. Both comparisons take constant time, and the resolved secrets never leave this
//! module (no `Debug`, no logging, their headers are kept out of events).

use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName, header};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// A resolved authentication rule.
pub(super) enum Authenticator {
    Bearer { token: Vec<u8> },
    Hmac { secret: Vec<u8>, header: HeaderName },
    None,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Authenticator::Bearer { .. } => "Bearer(redacted)",
            Authenticator::Hmac { .. } => "Hmac(redacted)",
            Authenticator::None => "None",
        })
    }
}

impl Authenticator {
    /// Checks what can be checked before reading the body.
    pub(super) fn check_headers(&self, headers: &HeaderMap) -> Result<(), &'static str> {
        match self {
            Authenticator::Bearer { token } => {
                let given = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "))
                    .ok_or("missing `Authorization: Bearer` header")?;
                if bool::from(given.ct_eq(token)) {
                    Ok(())
                } else {
                    Err("wrong bearer token")
                }
            }
            Authenticator::Hmac { header, .. } => match headers.get(header) {
                Some(_) => Ok(()),
                None => Err("missing signature header"),
            },
            Authenticator::None => Ok(()),
        }
    }

    /// Checks the body's signature, for HMAC.
    pub(super) fn check_body(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), &'static str> {
        let Authenticator::Hmac { secret, header } = self else {
            return Ok(());
        };
        let given = headers
            .get(header)
            .map(|value| value.as_bytes())
            .ok_or("missing signature header")?;
        let hex = given.strip_prefix(b"sha256=").unwrap_or(given);
        let signature = data_encoding::HEXLOWER_PERMISSIVE
            .decode(hex)
            .map_err(|_| "the signature is not hex")?;
        let mut mac = Hmac::<Sha256>::new_from_slice(secret)
            .map_err(|_| "the signature cannot be checked")?;
        mac.update(body);
        mac.verify_slice(&signature).map_err(|_| "wrong signature")
    }

    /// Whether `name` carries a credential, to keep it out of events.
    pub(super) fn is_credential_header(&self, name: &HeaderName) -> bool {
        matches!(self, Authenticator::Hmac { header, .. } if header == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn sign(secret: &[u8], body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(body);
        data_encoding::HEXLOWER.encode(&mac.finalize().into_bytes())
    }

    #[test]
    fn hmac_accepts_bare_and_prefixed_hex_and_refuses_others() {
        let auth = Authenticator::Hmac {
            secret: b"s3cret".to_vec(),
            header: HeaderName::from_static("x-sig"),
        };
        let body = br#"{"a":1}"#;
        let mut headers = HeaderMap::new();
        let signature = sign(b"s3cret", body);
        headers.insert("x-sig", HeaderValue::from_str(&signature).unwrap());
        assert_eq!(auth.check_body(&headers, body), Ok(()));
        let upper = format!("sha256={}", signature.to_uppercase());
        headers.insert("x-sig", HeaderValue::from_str(&upper).unwrap());
        assert_eq!(auth.check_body(&headers, body), Ok(()));
        headers.insert(
            "x-sig",
            HeaderValue::from_str(&sign(b"other", body)).unwrap(),
        );
        assert_eq!(auth.check_body(&headers, body), Err("wrong signature"));
        headers.insert("x-sig", HeaderValue::from_static("zz"));
        assert_eq!(
            auth.check_body(&headers, body),
            Err("the signature is not hex")
        );
    }

    #[test]
    fn bearer_needs_the_exact_token() {
        let auth = Authenticator::Bearer {
            token: b"t0ken".to_vec(),
        };
        let mut headers = HeaderMap::new();
        assert!(auth.check_headers(&headers).is_err());
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer t0ke"),
        );
        assert_eq!(auth.check_headers(&headers), Err("wrong bearer token"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer t0ken"),
        );
        assert_eq!(auth.check_headers(&headers), Ok(()));
        assert_eq!(format!("{auth:?}"), "Bearer(redacted)");
    }
}
