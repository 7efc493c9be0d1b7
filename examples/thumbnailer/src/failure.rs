//! Why a run failed, and the exit code that tells it.
//!
//! The codes split permanent failures (a bad event, a file that is not an image: retrying the
//! pod cannot help) from ones that may pass on a retry (the store could not be read or
//! written), so a Job's `podFailurePolicy` can tell them apart.

use std::fmt;
use std::process::ExitCode;

/// What kind of failure; each has its own exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The event is missing or unusable (bad JSON, no `url`, index out of range): exit 3.
    Input,
    /// The image could not be read from its URL: exit 4.
    Read,
    /// The object is not an image this worker reads (JPEG, PNG), or is damaged: exit 5.
    Image,
    /// The thumbnail could not be written: exit 6.
    Write,
}

impl Kind {
    pub fn exit_code(self) -> ExitCode {
        ExitCode::from(match self {
            Kind::Input => 3,
            Kind::Read => 4,
            Kind::Image => 5,
            Kind::Write => 6,
        })
    }
}

/// A failure: its kind and a message for one line of stderr.
#[derive(Debug, PartialEq, Eq)]
pub struct Failure {
    pub kind: Kind,
    pub message: String,
}

impl Failure {
    pub fn input(message: impl Into<String>) -> Self {
        Self::new(Kind::Input, message)
    }

    pub fn read(message: impl Into<String>) -> Self {
        Self::new(Kind::Read, message)
    }

    pub fn image(message: impl Into<String>) -> Self {
        Self::new(Kind::Image, message)
    }

    pub fn write(message: impl Into<String>) -> Self {
        Self::new(Kind::Write, message)
    }

    fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    /// The message on one line: line breaks from nested errors become spaces.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut words = self.message.split_whitespace();
        if let Some(first) = words.next() {
            f.write_str(first)?;
        }
        for word in words {
            write!(f, " {word}")?;
        }
        Ok(())
    }
}

/// An error and its sources, joined with `: ` (`reqwest` and `object_store` keep the useful
/// part, e.g. "connection refused", in the source).
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_prints_on_one_line() {
        let failure = Failure::read("cannot read s3://b/k:\n  connection\trefused\n");
        assert_eq!(
            failure.to_string(),
            "cannot read s3://b/k: connection refused"
        );
    }

    #[test]
    fn each_kind_has_its_own_exit_code() {
        let codes = [Kind::Input, Kind::Read, Kind::Image, Kind::Write].map(Kind::exit_code);
        for (i, code) in codes.iter().enumerate() {
            assert_ne!(*code, ExitCode::SUCCESS);
            assert!(codes[i + 1..].iter().all(|other| other != code));
        }
    }

    #[test]
    fn a_chain_names_each_cause_once() {
        let inner = std::io::Error::other("connection refused");
        let outer = std::io::Error::other(inner);
        assert_eq!(chain(&outer), "connection refused");
    }
}
