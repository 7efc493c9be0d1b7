//! Rendered names and labels are always valid Kubernetes values, and distinct events never
//! share a Job name.

use std::collections::HashSet;

use proptest::prelude::*;
use spate::naming::{
    MAX_JOB_NAME, batch_id, is_dns1123_label, is_label_value, job_name, sanitize_label_value,
};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn job_names_are_always_dns_labels(pipeline in "\\PC{0,80}", namespace in "[a-z0-9-]{1,20}", ids in prop::collection::vec("\\PC{0,40}", 1..20)) {
        let name = job_name(&namespace, &pipeline, &ids);
        prop_assert!(is_dns1123_label(&name), "{name}");
        prop_assert!(name.len() <= MAX_JOB_NAME);
        prop_assert!(is_label_value(&batch_id(&namespace, &pipeline, &ids)));
    }

    #[test]
    fn any_text_sanitises_to_a_valid_label_value(text in "\\PC{0,200}") {
        let label = sanitize_label_value(&text);
        prop_assert!(is_label_value(&label), "{text:?} -> {label:?}");
        if is_label_value(&text) {
            prop_assert_eq!(label, text);
        }
    }
}

#[test]
fn a_hundred_thousand_distinct_events_get_a_hundred_thousand_names() {
    let mut names = HashSet::with_capacity(100_000);
    for i in 0..100_000u32 {
        // Ids that differ in one character, as sequence numbers and object keys do.
        let id = format!("uploads/2026/11/23/photo-{i:06}.jpg");
        assert!(
            names.insert(job_name("default", "thumbnails", &[id])),
            "collision at {i}"
        );
    }
    let mut labels = HashSet::with_capacity(100_000);
    for i in 0..100_000u32 {
        assert!(
            labels.insert(sanitize_label_value(&format!("key with spaces/{i}"))),
            "label collision at {i}"
        );
    }
}
