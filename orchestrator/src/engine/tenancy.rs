//! What of the Spate process's own authority a Pipeline may use, by its namespace.
//!
//! In controller mode one Spate serves Pipelines written by many people, and the process has
//! what none of them should borrow unasked: environment variables holding the operator's
//! broker credentials, the cloud identity its object-store clients fall back to, and its
//! filesystem. A Pipeline reaches those only where the operator granted them to its
//! namespace: one environment variable to a list of namespaces (`--grant-env`), or all of it
//! to a namespace that is the operator's own (`--trust-namespace`). Secrets of the Pipeline's
//! own namespace (`secretKeyRef`) need no grant. `spate run -f` is single-tenant: whoever
//! started the process wrote its pipelines, so everything is theirs.

use std::collections::{BTreeMap, BTreeSet};

use spate_sources::secret::SecretError;

/// The namespace that stands for every namespace in a grant.
pub const EVERY_NAMESPACE: &str = "*";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tenancy {
    /// `spate run -f`, `spate dev`: every pipeline may use all of the process.
    SingleTenant,
    /// Controller mode: only what the operator granted.
    Granted(Grants),
}

/// The operator's grants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grants {
    /// Namespaces whose Pipelines may use all of the process's authority.
    pub trusted: BTreeSet<String>,
    /// Environment variable → the namespaces that may name it with `{env: NAME}`.
    pub env: BTreeMap<String, BTreeSet<String>>,
}

impl Grants {
    /// Reads one `--grant-env NAME=NAMESPACE[,NAMESPACE...]` flag into the grants.
    pub fn add_env_grant(&mut self, flag: &str) -> Result<(), String> {
        let (name, namespaces) = flag.split_once('=').ok_or_else(|| {
            format!("`{flag}` is not NAME=NAMESPACE[,NAMESPACE...], e.g. SPATE_AMQP_URL=team-a")
        })?;
        if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == ',') {
            return Err(format!(
                "`{flag}`: `{name}` is not an environment variable name"
            ));
        }
        let namespaces: BTreeSet<String> = namespaces
            .split(',')
            .map(str::trim)
            .filter(|namespace| !namespace.is_empty())
            .map(str::to_string)
            .collect();
        if namespaces.is_empty() {
            return Err(format!(
                "`{flag}` names no namespace; `{name}=*` grants it to every namespace"
            ));
        }
        self.env
            .entry(name.to_string())
            .or_default()
            .extend(namespaces);
        Ok(())
    }
}

impl Tenancy {
    /// What a Pipeline of `namespace` may use.
    pub fn for_namespace(&self, namespace: &str) -> Authority {
        let grants = match self {
            Tenancy::SingleTenant => return Authority::whole_process(namespace),
            Tenancy::Granted(grants) => grants,
        };
        let granted_to =
            |set: &BTreeSet<String>| set.contains(namespace) || set.contains(EVERY_NAMESPACE);
        if granted_to(&grants.trusted) {
            return Authority::whole_process(namespace);
        }
        Authority {
            namespace: namespace.to_string(),
            whole_process: false,
            env: grants
                .env
                .iter()
                .filter(|(_, namespaces)| granted_to(namespaces))
                .map(|(name, _)| name.clone())
                .collect(),
        }
    }
}

/// What one Pipeline may use of the process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authority {
    namespace: String,
    whole_process: bool,
    env: BTreeSet<String>,
}

impl Authority {
    fn whole_process(namespace: &str) -> Authority {
        Authority {
            namespace: namespace.to_string(),
            whole_process: true,
            env: BTreeSet::new(),
        }
    }

    pub fn may_read_env(&self, name: &str) -> Result<(), SecretError> {
        if self.whole_process || self.env.contains(name) {
            Ok(())
        } else {
            Err(self.refusal(format!("environment variable {name}")))
        }
    }

    pub fn may_act_as_process(&self, what: &str) -> Result<(), SecretError> {
        if self.whole_process {
            Ok(())
        } else {
            Err(self.refusal(what.to_string()))
        }
    }

    fn refusal(&self, what: String) -> SecretError {
        SecretError::NotGranted {
            what,
            namespace: self.namespace.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(env: &[&str], trusted: &[&str]) -> Tenancy {
        let mut grants = Grants {
            trusted: trusted.iter().map(|ns| ns.to_string()).collect(),
            ..Grants::default()
        };
        for flag in env {
            grants.add_env_grant(flag).unwrap();
        }
        Tenancy::Granted(grants)
    }

    #[test]
    fn an_env_grant_reaches_only_its_namespaces() {
        let tenancy = grants(&["AMQP_URL=team-a,ops", "S3_KEY=team-b"], &[]);
        let team_a = tenancy.for_namespace("team-a");
        assert_eq!(team_a.may_read_env("AMQP_URL"), Ok(()));
        let refused = team_a.may_read_env("S3_KEY").unwrap_err().to_string();
        assert!(
            refused.contains("environment variable S3_KEY")
                && refused.contains("namespace team-a")
                && refused.contains("--grant-env NAME=team-a"),
            "{refused}"
        );
        assert!(
            team_a
                .may_act_as_process("the local folder file:///etc")
                .is_err()
        );
        assert!(
            tenancy
                .for_namespace("team-c")
                .may_read_env("AMQP_URL")
                .is_err()
        );
    }

    #[test]
    fn a_trusted_namespace_and_a_single_tenant_process_may_use_everything() {
        let tenancy = grants(&[], &["ops"]);
        let ops = tenancy.for_namespace("ops");
        assert_eq!(ops.may_read_env("ANYTHING"), Ok(()));
        assert_eq!(
            ops.may_act_as_process("the local folder file:///data"),
            Ok(())
        );
        assert!(
            tenancy
                .for_namespace("team-a")
                .may_read_env("ANYTHING")
                .is_err()
        );
        let single = Tenancy::SingleTenant.for_namespace("default");
        assert_eq!(single.may_act_as_process("anything"), Ok(()));
    }

    #[test]
    fn a_star_grants_every_namespace() {
        let tenancy = grants(&["SHARED_URL=*"], &[]);
        assert_eq!(
            tenancy.for_namespace("any").may_read_env("SHARED_URL"),
            Ok(())
        );
        assert!(tenancy.for_namespace("any").may_read_env("OTHER").is_err());
    }

    #[test]
    fn malformed_grants_are_refused_with_the_form_expected() {
        let mut grants = Grants::default();
        for bad in ["AMQP_URL", "=team-a", "AMQP_URL=", "AMQP_URL= , "] {
            let error = grants.add_env_grant(bad).unwrap_err();
            assert!(error.contains(bad), "{error}");
        }
        assert!(grants.env.is_empty());
    }
}
