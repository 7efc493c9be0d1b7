//! Resource quantities (`500m`, `16Gi`, `10k`) and what pods request of nodes.
//!
//! The scheduler compares pod requests against node allocatable; both are Kubernetes
//! quantities, held here as integer milli-units so `100m` CPU and `100Ti` memory add up exactly.

use std::ops::{AddAssign, SubAssign};

use k8s_openapi::api::core::v1::{Node, Pod, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Parses a Kubernetes quantity into milli-units, rounding up; `None` if it is not one.
pub(crate) fn parse_quantity(text: &str) -> Option<i128> {
    let text = text.trim();
    let number_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_end);
    let (negative, digits) = match number.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, number.strip_prefix('+').unwrap_or(number)),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.len() > 18 {
        return None;
    }
    let all_digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    if !all_digits(whole) || !all_digits(fraction) {
        return None;
    }
    let mantissa: i128 = format!("{whole}{fraction}").parse().ok()?;
    let scale = 10_i128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
    // Multiplier to milli-units as a fraction `numerator / denominator`.
    let (numerator, denominator): (i128, i128) = match suffix {
        "n" => (1, 1_000_000),
        "u" => (1, 1_000),
        "m" => (1, 1),
        "" => (1_000, 1),
        "k" => (1_000_000, 1),
        "M" => (1_000_000_000, 1),
        "G" => (1_000_000_000_000, 1),
        "T" => (1_000_000_000_000_000, 1),
        "P" => (1_000_000_000_000_000_000, 1),
        "E" => (1_000_000_000_000_000_000_000, 1),
        "Ki" => (1_000 << 10, 1),
        "Mi" => (1_000 << 20, 1),
        "Gi" => (1_000 << 30, 1),
        "Ti" => (1_000 << 40, 1),
        "Pi" => (1_000 << 50, 1),
        "Ei" => (1_000 << 60, 1),
        exponent if exponent.starts_with(['e', 'E']) => {
            let power: i32 = exponent[1..].parse().ok()?;
            let power = power + 3;
            if power >= 0 {
                (10_i128.checked_pow(u32::try_from(power).ok()?)?, 1)
            } else {
                (1, 10_i128.checked_pow(power.unsigned_abs())?)
            }
        }
        _ => return None,
    };
    let scaled = mantissa.checked_mul(numerator)?;
    let divisor = scale.checked_mul(denominator)?;
    let milli = (scaled + divisor - 1) / divisor;
    Some(if negative { -milli } else { milli })
}

/// CPU, memory and pod count, in milli-units (a pod counts `1000`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Resources {
    pub(crate) cpu: i128,
    pub(crate) memory: i128,
    pub(crate) pods: i128,
}

impl AddAssign for Resources {
    fn add_assign(&mut self, other: Self) {
        self.cpu += other.cpu;
        self.memory += other.memory;
        self.pods += other.pods;
    }
}

impl SubAssign for Resources {
    fn sub_assign(&mut self, other: Self) {
        self.cpu -= other.cpu;
        self.memory -= other.memory;
        self.pods -= other.pods;
    }
}

fn quantity(map: Option<&std::collections::BTreeMap<String, Quantity>>, name: &str) -> i128 {
    map.and_then(|m| m.get(name))
        .and_then(|q| parse_quantity(&q.0))
        .unwrap_or(0)
}

/// Requests of one container; limits stand in for missing requests, as API defaulting does.
fn container_requests(requirements: Option<&ResourceRequirements>) -> Resources {
    let Some(requirements) = requirements else {
        return Resources::default();
    };
    let pick = |name: &str| {
        let requested = requirements
            .requests
            .as_ref()
            .filter(|r| r.contains_key(name));
        match requested {
            Some(requests) => quantity(Some(requests), name),
            None => quantity(requirements.limits.as_ref(), name),
        }
    };
    Resources {
        cpu: pick("cpu"),
        memory: pick("memory"),
        pods: 0,
    }
}

/// What a pod takes from its node: the larger of its containers' sum and any init container
/// (init containers run one at a time, before the others), plus overhead and one pod slot.
pub(crate) fn pod_requests(pod: &Pod) -> Resources {
    let mut total = Resources {
        pods: 1_000,
        ..Resources::default()
    };
    let Some(spec) = pod.spec.as_ref() else {
        return total;
    };
    let mut regular = Resources::default();
    for container in &spec.containers {
        regular += container_requests(container.resources.as_ref());
    }
    for init in spec.init_containers.iter().flatten() {
        let requests = container_requests(init.resources.as_ref());
        regular.cpu = regular.cpu.max(requests.cpu);
        regular.memory = regular.memory.max(requests.memory);
    }
    total += regular;
    total.cpu += quantity(spec.overhead.as_ref(), "cpu");
    total.memory += quantity(spec.overhead.as_ref(), "memory");
    total
}

/// What a node offers pods: `status.allocatable`, or its capacity when allocatable is unset.
pub(crate) fn node_allocatable(node: &Node) -> Resources {
    let status = node.status.as_ref();
    let map = status
        .and_then(|s| s.allocatable.as_ref())
        .or_else(|| status.and_then(|s| s.capacity.as_ref()));
    Resources {
        cpu: quantity(map, "cpu"),
        memory: quantity(map, "memory"),
        pods: quantity(map, "pods"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_quantity_forms_nodes_and_pods_use() {
        assert_eq!(parse_quantity("100m"), Some(100));
        assert_eq!(parse_quantity("2"), Some(2_000));
        assert_eq!(parse_quantity("0.5"), Some(500));
        assert_eq!(parse_quantity("10k"), Some(10_000_000));
        assert_eq!(parse_quantity("16Gi"), Some(16 * (1 << 30) * 1_000));
        assert_eq!(parse_quantity("100Ti"), Some(100 * (1_i128 << 40) * 1_000));
        assert_eq!(parse_quantity("1e3"), Some(1_000_000));
        assert_eq!(parse_quantity("1.5Mi"), Some(1_572_864_000));
        assert_eq!(parse_quantity("1n"), Some(1));
        assert_eq!(parse_quantity("abc"), None);
        assert_eq!(parse_quantity("5Xi"), None);
        assert_eq!(parse_quantity(""), None);
    }

    #[test]
    fn pod_requests_take_the_larger_of_containers_and_init_containers() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {
                "containers": [
                    {"name": "a", "resources": {"requests": {"cpu": "250m", "memory": "64Mi"}}},
                    {"name": "b", "resources": {"limits": {"cpu": "250m"}}}
                ],
                "initContainers": [
                    {"name": "i", "resources": {"requests": {"cpu": "2"}}}
                ]
            }
        }))
        .expect("a valid pod");
        let requests = pod_requests(&pod);
        assert_eq!(requests.cpu, 2_000);
        assert_eq!(requests.memory, 64 * (1 << 20) * 1_000);
        assert_eq!(requests.pods, 1_000);
    }
}
