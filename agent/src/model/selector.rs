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
