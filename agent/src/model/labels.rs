//! Labels of a namespace, node or pod.

use std::collections::BTreeMap;

/// Key-value labels, sorted by key in one allocation. A `BTreeMap` allocates a node with room
/// for eleven entries even for one label: about 500 bytes per pod, 50 MB at 100,000 pods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Labels(Box<[(String, String)]>);

impl Labels {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, key: &str) -> Option<&String> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// In key order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

/// Keys are unique and sorted already: the pairs move over as they are.
impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        Self(map.into_iter().collect())
    }
}

/// A key given twice keeps its last value, as in a map.
impl FromIterator<(String, String)> for Labels {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Self {
        pairs.into_iter().collect::<BTreeMap<_, _>>().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_find_every_key_and_only_those() {
        let labels: Labels = [("b", "2"), ("a", "1"), ("c", "3"), ("a", "9")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert_eq!(labels.get("a").map(String::as_str), Some("9"));
        assert_eq!(labels.get("c").map(String::as_str), Some("3"));
        assert!(labels.contains_key("b"));
        assert!(!labels.contains_key("d"));
        assert!(!labels.contains_key(""));
        let keys: Vec<&String> = labels.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["a", "b", "c"]);
        assert!(Labels::new().is_empty());
        assert_eq!(Labels::new().get("a"), None);
    }
}
