//! The objects file as a stream of documents: YAML documents separated by `---`, JSON values
//! one after another, arrays, and `kind: List`s, each object identified and handed to the
//! model for conversion. Whatever cannot be used is reported with its position and, when
//! readable, its identity, so the source can keep that object's last good version.
//!
//! Bounded: a document's parser has a budget (aliases and anchors, events, nesting, scalar
//! bytes), so a few lines of YAML cannot expand into gigabytes, and a file may hold at most
//! [`MAX_OBJECTS`] objects; the file's size is capped where it is read.

use std::collections::HashMap;

use serde_json::Value;
use serde_saphyr::budget::Budget;
use serde_saphyr::options::Options;

use crate::model::API_VERSION;
use crate::model::{Invalid, ObjectKey, ParsedObject, convert};

/// The most objects one file may hold: ten times what the benchmarks use.
pub const MAX_OBJECTS: usize = 1_000_000;

/// Aliases (`*name`) and anchors (`&name`) per document. Objects from kubectl have none; a
/// hand-written file may share a few labels. Far more is an attack on the agent's memory.
const MAX_ALIASES: usize = 1_000;

/// What [`parse_documents`] read from an intact stream.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Documents {
    pub objects: Vec<ParsedObject>,
    /// Objects skipped, each with where it is and what is wrong.
    pub errors: Vec<ObjectError>,
}

/// The stream cannot be used past `document`: nothing in it is trustworthy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("document {document}: YAML/JSON syntax error: {message}")]
    Syntax {
        /// 1-based, like [`ObjectError::document`].
        document: usize,
        message: String,
    },
    #[error("document {document}: more than {max} objects in one file")]
    TooManyObjects { document: usize, max: usize },
}

impl StreamError {
    pub fn document(&self) -> usize {
        match self {
            Self::Syntax { document, .. } | Self::TooManyObjects { document, .. } => *document,
        }
    }
}

/// One object that could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("document {document}{}: {}{problem}", item_suffix(*.item), object_prefix(.object))]
pub struct ObjectError {
    /// 1-based position of the YAML document (or JSON value) in the stream.
    pub document: usize,
    /// 0-based index in `items` when the document is a `List`.
    pub item: Option<usize>,
    /// Set whenever kind and name could be read, even if the rest is invalid.
    pub object: Option<ObjectKey>,
    pub problem: Invalid,
}

fn item_suffix(item: Option<usize>) -> String {
    item.map(|i| format!(" items[{i}]")).unwrap_or_default()
}

fn object_prefix(object: &Option<ObjectKey>) -> String {
    object
        .as_ref()
        .map(|key| format!("{key}: "))
        .unwrap_or_default()
}

/// Parses a YAML multi-document stream, a JSON value (or several, or an array), or a
/// `kind: List`. `Err` means the stream itself is broken: the caller must not trust any part.
pub fn parse_documents(text: &str) -> Result<Documents, StreamError> {
    parse_at_most(text, MAX_OBJECTS)
}

fn parse_at_most(text: &str, max_objects: usize) -> Result<Documents, StreamError> {
    // A YAML parser may refuse some valid JSON (tabs as indentation): JSON gets its own. But
    // YAML's flow style starts like JSON too (`{apiVersion: v1, ...}`): when the JSON reading
    // fails, the text is read as YAML, and the JSON error stands if that fails as well.
    let json = text.trim_start().starts_with(['{', '[']);
    match parse_stream(documents(text, json), max_objects) {
        Err(error @ StreamError::Syntax { .. }) if json => {
            parse_stream(documents(text, false), max_objects).map_err(|_| error)
        }
        parsed => parsed,
    }
}

fn parse_stream<'a>(
    documents: impl Iterator<Item = Result<Value, String>> + 'a,
    max_objects: usize,
) -> Result<Documents, StreamError> {
    let mut parser = Parser {
        max_objects,
        ..Parser::default()
    };
    // One document at a time: holding every document's tree at once would cost several times
    // the objects themselves on a large file. A broken document anywhere still rejects the
    // whole file, since the partial result is dropped.
    for (index, value) in documents.enumerate() {
        let document = index + 1;
        let value = value.map_err(|message| StreamError::Syntax { document, message })?;
        match value {
            Value::Null => {}
            Value::Array(items) => parser.items(document, items)?,
            Value::Object(mut map) if map.get("kind").and_then(Value::as_str) == Some("List") => {
                match map.remove("items").unwrap_or(Value::Null) {
                    Value::Array(items) => parser.items(document, items)?,
                    Value::Null => {}
                    _ => parser.fail(
                        document,
                        None,
                        None,
                        Invalid::Schema {
                            kind: "List".to_owned(),
                            message: "items must be a list".to_owned(),
                        },
                    ),
                }
            }
            other => parser.object(document, None, other)?,
        }
    }
    Ok(parser.out)
}

fn documents(text: &str, json: bool) -> Box<dyn Iterator<Item = Result<Value, String>> + '_> {
    if json {
        return Box::new(
            serde_json::Deserializer::from_str(text)
                .into_iter::<Value>()
                .map(|v| v.map_err(|e| e.to_string())),
        );
    }
    Box::new(yaml_documents(text).map(|document| {
        serde_saphyr::from_str_with_options::<Option<Value>>(document, yaml_options())
            .map(Option::unwrap_or_default)
            .map_err(|e| first_line(&e.to_string()))
    }))
}

/// The YAML documents of `text`, split at their `---` markers. A marker is `---` at the start
/// of a line followed by a blank or the line's end; YAML allows it nowhere else, so the split
/// is exact, and numbering documents here (an empty one too) keeps the numbers a user counts.
/// Text before the first marker is a document only when it holds more than comments.
fn yaml_documents(text: &str) -> impl Iterator<Item = &str> {
    let mut starts = vec![0];
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let rest = line.strip_prefix("---");
        if offset > 0
            && rest.is_some_and(|r| r.is_empty() || r.starts_with([' ', '\t', '\r', '\n']))
        {
            starts.push(offset);
        }
        offset += line.len();
    }
    let mut ends = starts[1..].to_vec();
    ends.push(text.len());
    starts
        .into_iter()
        .zip(ends)
        .map(|(start, end)| &text[start..end])
        .enumerate()
        .filter(|(i, document)| *i > 0 || !only_comments(document) || document.starts_with("---"))
        .map(|(_, document)| document)
}

fn only_comments(text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .all(|line| line.is_empty() || line.starts_with('#') || line.starts_with('%'))
}

fn yaml_options() -> Options {
    let mut budget = Budget::default();
    // A `kind: List` of every pod of a large cluster is one document.
    budget.max_events = usize::MAX;
    budget.max_nodes = usize::MAX;
    budget.max_total_scalar_bytes = usize::MAX;
    budget.max_aliases = MAX_ALIASES;
    budget.max_anchors = MAX_ALIASES;
    let mut options = Options::default();
    options.budget = Some(budget);
    // What all the aliases of a document may expand to, in parser events.
    options.alias_limits.max_total_replayed_events = 100 * MAX_ALIASES;
    options
}

/// The parser's messages quote the source at length; the first line says what and where.
fn first_line(message: &str) -> String {
    message
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_owned()
}

#[derive(Default)]
struct Parser {
    out: Documents,
    /// Where each valid or invalid key was first seen, to report copies.
    seen: HashMap<ObjectKey, usize>,
    count: usize,
    max_objects: usize,
}

impl Parser {
    fn items(&mut self, document: usize, items: Vec<Value>) -> Result<(), StreamError> {
        for (item, value) in items.into_iter().enumerate() {
            self.object(document, Some(item), value)?;
        }
        Ok(())
    }

    fn fail(
        &mut self,
        document: usize,
        item: Option<usize>,
        object: Option<ObjectKey>,
        problem: Invalid,
    ) {
        self.out.errors.push(ObjectError {
            document,
            item,
            object,
            problem,
        });
    }

    fn object(
        &mut self,
        document: usize,
        item: Option<usize>,
        value: Value,
    ) -> Result<(), StreamError> {
        self.count += 1;
        if self.count > self.max_objects {
            return Err(StreamError::TooManyObjects {
                document,
                max: self.max_objects,
            });
        }
        let key = match identify(&value) {
            Ok(key) => key,
            Err(problem) => {
                self.fail(document, item, None, problem);
                return Ok(());
            }
        };
        if let Some(&first) = self.seen.get(&key) {
            self.fail(document, item, Some(key), Invalid::Duplicate { first });
            return Ok(());
        }
        self.seen.insert(key.clone(), document);
        match convert(&key, value) {
            Ok(object) => self.out.objects.push(object),
            Err(problems) => {
                for problem in problems {
                    self.fail(document, item, Some(key.clone()), problem);
                }
            }
        }
        Ok(())
    }
}

/// Reads kind, namespace and name without trusting the rest of the object.
fn identify(value: &Value) -> Result<ObjectKey, Invalid> {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    if !value.is_object() {
        return Err(Invalid::NotAnObject);
    }
    let (Some(api_version), Some(kind)) = (text(value.get("apiVersion")), text(value.get("kind")))
    else {
        return Err(Invalid::NotAnObject);
    };
    let supported = match kind.as_str() {
        "Namespace" | "Node" | "Pod" => api_version == "v1",
        "EgressGateway" => api_version == API_VERSION,
        _ => false,
    };
    if !supported {
        return Err(Invalid::UnsupportedKind { api_version, kind });
    }
    let metadata = value.get("metadata");
    let Some(name) = text(metadata.and_then(|m| m.get("name"))).filter(|n| !n.is_empty()) else {
        return Err(Invalid::MissingName { kind });
    };
    // Like kubectl, a pod written without a namespace lives in "default".
    let namespace = (kind == "Pod").then(|| {
        text(metadata.and_then(|m| m.get("namespace")))
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_owned())
    });
    Ok(ObjectKey {
        kind,
        namespace,
        name,
    })
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use crate::model::Snapshot;
    use crate::testing::{GATEWAY, NAMESPACE, NODE, POD};

    fn parse(text: &str) -> Documents {
        parse_documents(text).unwrap()
    }

    fn messages(docs: &Documents) -> Vec<String> {
        docs.errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn multi_document_stream_with_unknown_kinds_and_schema_errors() {
        let text = format!(
            "---\n{NAMESPACE}---\n# only a comment\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: shop}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: broken, namespace: shop}}\nspec: {{hostNetwork: maybe}}\n---\n- 1\n---\n42\n---\napiVersion: v1\nkind: Pod\nmetadata: {{namespace: shop}}\n---\napiVersion: static-egress.io/v1beta1\nkind: EgressGateway\nmetadata: {{name: future}}\n---{NODE}---\n{POD}"
        );
        let docs = parse(&text);
        let kinds: Vec<String> = docs.objects.iter().map(|o| o.key().kind).collect();
        assert_eq!(kinds, ["Namespace", "Node", "Pod"]);
        assert_eq!(
            messages(&docs),
            [
                r#"document 3: kind "Service" of apiVersion "v1" is not supported; skipped"#,
                "document 4: Pod shop/broken: does not match the Pod schema: spec.hostNetwork: invalid type: string \"maybe\", expected a boolean",
                "document 5 items[0]: not a Kubernetes object (a mapping with apiVersion and kind)",
                "document 6: not a Kubernetes object (a mapping with apiVersion and kind)",
                "document 7: Pod without metadata.name",
                r#"document 8: kind "EgressGateway" of apiVersion "static-egress.io/v1beta1" is not supported; skipped"#,
            ]
        );
        // The schema failure still names the object, so a source can keep its last version.
        assert_eq!(
            docs.errors[1].object,
            Some(ObjectKey {
                kind: "Pod".into(),
                namespace: Some("shop".into()),
                name: "broken".into(),
            })
        );
    }

    #[test]
    fn list_kind() {
        let text = r#"
apiVersion: v1
kind: List
metadata: {resourceVersion: ""}
items:
- apiVersion: v1
  kind: Namespace
  metadata: {name: a}
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: c, namespace: a}
- apiVersion: static-egress.io/v1alpha1
  kind: EgressGateway
  metadata: {name: g}
  spec: {egressIPs: [192.0.2.1], namespaceSelector: {}}
---
apiVersion: v1
kind: List
items: []
"#;
        let docs = parse(text);
        let keys: Vec<String> = docs.objects.iter().map(|o| o.key().to_string()).collect();
        assert_eq!(keys, ["Namespace a", "EgressGateway g"]);
        assert_eq!(
            messages(&docs),
            [
                r#"document 1 items[1]: kind "ConfigMap" of apiVersion "v1" is not supported; skipped"#
            ]
        );
        let docs = parse("apiVersion: v1\nkind: List\nitems: {a: b}");
        assert_eq!(
            messages(&docs),
            ["document 1: does not match the List schema: items must be a list"]
        );
    }

    #[test]
    fn json_input() {
        let object = r#"{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a", "labels": {"x": "y"}}}"#;
        assert_eq!(parse(object).objects.len(), 1);

        // As `kubectl get -o json` prints a list; tabs would trip a YAML parser.
        let list = "{\n\t\"apiVersion\": \"v1\",\n\t\"kind\": \"List\",\n\t\"items\": [\n\t\t{\"apiVersion\": \"v1\", \"kind\": \"Node\", \"metadata\": {\"name\": \"n1\"}},\n\t\t{\"apiVersion\": \"v1\", \"kind\": \"Pod\", \"metadata\": {\"name\": \"p\", \"namespace\": \"a\"}, \"status\": {\"phase\": \"Running\", \"podIP\": \"10.244.0.9\"}}\n\t]\n}\n";
        let docs = parse(list);
        assert_eq!(docs.errors, []);
        let keys: Vec<String> = docs.objects.iter().map(|o| o.key().to_string()).collect();
        assert_eq!(keys, ["Node n1", "Pod a/p"]);

        // Several values in a row, and a bare array.
        let docs = parse(&format!("{object}\n[{object}]"));
        assert_eq!(docs.objects.len(), 1);
        assert_eq!(
            messages(&docs),
            [
                "document 2 items[0]: Namespace a: already defined by document 1; this copy is ignored"
            ]
        );

        // Broken as JSON and as YAML (a trailing comma alone is valid YAML flow style).
        let err = parse_documents("{\"kind\": \"Pod\",,}").unwrap_err();
        assert_eq!(err.document(), 1);
        assert!(
            err.to_string()
                .starts_with("document 1: YAML/JSON syntax error: "),
            "{err}"
        );
    }

    #[test]
    fn yaml_flow_style_is_not_mistaken_for_json() {
        let namespace = |name: &str| {
            format!(
                "{{apiVersion: v1, kind: Namespace, metadata: {{name: {name}, labels: {{team: x}}}}}}"
            )
        };
        let stream = format!("{}\n---\n{}\n", namespace("a"), namespace("b"));
        let keys = |docs: Documents| -> Vec<String> {
            docs.objects.iter().map(|o| o.key().to_string()).collect()
        };
        assert_eq!(keys(parse(&stream)), ["Namespace a", "Namespace b"]);
        assert_eq!(
            keys(parse(&format!("[{}]", namespace("a")))),
            ["Namespace a"]
        );
        // Broken either way: the error is JSON's, since the text looks like JSON.
        let err = parse_documents("{\"kind\": [\"Pod\"}").unwrap_err();
        assert_eq!(err.document(), 1);
        assert!(err.to_string().contains("at line 1 column"), "{err}");
    }

    #[test]
    fn broken_yaml_stream_is_an_error() {
        let text = format!(
            "{NAMESPACE}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: [unclosed\n---\n{NODE}"
        );
        let err = parse_documents(&text).unwrap_err();
        assert_eq!(err.document(), 2);
        assert!(err.to_string().contains("line"), "{err}");

        let err = parse_documents("a: 1\na: 2\n").unwrap_err();
        assert_eq!(err.document(), 1);
    }

    #[test]
    fn aliases_cannot_blow_a_document_up() {
        // Nine times nine times ... : a few lines that would expand to millions of nodes.
        let mut bomb = String::from(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n  labels:\n    l0: &l0 [x, x, x, x, x, x, x, x, x]\n",
        );
        for level in 1..10 {
            let up = level - 1;
            bomb.push_str(&format!("    l{level}: &l{level} [*l{up}, *l{up}, *l{up}, *l{up}, *l{up}, *l{up}, *l{up}, *l{up}, *l{up}]\n"));
        }
        let err = parse_documents(&bomb).unwrap_err();
        assert_eq!(err.document(), 1);
        assert!(
            err.to_string().contains("alias replay limit exceeded"),
            "{err}"
        );

        // So does a scalar anchored once and aliased past the limit.
        let mut many = String::from(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\nx: &big aaaa\ny:\n",
        );
        for _ in 0..=MAX_ALIASES {
            many.push_str("- *big\n");
        }
        assert!(parse_documents(&many).is_err());
        // A few shared values are fine.
        let shared = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n  labels: &l {team: x}\n  annotations: *l\n";
        assert_eq!(parse(shared).objects.len(), 1);
    }

    #[test]
    fn a_file_may_hold_only_so_many_objects() {
        let namespace =
            |i: usize| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: n{i}}}\n");
        let three: Vec<String> = (0..3).map(namespace).collect();
        assert_eq!(
            parse_at_most(&three.join("---\n"), 3)
                .unwrap()
                .objects
                .len(),
            3
        );
        let four: Vec<String> = (0..4).map(namespace).collect();
        assert_eq!(
            parse_at_most(&four.join("---\n"), 3)
                .unwrap_err()
                .to_string(),
            "document 4: more than 3 objects in one file"
        );
        // Items of a List count one by one.
        let list = format!(
            "apiVersion: v1\nkind: List\nitems: [{}]",
            ["{apiVersion: v1, kind: Namespace, metadata: {name: a}}"; 4].join(", ")
        );
        assert!(matches!(
            parse_at_most(&list, 3),
            Err(StreamError::TooManyObjects {
                document: 1,
                max: 3
            })
        ));
    }

    #[test]
    fn empty_input() {
        assert_eq!(parse(""), Documents::default());
        assert_eq!(parse("---\n---\n# nothing\n"), Documents::default());
    }

    #[test]
    fn duplicates_keep_the_first() {
        let docs = parse(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {v: '1'}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {v: '2'}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: a}",
        );
        assert_eq!(docs.objects.len(), 2);
        let ParsedObject::Namespace(ns) = &docs.objects[0] else {
            panic!("{docs:?}");
        };
        assert_eq!(ns.labels.get("v").map(String::as_str), Some("1"));
        assert_eq!(
            messages(&docs),
            ["document 2: Namespace a: already defined by document 1; this copy is ignored"]
        );
    }

    #[test]
    fn snapshot_from_objects() {
        let docs = parse(&format!("{NAMESPACE}---{NODE}---{POD}---{GATEWAY}"));
        assert_eq!(docs.errors, []);
        let snapshot: Snapshot = docs.objects.into_iter().collect();
        assert!(snapshot.namespaces.contains_key("shop"));
        assert!(snapshot.nodes.contains_key("worker-1"));
        assert!(
            snapshot
                .pods
                .contains_key(&("shop".to_owned(), "web-7d9f8b6c5-x2k4p".to_owned()))
        );
        assert!(snapshot.gateways.contains_key("corp-fw"));
    }
}
