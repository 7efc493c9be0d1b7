//! What a Pipeline's pods may do: the Kubernetes Pod Security Standards, chosen by the
//! operator per namespace, and enforced by Spate before a Job exists.
//!
//! Whoever may write a Pipeline makes pods through Spate's ServiceAccount, so without a check
//! a Pipeline is a way to run a privileged pod, mount the node's disk or join its network in
//! any namespace the controller serves. Each pipeline gets a [`Level`] (the operator's
//! default, `restricted` unless changed, or the one given to its namespace), checked twice:
//! on the template when the pipeline is loaded, naming the field and its line, and on every
//! rendered pod, since a placeholder may render into a field the template left open (an added
//! capability, a volume path). A rendered pod that breaks its level is dead-lettered with the
//! reason.
//!
//! Before either check the pod gets the `restricted` profile's settings field by field
//! ([`harden`]): a template that sets `fsGroup` keeps the default seccomp profile, and one
//! that sets a container's `runAsUser` keeps `allowPrivilegeEscalation: false`. A default is
//! left out only where it would contradict what the template wrote (no `runAsNonRoot` beside
//! `runAsUser: 0`, no `allowPrivilegeEscalation: false` on a privileged container).
//!
//! The checks follow the Pod Security Standards of Kubernetes 1.28
//! (<https://kubernetes.io/docs/concepts/security/pod-security-standards/>) for every field
//! of the pod spec. AppArmor annotations on the pod's metadata are left to the API server's
//! own admission.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, PodSecurityContext, PodSpec, SeccompProfile, SecurityContext,
};

/// A Pod Security Standards profile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Level {
    /// Anything the API server takes.
    Privileged,
    /// No known privilege escalation: no host namespaces, privileged containers, host paths
    /// or host ports, and only the default capabilities.
    Baseline,
    /// Baseline, and the pod runs as non-root with every capability dropped (but
    /// `NET_BIND_SERVICE`), no privilege escalation, a seccomp profile, and only volumes that
    /// hold no node data.
    #[default]
    Restricted,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Privileged => "privileged",
            Level::Baseline => "baseline",
            Level::Restricted => "restricted",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Level {
    type Err = String;

    fn from_str(text: &str) -> Result<Level, String> {
        match text {
            "privileged" => Ok(Level::Privileged),
            "baseline" => Ok(Level::Baseline),
            "restricted" => Ok(Level::Restricted),
            other => Err(format!(
                "`{other}` is not a pod security level: privileged, baseline or restricted"
            )),
        }
    }
}

/// The operator's choice: a level for every namespace, and exceptions by namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub default: Level,
    pub namespaces: BTreeMap<String, Level>,
}

impl Policy {
    pub fn level_for(&self, namespace: &str) -> Level {
        self.namespaces
            .get(namespace)
            .copied()
            .unwrap_or(self.default)
    }

    /// Reads one `--pod-security-namespace NAMESPACE=LEVEL` flag into the policy.
    pub fn add_namespace_flag(&mut self, flag: &str) -> Result<(), String> {
        let (namespace, level) = flag
            .split_once('=')
            .filter(|(namespace, _)| !namespace.trim().is_empty())
            .ok_or_else(|| format!("`{flag}` is not NAMESPACE=LEVEL, e.g. build-farm=baseline"))?;
        self.namespaces
            .insert(namespace.trim().to_string(), level.trim().parse()?);
        Ok(())
    }
}

/// A field of the pod spec (a path below it, e.g. `containers[0].securityContext.privileged`)
/// that breaks the level, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub path: String,
    pub message: String,
}

/// Gives `pod` the `restricted` profile's settings where it left them unset and they
/// contradict nothing it set.
pub fn harden(pod: &mut PodSpec) {
    let any_root_user = pod
        .security_context
        .as_ref()
        .and_then(|context| context.run_as_user)
        == Some(0)
        || containers(pod).any(|(_, _, container)| {
            own_context(container).and_then(|context| context.run_as_user) == Some(0)
        });
    let any_privileged = containers(pod).any(|(_, _, container)| {
        own_context(container).and_then(|context| context.privileged) == Some(true)
    });
    let context = pod
        .security_context
        .get_or_insert_with(PodSecurityContext::default);
    if context.run_as_non_root.is_none() && !any_root_user && !any_privileged {
        context.run_as_non_root = Some(true);
    }
    if context.seccomp_profile.is_none() {
        context.seccomp_profile = Some(SeccompProfile {
            type_: "RuntimeDefault".to_string(),
            localhost_profile: None,
        });
    }
    let all = pod
        .containers
        .iter_mut()
        .chain(pod.init_containers.iter_mut().flatten());
    for container in all {
        let context = container
            .security_context
            .get_or_insert_with(SecurityContext::default);
        let capabilities = context
            .capabilities
            .get_or_insert_with(Capabilities::default);
        // The API server refuses `allowPrivilegeEscalation: false` beside either of these.
        let escalates = context.privileged == Some(true)
            || capabilities
                .add
                .iter()
                .flatten()
                .any(|capability| bare(capability) == "SYS_ADMIN");
        if capabilities.drop.is_none() {
            capabilities.drop = Some(vec!["ALL".to_string()]);
        }
        if context.allow_privilege_escalation.is_none() && !escalates {
            context.allow_privilege_escalation = Some(false);
        }
    }
}

/// What in `pod` breaks `level`, with the profile's reason.
pub fn check(pod: &PodSpec, level: Level) -> Vec<Violation> {
    let mut out = Vec::new();
    if level == Level::Privileged {
        return out;
    }
    let mut refuse = |path: String, message: String| out.push(Violation { path, message });
    let profile = level.as_str();
    baseline(pod, profile, &mut refuse);
    if level == Level::Restricted {
        restricted(pod, &mut refuse);
    }
    out
}

/// The capabilities a `baseline` container may add: the container runtime's defaults.
const BASELINE_CAPABILITIES: [&str; 13] = [
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// Sysctls that are namespaced and isolated from the node (Kubernetes 1.28's safe set).
const SAFE_SYSCTLS: [&str; 6] = [
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
];

const SELINUX_TYPES: [&str; 4] = ["container_t", "container_init_t", "container_kvm_t", ""];

/// The volume kinds a `restricted` pod may use: none of them reaches the node's data.
const RESTRICTED_VOLUMES: [&str; 8] = [
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
];

fn baseline(pod: &PodSpec, profile: &str, refuse: &mut impl FnMut(String, String)) {
    for (field, value) in [
        ("hostNetwork", pod.host_network),
        ("hostPID", pod.host_pid),
        ("hostIPC", pod.host_ipc),
    ] {
        if value == Some(true) {
            refuse(
                field.to_string(),
                format!(
                    "must not be true under the `{profile}` pod security level: it shares the node's namespace"
                ),
            );
        }
    }
    for (index, volume) in pod.volumes.iter().flatten().enumerate() {
        if volume.host_path.is_some() {
            refuse(
                format!("volumes[{index}].hostPath"),
                format!(
                    "a hostPath volume mounts the node's files; not allowed under the `{profile}` pod security level"
                ),
            );
        }
    }
    if let Some(context) = &pod.security_context {
        let path = "securityContext";
        if context
            .windows_options
            .as_ref()
            .and_then(|w| w.host_process)
            == Some(true)
        {
            refuse(
                format!("{path}.windowsOptions.hostProcess"),
                format!("must not be true under the `{profile}` pod security level"),
            );
        }
        if let Some(options) = &context.se_linux_options {
            selinux(
                options.type_.as_deref(),
                options.user.is_some(),
                options.role.is_some(),
                path,
                profile,
                refuse,
            );
        }
        if let Some(seccomp) = &context.seccomp_profile {
            unconfined_seccomp(seccomp, path, profile, refuse);
        }
        if let Some(apparmor) = &context.app_armor_profile
            && apparmor.type_ == "Unconfined"
        {
            refuse(
                format!("{path}.appArmorProfile.type"),
                format!("`Unconfined` is not allowed under the `{profile}` pod security level"),
            );
        }
        for (index, sysctl) in context.sysctls.iter().flatten().enumerate() {
            if !SAFE_SYSCTLS.contains(&sysctl.name.as_str()) {
                refuse(
                    format!("{path}.sysctls[{index}].name"),
                    format!(
                        "`{}` is not a safe sysctl; the `{profile}` pod security level allows {}",
                        sysctl.name,
                        SAFE_SYSCTLS.join(", ")
                    ),
                );
            }
        }
    }
    for (kind, index, container) in containers(pod) {
        let path = format!("{kind}[{index}]");
        for (port_index, port) in container.ports.iter().flatten().enumerate() {
            if port.host_port.is_some_and(|port| port != 0) {
                refuse(
                    format!("{path}.ports[{port_index}].hostPort"),
                    format!("a host port is not allowed under the `{profile}` pod security level"),
                );
            }
        }
        let Some(context) = own_context(container) else {
            continue;
        };
        let path = format!("{path}.securityContext");
        if context.privileged == Some(true) {
            refuse(
                format!("{path}.privileged"),
                format!(
                    "a privileged container is not allowed under the `{profile}` pod security level"
                ),
            );
        }
        for (cap_index, capability) in context
            .capabilities
            .as_ref()
            .and_then(|c| c.add.as_ref())
            .into_iter()
            .flatten()
            .enumerate()
        {
            if !BASELINE_CAPABILITIES.contains(&bare(capability)) {
                refuse(
                    format!("{path}.capabilities.add[{cap_index}]"),
                    format!(
                        "adding `{capability}` is not allowed under the `{profile}` pod security level"
                    ),
                );
            }
        }
        if context
            .windows_options
            .as_ref()
            .and_then(|w| w.host_process)
            == Some(true)
        {
            refuse(
                format!("{path}.windowsOptions.hostProcess"),
                format!("must not be true under the `{profile}` pod security level"),
            );
        }
        if let Some(options) = &context.se_linux_options {
            selinux(
                options.type_.as_deref(),
                options.user.is_some(),
                options.role.is_some(),
                &path,
                profile,
                refuse,
            );
        }
        if context
            .proc_mount
            .as_deref()
            .is_some_and(|mount| mount != "Default")
        {
            refuse(
                format!("{path}.procMount"),
                format!("only `Default` is allowed under the `{profile}` pod security level"),
            );
        }
        if let Some(seccomp) = &context.seccomp_profile {
            unconfined_seccomp(seccomp, &path, profile, refuse);
        }
        if let Some(apparmor) = &context.app_armor_profile
            && apparmor.type_ == "Unconfined"
        {
            refuse(
                format!("{path}.appArmorProfile.type"),
                format!("`Unconfined` is not allowed under the `{profile}` pod security level"),
            );
        }
    }
}

fn restricted(pod: &PodSpec, refuse: &mut impl FnMut(String, String)) {
    for (index, volume) in pod.volumes.iter().flatten().enumerate() {
        let kinds = serde_json::to_value(volume).unwrap_or_default();
        let kind = kinds
            .as_object()
            .into_iter()
            .flat_map(|fields| fields.keys())
            .find(|field| *field != "name");
        if let Some(kind) = kind
            && kind != "hostPath"
            && !RESTRICTED_VOLUMES.contains(&kind.as_str())
        {
            refuse(
                format!("volumes[{index}].{kind}"),
                format!(
                    "a `{kind}` volume is not allowed under the `restricted` pod security level, which allows {}",
                    RESTRICTED_VOLUMES.join(", ")
                ),
            );
        }
    }
    let pod_context = pod.security_context.as_ref();
    let pod_non_root = pod_context.and_then(|c| c.run_as_non_root);
    let pod_seccomp = pod_context.and_then(|c| c.seccomp_profile.as_ref());
    if pod_non_root == Some(false) {
        refuse(
            "securityContext.runAsNonRoot".to_string(),
            "must be true under the `restricted` pod security level".to_string(),
        );
    }
    if pod_context.and_then(|c| c.run_as_user) == Some(0) {
        refuse(
            "securityContext.runAsUser".to_string(),
            "must not be 0 (root) under the `restricted` pod security level".to_string(),
        );
    }
    for (kind, index, container) in containers(pod) {
        let path = format!("{kind}[{index}].securityContext");
        let context = own_context(container);
        if context.and_then(|c| c.allow_privilege_escalation) != Some(false) {
            refuse(
                format!("{path}.allowPrivilegeEscalation"),
                "must be false under the `restricted` pod security level".to_string(),
            );
        }
        let non_root = context.and_then(|c| c.run_as_non_root).or(pod_non_root);
        if non_root != Some(true) {
            refuse(
                format!("{path}.runAsNonRoot"),
                "must be true (here or in the pod's securityContext) under the `restricted` pod security level".to_string(),
            );
        }
        if context.and_then(|c| c.run_as_user) == Some(0) {
            refuse(
                format!("{path}.runAsUser"),
                "must not be 0 (root) under the `restricted` pod security level".to_string(),
            );
        }
        let seccomp = context
            .and_then(|c| c.seccomp_profile.as_ref())
            .or(pod_seccomp);
        if !seccomp.is_some_and(|profile| {
            ["RuntimeDefault", "Localhost"].contains(&profile.type_.as_str())
        }) {
            refuse(
                format!("{path}.seccompProfile.type"),
                "must be `RuntimeDefault` or `Localhost` (here or in the pod's securityContext) under the `restricted` pod security level".to_string(),
            );
        }
        let capabilities = context.and_then(|c| c.capabilities.as_ref());
        let drops_all = capabilities
            .and_then(|c| c.drop.as_ref())
            .is_some_and(|drop| drop.iter().any(|capability| capability == "ALL"));
        if !drops_all {
            refuse(
                format!("{path}.capabilities.drop"),
                "must include `ALL` under the `restricted` pod security level".to_string(),
            );
        }
        for (cap_index, capability) in capabilities
            .and_then(|c| c.add.as_ref())
            .into_iter()
            .flatten()
            .enumerate()
        {
            // Anything else was refused by the baseline check already.
            if bare(capability) != "NET_BIND_SERVICE"
                && BASELINE_CAPABILITIES.contains(&bare(capability))
            {
                refuse(
                    format!("{path}.capabilities.add[{cap_index}]"),
                    format!(
                        "adding `{capability}` is not allowed under the `restricted` pod security level, which allows only NET_BIND_SERVICE"
                    ),
                );
            }
        }
    }
}

fn selinux(
    type_: Option<&str>,
    has_user: bool,
    has_role: bool,
    path: &str,
    profile: &str,
    refuse: &mut impl FnMut(String, String),
) {
    if let Some(type_) = type_
        && !SELINUX_TYPES.contains(&type_)
    {
        refuse(
            format!("{path}.seLinuxOptions.type"),
            format!(
                "`{type_}` is not allowed under the `{profile}` pod security level, which allows container_t, container_init_t and container_kvm_t"
            ),
        );
    }
    for (field, set) in [("user", has_user), ("role", has_role)] {
        if set {
            refuse(
                format!("{path}.seLinuxOptions.{field}"),
                format!("must not be set under the `{profile}` pod security level"),
            );
        }
    }
}

fn unconfined_seccomp(
    seccomp: &SeccompProfile,
    path: &str,
    profile: &str,
    refuse: &mut impl FnMut(String, String),
) {
    if seccomp.type_ == "Unconfined" {
        refuse(
            format!("{path}.seccompProfile.type"),
            format!("`Unconfined` is not allowed under the `{profile}` pod security level"),
        );
    }
}

/// Every container of the pod with the field that holds it and its index there.
fn containers(pod: &PodSpec) -> impl Iterator<Item = (&'static str, usize, &Container)> {
    let main = pod
        .containers
        .iter()
        .enumerate()
        .map(|(index, container)| ("containers", index, container));
    let init = pod
        .init_containers
        .iter()
        .flatten()
        .enumerate()
        .map(|(index, container)| ("initContainers", index, container));
    main.chain(init)
}

fn own_context(container: &Container) -> Option<&SecurityContext> {
    container.security_context.as_ref()
}

/// A capability without the `CAP_` prefix the API also takes.
fn bare(capability: &str) -> &str {
    capability.strip_prefix("CAP_").unwrap_or(capability)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> PodSpec {
        serde_saphyr::from_str(yaml).unwrap()
    }

    fn paths(pod: &PodSpec, level: Level) -> Vec<String> {
        check(pod, level).into_iter().map(|v| v.path).collect()
    }

    fn hardened(yaml: &str) -> PodSpec {
        let mut pod = pod(yaml);
        harden(&mut pod);
        pod
    }

    #[test]
    fn a_plain_pod_hardened_meets_restricted() {
        let pod = hardened(
            "containers: [{name: a, image: busybox}]\ninitContainers: [{name: b, image: busybox}]\n",
        );
        assert_eq!(paths(&pod, Level::Restricted), Vec::<String>::new());
        let context = pod.security_context.unwrap();
        assert_eq!(context.run_as_non_root, Some(true));
        assert_eq!(context.seccomp_profile.unwrap().type_, "RuntimeDefault");
        for container in pod
            .containers
            .iter()
            .chain(pod.init_containers.iter().flatten())
        {
            let context = container.security_context.clone().unwrap();
            assert_eq!(context.allow_privilege_escalation, Some(false));
            assert_eq!(context.capabilities.unwrap().drop.unwrap(), ["ALL"]);
        }
    }

    #[test]
    fn defaults_merge_field_by_field_and_never_contradict_the_template() {
        let pod = hardened(
            "securityContext: {fsGroup: 2000}\ncontainers:\n  - name: a\n    image: busybox\n    securityContext: {runAsUser: 1000, capabilities: {drop: [NET_RAW]}}\n",
        );
        let context = pod.security_context.clone().unwrap();
        assert_eq!(context.fs_group, Some(2000));
        assert_eq!(context.run_as_non_root, Some(true));
        assert!(context.seccomp_profile.is_some());
        let own = pod.containers[0].security_context.clone().unwrap();
        assert_eq!(own.run_as_user, Some(1000));
        assert_eq!(own.allow_privilege_escalation, Some(false));
        assert_eq!(own.capabilities.unwrap().drop.unwrap(), ["NET_RAW"]);
        // Dropping less than ALL is what the template wrote; restricted refuses it.
        assert_eq!(
            paths(&pod, Level::Restricted),
            ["containers[0].securityContext.capabilities.drop"]
        );
        assert_eq!(paths(&pod, Level::Baseline), Vec::<String>::new());

        let root =
            hardened("securityContext: {runAsUser: 0}\ncontainers: [{name: a, image: busybox}]\n");
        assert_eq!(
            root.security_context.as_ref().unwrap().run_as_non_root,
            None
        );
        let privileged = hardened(
            "containers: [{name: a, image: busybox, securityContext: {privileged: true}}]\n",
        );
        let own = privileged.containers[0].security_context.clone().unwrap();
        assert_eq!(own.allow_privilege_escalation, None);
        assert_eq!(privileged.security_context.unwrap().run_as_non_root, None);
        let admin = hardened(
            "containers: [{name: a, image: busybox, securityContext: {capabilities: {add: [CAP_SYS_ADMIN]}}}]\n",
        );
        assert_eq!(
            admin.containers[0]
                .security_context
                .clone()
                .unwrap()
                .allow_privilege_escalation,
            None
        );
    }

    #[test]
    fn baseline_refuses_the_ways_into_the_node() {
        let pod = hardened(
            r#"hostNetwork: true
hostPID: true
hostIPC: true
securityContext:
  sysctls: [{name: kernel.shm_rmid_forced, value: "1"}, {name: kernel.msgmax, value: "1"}]
  seLinuxOptions: {type: spc_t}
volumes:
  - {name: ok, emptyDir: {}}
  - {name: node, hostPath: {path: /}}
containers:
  - name: a
    image: busybox
    ports: [{containerPort: 80}, {containerPort: 81, hostPort: 8081}]
    securityContext:
      privileged: true
      procMount: Unmasked
      seccompProfile: {type: Unconfined}
      capabilities: {add: [CHOWN, SYS_ADMIN, CAP_NET_RAW]}
      seLinuxOptions: {user: system_u, role: object_r}
"#,
        );
        let expected = [
            "hostNetwork",
            "hostPID",
            "hostIPC",
            "volumes[1].hostPath",
            "securityContext.seLinuxOptions.type",
            "securityContext.sysctls[1].name",
            "containers[0].ports[1].hostPort",
            "containers[0].securityContext.privileged",
            "containers[0].securityContext.capabilities.add[1]",
            "containers[0].securityContext.capabilities.add[2]",
            "containers[0].securityContext.seLinuxOptions.user",
            "containers[0].securityContext.seLinuxOptions.role",
            "containers[0].securityContext.procMount",
            "containers[0].securityContext.seccompProfile.type",
        ];
        assert_eq!(paths(&pod, Level::Baseline), expected);
        let message = &check(&pod, Level::Baseline)[0].message;
        assert!(message.contains("`baseline`"), "{message}");
        assert_eq!(paths(&pod, Level::Privileged), Vec::<String>::new());
    }

    #[test]
    fn restricted_adds_non_root_no_escalation_seccomp_dropped_capabilities_and_volume_kinds() {
        let pod = hardened(
            r#"securityContext: {runAsNonRoot: false, runAsUser: 0}
volumes:
  - {name: data, persistentVolumeClaim: {claimName: d}}
  - {name: nfs, nfs: {server: s, path: /}}
containers:
  - name: a
    image: busybox
    securityContext:
      allowPrivilegeEscalation: true
      capabilities: {add: [NET_BIND_SERVICE, CHOWN]}
"#,
        );
        assert_eq!(paths(&pod, Level::Baseline), Vec::<String>::new());
        assert_eq!(
            paths(&pod, Level::Restricted),
            [
                "volumes[1].nfs",
                "securityContext.runAsNonRoot",
                "securityContext.runAsUser",
                "containers[0].securityContext.allowPrivilegeEscalation",
                "containers[0].securityContext.runAsNonRoot",
                "containers[0].securityContext.capabilities.add[1]",
            ]
        );
    }

    #[test]
    fn the_policy_gives_each_namespace_its_level() {
        let mut policy = Policy::default();
        policy.add_namespace_flag("build-farm=baseline").unwrap();
        policy.add_namespace_flag("ops = privileged").unwrap();
        assert_eq!(policy.level_for("team-a"), Level::Restricted);
        assert_eq!(policy.level_for("build-farm"), Level::Baseline);
        assert_eq!(policy.level_for("ops"), Level::Privileged);
        let error = policy.add_namespace_flag("x=root").unwrap_err();
        assert!(
            error.contains("privileged, baseline or restricted"),
            "{error}"
        );
        assert!(policy.add_namespace_flag("=baseline").is_err());
        assert!(policy.add_namespace_flag("baseline").is_err());
    }
}
