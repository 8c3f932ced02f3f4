//! Kubernetes label selectors, validated once so that matching cannot fail.

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::Labels;

/// A validated label selector: every requirement must hold (an empty selector matches all).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    In {
        key: String,
        values: BTreeSet<String>,
    },
    NotIn {
        key: String,
        values: BTreeSet<String>,
    },
    Exists {
        key: String,
    },
    DoesNotExist {
        key: String,
    },
}

/// Why a `LabelSelector` is invalid; `Display` starts with the path below the selector.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error(
        "matchExpressions[{index}].operator: {operator:?} is not one of In, NotIn, Exists, DoesNotExist"
    )]
    UnknownOperator { index: usize, operator: String },
    #[error("matchExpressions[{index}].values: operator {operator} needs at least one value")]
    MissingValues {
        index: usize,
        operator: &'static str,
    },
    #[error("matchExpressions[{index}].values: operator {operator} takes no values")]
    UnexpectedValues {
        index: usize,
        operator: &'static str,
    },
    #[error("matchExpressions[{index}].key: must not be empty")]
    EmptyKey { index: usize },
    #[error("matchLabels: key must not be empty")]
    EmptyLabelKey,
}

impl Selector {
    /// The selector `{}`.
    pub fn everything() -> Self {
        Self::default()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

/// As kubectl writes selectors: `{team=payments, tier in (a, b), !legacy}`; `{}` matches all.
impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("{")?;
        for (i, requirement) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            let values = |values: &BTreeSet<String>| {
                values
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            match requirement {
                Requirement::In { key, values: v } if v.len() == 1 => {
                    write!(f, "{key}={}", values(v))?;
                }
                Requirement::In { key, values: v } => write!(f, "{key} in ({})", values(v))?,
                Requirement::NotIn { key, values: v } => {
                    write!(f, "{key} notin ({})", values(v))?;
                }
                Requirement::Exists { key } => f.write_str(key)?,
                Requirement::DoesNotExist { key } => write!(f, "!{key}")?,
            }
        }
        f.write_str("}")
    }
}

impl Requirement {
    fn matches(&self, labels: &Labels) -> bool {
        match self {
            Self::In { key, values } => labels.get(key).is_some_and(|v| values.contains(v)),
            // Kubernetes semantics: a missing key satisfies NotIn.
            Self::NotIn { key, values } => labels.get(key).is_none_or(|v| !values.contains(v)),
            Self::Exists { key } => labels.contains_key(key),
            Self::DoesNotExist { key } => !labels.contains_key(key),
        }
    }
}

impl TryFrom<&LabelSelector> for Selector {
    type Error = SelectorError;

    fn try_from(selector: &LabelSelector) -> Result<Self, Self::Error> {
        let mut requirements = Vec::new();
        for (key, value) in selector.match_labels.iter().flatten() {
            if key.is_empty() {
                return Err(SelectorError::EmptyLabelKey);
            }
            requirements.push(Requirement::In {
                key: key.clone(),
                values: BTreeSet::from([value.clone()]),
            });
        }
        for (index, expr) in selector.match_expressions.iter().flatten().enumerate() {
            if expr.key.is_empty() {
                return Err(SelectorError::EmptyKey { index });
            }
            let key = expr.key.clone();
            let values: BTreeSet<String> = expr.values.iter().flatten().cloned().collect();
            let requirement = match (expr.operator.as_str(), values.is_empty()) {
                ("In", false) => Requirement::In { key, values },
                ("NotIn", false) => Requirement::NotIn { key, values },
                ("Exists", true) => Requirement::Exists { key },
                ("DoesNotExist", true) => Requirement::DoesNotExist { key },
                (operator @ ("In" | "NotIn"), true) => {
                    let operator = if operator == "In" { "In" } else { "NotIn" };
                    return Err(SelectorError::MissingValues { index, operator });
                }
                (operator @ ("Exists" | "DoesNotExist"), false) => {
                    let operator = if operator == "Exists" {
                        "Exists"
                    } else {
                        "DoesNotExist"
                    };
                    return Err(SelectorError::UnexpectedValues { index, operator });
                }
                (other, _) => {
                    return Err(SelectorError::UnknownOperator {
                        index,
                        operator: other.to_owned(),
                    });
                }
            };
            requirements.push(requirement);
        }
        Ok(Self { requirements })
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use crate::testing::labels;

    fn selector(yaml: &str) -> Result<Selector, SelectorError> {
        let raw: LabelSelector = serde_saphyr::from_str(yaml).unwrap();
        Selector::try_from(&raw)
    }

    #[test]
    fn empty_selector_matches_everything() {
        let s = selector("{}").unwrap();
        assert!(s.matches(&Labels::new()));
        assert!(s.matches(&labels(&[("a", "b")])));
        assert_eq!(s, Selector::everything());
    }

    #[test]
    fn match_labels_all_must_hold() {
        let s = selector("matchLabels: {app: web, tier: front}").unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "front"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "back")])));
    }

    #[test]
    fn in_operator() {
        let s = selector("matchExpressions: [{key: env, operator: In, values: [prod, stage]}]")
            .unwrap();
        assert!(s.matches(&labels(&[("env", "prod")])));
        assert!(s.matches(&labels(&[("env", "stage")])));
        assert!(!s.matches(&labels(&[("env", "dev")])));
        assert!(!s.matches(&Labels::new()));
    }

    #[test]
    fn not_in_matches_when_key_absent() {
        let s = selector("matchExpressions: [{key: env, operator: NotIn, values: [dev]}]").unwrap();
        assert!(s.matches(&labels(&[("env", "prod")])));
        assert!(!s.matches(&labels(&[("env", "dev")])));
        assert!(s.matches(&Labels::new()));
    }

    #[test]
    fn exists_and_does_not_exist() {
        let exists = selector("matchExpressions: [{key: egress, operator: Exists}]").unwrap();
        assert!(exists.matches(&labels(&[("egress", "")])));
        assert!(!exists.matches(&Labels::new()));
        let absent =
            selector("matchExpressions: [{key: egress, operator: DoesNotExist, values: []}]")
                .unwrap();
        assert!(!absent.matches(&labels(&[("egress", "yes")])));
        assert!(absent.matches(&Labels::new()));
    }

    #[test]
    fn labels_and_expressions_combine_with_and() {
        let s = selector(
            "matchLabels: {app: web}\nmatchExpressions: [{key: env, operator: NotIn, values: [dev]}]",
        )
        .unwrap();
        assert!(s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("env", "dev")])));
        assert!(!s.matches(&labels(&[("env", "prod")])));
    }

    #[test]
    fn invalid_selectors_are_rejected_with_their_path() {
        let cases = [
            (
                "matchExpressions: [{key: a, operator: Exists}, {key: a, operator: Equals, values: [x]}]",
                "matchExpressions[1].operator: \"Equals\" is not one of In, NotIn, Exists, DoesNotExist",
            ),
            (
                "matchExpressions: [{key: a, operator: In}]",
                "matchExpressions[0].values: operator In needs at least one value",
            ),
            (
                "matchExpressions: [{key: a, operator: NotIn, values: []}]",
                "matchExpressions[0].values: operator NotIn needs at least one value",
            ),
            (
                "matchExpressions: [{key: a, operator: Exists, values: [x]}]",
                "matchExpressions[0].values: operator Exists takes no values",
            ),
            (
                "matchExpressions: [{key: a, operator: DoesNotExist, values: [x]}]",
                "matchExpressions[0].values: operator DoesNotExist takes no values",
            ),
            (
                "matchExpressions: [{key: '', operator: Exists}]",
                "matchExpressions[0].key: must not be empty",
            ),
            ("matchLabels: {'': x}", "matchLabels: key must not be empty"),
        ];
        for (yaml, message) in cases {
            assert_eq!(selector(yaml).unwrap_err().to_string(), message, "{yaml}");
        }
    }
}

/// Properties of selectors over generated labels and selectors (`crate::testing`'s alphabets).
#[cfg(test)]
mod props {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;
    use crate::testing::{
        Shuffler, arb_expression, arb_label_selector, arb_labels, label_key, label_value, selector,
    };

    /// Kubernetes' definition, read straight from the API object: every `matchLabels` pair and
    /// every expression must hold.
    fn kubernetes_matches(raw: &LabelSelector, labels: &Labels) -> bool {
        let pairs = raw.match_labels.iter().flatten();
        let expressions = raw.match_expressions.iter().flatten();
        pairs.into_iter().all(|(k, v)| labels.get(k) == Some(v))
            && expressions.into_iter().all(|e| {
                let listed = |v: &String| e.values.iter().flatten().any(|x| x == v);
                match e.operator.as_str() {
                    "In" => labels.get(&e.key).is_some_and(listed),
                    "NotIn" => !labels.get(&e.key).is_some_and(listed),
                    "Exists" => labels.contains_key(&e.key),
                    "DoesNotExist" => !labels.contains_key(&e.key),
                    other => panic!("generated operator {other}"),
                }
            })
    }

    fn expression(key: &str, operator: &str, values: &[String]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.to_owned(),
            operator: operator.to_owned(),
            values: (!values.is_empty()).then(|| values.to_vec()),
        }
    }

    fn expressions(list: Vec<LabelSelectorRequirement>) -> LabelSelector {
        LabelSelector {
            match_labels: None,
            match_expressions: Some(list),
        }
    }

    /// The selector as a user would write it, `matchLabels` keys in the order given: JSON,
    /// which is YAML too.
    fn written(match_labels: &[(&String, &String)], raw: &LabelSelector) -> String {
        let labels: Vec<String> = match_labels
            .iter()
            .map(|(k, v)| format!("{k:?}: {v:?}"))
            .collect();
        let expressions: Vec<String> = raw
            .match_expressions
            .iter()
            .flatten()
            .map(|e| {
                format!(
                    "{{\"key\": {:?}, \"operator\": {:?}, \"values\": {:?}}}",
                    e.key,
                    e.operator,
                    e.values.clone().unwrap_or_default()
                )
            })
            .collect();
        format!(
            "{{\"matchLabels\": {{{}}}, \"matchExpressions\": [{}]}}",
            labels.join(", "),
            expressions.join(", ")
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn matches_as_kubernetes_defines(raw in arb_label_selector(), labels in arb_labels()) {
            prop_assert_eq!(selector(&raw).matches(&labels), kubernetes_matches(&raw, &labels));
        }

        /// Requirements picked to hold for `labels`, in every form an operator allows.
        #[test]
        fn a_selector_built_from_labels_matches_them(
            labels in arb_labels(),
            picks in vec((label_key(), 0u8..4, vec(label_value(), 0..=3)), 0..6),
        ) {
            let mut raw = LabelSelector::default();
            for (key, form, mut values) in picks {
                let requirement = match (labels.get(&key), form) {
                    (Some(value), 0) => {
                        raw.match_labels.get_or_insert_default().insert(key, value.clone());
                        continue;
                    }
                    (Some(value), 1) => {
                        values.push(value.clone());
                        expression(&key, "In", &values)
                    }
                    (Some(value), 2) => {
                        values.retain(|v| v != value);
                        if values.is_empty() {
                            expression(&key, "Exists", &[])
                        } else {
                            expression(&key, "NotIn", &values)
                        }
                    }
                    (Some(_), _) => expression(&key, "Exists", &[]),
                    (None, _) if values.is_empty() => expression(&key, "DoesNotExist", &[]),
                    (None, _) => expression(&key, "NotIn", &values),
                };
                raw.match_expressions.get_or_insert_default().push(requirement);
            }
            prop_assert!(selector(&raw).matches(&labels), "{:?} vs {:?}", raw, labels);
        }

        /// `matchLabels: L` selects exactly the label sets that include L.
        #[test]
        fn match_labels_select_the_supersets(
            wanted in arb_labels(),
            other in arb_labels(),
            keep in any::<bool>(),
        ) {
            // Half the time the candidate includes what is wanted, plus whatever `other` adds.
            let added = if keep { Some(wanted.iter()) } else { None };
            let candidate: Labels = other
                .iter()
                .chain(added.into_iter().flatten())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let raw = LabelSelector {
                match_labels: Some(wanted.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
                match_expressions: None,
            };
            let includes = wanted.iter().all(|(k, v)| candidate.get(k) == Some(v));
            prop_assert_eq!(selector(&raw).matches(&candidate), includes);
            prop_assert!(selector(&raw).matches(&wanted));
        }

        #[test]
        fn not_in_is_the_complement_of_in_for_present_keys(
            key in label_key(),
            values in vec(label_value(), 1..=3),
            labels in arb_labels(),
        ) {
            let is_in = selector(&expressions(vec![expression(&key, "In", &values)]));
            let not_in = selector(&expressions(vec![expression(&key, "NotIn", &values)]));
            if labels.contains_key(&key) {
                prop_assert_ne!(is_in.matches(&labels), not_in.matches(&labels));
            } else {
                prop_assert!(!is_in.matches(&labels));
                prop_assert!(not_in.matches(&labels));
            }
            let exists = selector(&expressions(vec![expression(&key, "Exists", &[])]));
            let absent = selector(&expressions(vec![expression(&key, "DoesNotExist", &[])]));
            prop_assert_ne!(exists.matches(&labels), absent.matches(&labels));
            prop_assert_eq!(exists.matches(&labels), labels.contains_key(&key));
        }

        #[test]
        fn the_empty_selector_matches_everything(labels in arb_labels()) {
            let empty_lists = LabelSelector {
                match_labels: Some(BTreeMap::new()),
                match_expressions: Some(Vec::new()),
            };
            for raw in [LabelSelector::default(), empty_lists] {
                let s = selector(&raw);
                prop_assert!(s.matches(&labels));
                prop_assert_eq!(s, Selector::everything());
            }
        }

        /// `matchLabels: {k: v}` is `{key: k, operator: In, values: [v]}`, and requirements
        /// combine with AND, so a selector of two parts matches where both parts do.
        #[test]
        fn requirements_combine_with_and(
            a in arb_label_selector(),
            b in arb_label_selector(),
            labels in arb_labels(),
        ) {
            let as_expressions = |raw: &LabelSelector| {
                let pairs = raw.match_labels.iter().flatten();
                let mut list: Vec<LabelSelectorRequirement> = pairs
                    .map(|(k, v)| expression(k, "In", std::slice::from_ref(v)))
                    .collect();
                list.extend(raw.match_expressions.iter().flatten().cloned());
                list
            };
            let mut both = as_expressions(&a);
            both.extend(as_expressions(&b));
            prop_assert_eq!(
                selector(&expressions(as_expressions(&a))).matches(&labels),
                selector(&a).matches(&labels)
            );
            prop_assert_eq!(
                selector(&expressions(both)).matches(&labels),
                selector(&a).matches(&labels) && selector(&b).matches(&labels)
            );
        }

        /// Neither the order `matchLabels` are written in, nor the order of the expressions or
        /// their values, nor a repeated value changes what a selector matches.
        #[test]
        fn matching_is_independent_of_order(
            raw in arb_label_selector(),
            labels in arb_labels(),
            seed in any::<u64>(),
        ) {
            let mut shuffler = Shuffler(seed | 1);
            let mut pairs: Vec<(&String, &String)> = raw.match_labels.iter().flatten().collect();
            let in_order = written(&pairs, &raw);
            shuffler.shuffle(&mut pairs);
            let mut permuted = raw.clone();
            shuffler.permute_selector(&mut permuted);
            let reordered = written(&pairs, &permuted);

            let expected = selector(&raw).matches(&labels);
            for text in [in_order, reordered] {
                let parsed: LabelSelector = serde_saphyr::from_str(&text)
                    .map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
                prop_assert_eq!(selector(&parsed).matches(&labels), expected, "{}", text);
            }
        }

        /// Validation refuses exactly the malformed selectors, naming the first problem: an
        /// empty `matchLabels` key, then the expressions in order (empty key, then operator
        /// and values).
        #[test]
        fn validation_refuses_exactly_the_malformed(
            empty_label_key in proptest::bool::weighted(0.1),
            list in vec(
                (
                    prop_oneof![4 => label_key(), 1 => Just(String::new())],
                    prop_oneof![
                        4 => proptest::sample::select(&["In", "NotIn", "Exists", "DoesNotExist"][..]),
                        1 => proptest::sample::select(&["in", "Equals", "", "Exists "][..]),
                    ],
                    proptest::option::of(vec(label_value(), 0..=2)),
                ),
                0..=4,
            ),
            valid in arb_expression(),
        ) {
            let mut raw = expressions(vec![valid]);
            if empty_label_key {
                raw.match_labels = Some([(String::new(), "x".to_owned())].into());
            }
            let mut expected = empty_label_key.then_some(SelectorError::EmptyLabelKey);
            for (key, operator, values) in list {
                let index = raw.match_expressions.iter().flatten().count();
                let has_values = values.as_ref().is_some_and(|v| !v.is_empty());
                let problem = match (key.is_empty(), operator, has_values) {
                    (true, _, _) => Some(SelectorError::EmptyKey { index }),
                    (false, "In" | "NotIn", true) | (false, "Exists" | "DoesNotExist", false) => None,
                    (false, operator @ ("In" | "NotIn"), false) => {
                        Some(SelectorError::MissingValues { index, operator })
                    }
                    (false, operator @ ("Exists" | "DoesNotExist"), true) => {
                        Some(SelectorError::UnexpectedValues { index, operator })
                    }
                    (false, other, _) => Some(SelectorError::UnknownOperator {
                        index,
                        operator: other.to_owned(),
                    }),
                };
                expected = expected.or(problem);
                raw.match_expressions.get_or_insert_default().push(LabelSelectorRequirement {
                    key,
                    operator: operator.to_owned(),
                    values,
                });
            }
            prop_assert_eq!(Selector::try_from(&raw).err(), expected);
        }
    }
}
