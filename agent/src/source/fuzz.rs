//! A bounded fuzz of the object parser, run by every `cargo test`: realistic files (objects as
//! `kubectl get -o yaml` and `-o json` print them, multi-document streams, `kind: List`s, the
//! example file) are mutated the way truncated, hand-edited, corrupted and hostile files are
//! (bit flips, truncation, duplicated and deleted spans, YAML syntax, anchors and aliases, huge
//! numbers, deep nesting, fields of the wrong type), and [`parse_documents`] must neither panic
//! nor take long, and must keep its promises: each object once, errors naming documents that
//! exist, output in proportion to the input. And the same objects read the same in every
//! format the README names.
//!
//! The budget is [`CASES`] cases per property and [`SECONDS`] of wall-clock per property,
//! whichever ends first (a loaded machine runs fewer cases, never longer). For a longer run:
//! `SE_FUZZ_CASES=100000 SE_FUZZ_SECONDS=600 cargo test --release -p static-egress --lib fuzz`.

use std::collections::HashSet;
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::Value;

use super::documents::{Documents, StreamError, parse_documents};
use crate::model::{Invalid, ObjectKey, ParsedObject};
use crate::testing::{GATEWAY, NAMESPACE, NODE, POD};

/// Cases per property, unless `SE_FUZZ_CASES` says otherwise.
const CASES: u32 = 400;
/// Wall-clock per property, unless `SE_FUZZ_SECONDS` says otherwise.
const SECONDS: u64 = 4;
/// The longest one parse of these few kilobytes may take, in a debug build on a busy machine.
const PER_CASE: Duration = Duration::from_secs(2);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: env_or("SE_FUZZ_CASES", CASES),
        // Shrinking a slow or huge input could take long itself; a failure prints the input.
        max_shrink_time: 10_000,
        ..ProptestConfig::default()
    }
}

/// Whether a property that started at `started` (its first case) has spent its wall-clock
/// budget: the remaining cases pass untried.
fn spent(started: &OnceLock<Instant>) -> bool {
    started.get_or_init(Instant::now).elapsed()
        > Duration::from_secs(env_or("SE_FUZZ_SECONDS", SECONDS))
}

/// The same objects as JSON, as `kubectl get -o json` prints them.
fn json(yaml: &str) -> String {
    let value: Value =
        serde_saphyr::from_str(yaml).unwrap_or_else(|e| panic!("seed does not parse: {e}\n{yaml}"));
    serde_json::to_string_pretty(&value).unwrap_or_else(|e| panic!("{e}"))
}

/// Realistic inputs to start from.
static SEEDS: LazyLock<Vec<String>> = LazyLock::new(|| {
    let kubectl = [NAMESPACE, NODE, POD, GATEWAY];
    let list = format!(
        "apiVersion: v1\nkind: List\nmetadata: {{resourceVersion: \"\"}}\nitems:\n{}",
        kubectl
            .iter()
            .map(|object| {
                let mut lines = object.trim().lines();
                let first = lines.next().unwrap_or_default();
                let rest: Vec<String> = lines.map(|l| format!("  {l}")).collect();
                format!("- {first}\n{}\n", rest.join("\n"))
            })
            .collect::<String>()
    );
    let json_list = format!(
        "{{\n\t\"apiVersion\": \"v1\",\n\t\"kind\": \"List\",\n\t\"items\": [{}]\n}}\n",
        kubectl.map(json).join(",\n")
    );
    let mut seeds: Vec<String> = kubectl.iter().map(|s| (*s).to_owned()).collect();
    seeds.extend([
        format!("---\n{}", kubectl.join("---\n")),
        list.clone(),
        json_list,
        kubectl.map(json).join("\n"),
        json(POD),
        include_str!("../../../examples/objects.yaml").to_owned(),
        // Two copies of each object, one of them a List item: duplicates to report.
        format!("{}---\n{list}", kubectl.join("---\n")),
        // Shared labels, as a hand-written file may have them.
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n  labels: &l {team: pay}\n  \
         annotations: *l\n---\napiVersion: v1\nkind: Node\nmetadata: {name: n, labels: *l}\n"
            .to_owned(),
    ]);
    seeds
});

/// Text a hand, an editor or an attacker might put anywhere.
const SNIPPETS: &[&str] = &[
    "---\n",
    "--- ",
    "...\n",
    "%YAML 1.1\n",
    "%TAG ! tag:example.com,2000:\n",
    "{",
    "}",
    "[",
    "]",
    ", ",
    ": ",
    "- ",
    "? ",
    "\t",
    "\n",
    "\r\n",
    "  ",
    "#",
    "'",
    "\"",
    "\\",
    "|\n",
    ">-\n",
    "&a ",
    "*a",
    "&a [x, x, x]",
    "[*a, *a, *a, *a]",
    "<<: *a\n",
    "!!binary ",
    "!!str ",
    "!!int ",
    "!custom ",
    "~",
    "null",
    "yes",
    "no",
    "on",
    "0x1F",
    "0o17",
    "1e400",
    "-1",
    ".inf",
    ".nan",
    "18446744073709551616",
    "999999999999999999999999999999999999999999",
    "-9223372036854775809",
    "\u{feff}",
    "\u{0}",
    "\u{7f}",
    "\u{2028}",
    "é",
    "💥",
    "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n",
    "kind: List\nitems: ",
    "metadata: {name: ''}\n",
    "name: dup\nname: dup\n",
];

/// A place in the text: anywhere, or where YAML structure is (a line start, after a key, at a
/// list item), where a change keeps more of the file parseable.
#[derive(Clone, Copy, Debug)]
enum At {
    Byte(usize),
    Line(usize),
    Value(usize),
    Item(usize),
}

fn arb_at() -> impl Strategy<Value = At> {
    prop_oneof![
        2 => any::<usize>().prop_map(At::Byte),
        2 => any::<usize>().prop_map(At::Line),
        3 => any::<usize>().prop_map(At::Value),
        1 => any::<usize>().prop_map(At::Item),
    ]
}

impl At {
    fn resolve(self, text: &[u8]) -> usize {
        let after = |needle: &[u8], n: usize| {
            let places: Vec<usize> = text
                .windows(needle.len())
                .enumerate()
                .filter(|(_, w)| *w == needle)
                .map(|(i, _)| i + needle.len())
                .collect();
            if places.is_empty() {
                n % (text.len() + 1)
            } else {
                places[n % places.len()]
            }
        };
        match self {
            Self::Byte(n) => n % (text.len() + 1),
            Self::Line(n) => {
                if n % 5 == 0 {
                    0
                } else {
                    after(b"\n", n)
                }
            }
            Self::Value(n) => after(b": ", n),
            Self::Item(n) => after(b"- ", n),
        }
    }
}

#[derive(Clone, Debug)]
enum Mutation {
    FlipBit {
        at: At,
        bit: u8,
    },
    Truncate {
        at: At,
    },
    Delete {
        at: At,
        len: usize,
    },
    Duplicate {
        from: At,
        len: usize,
        to: At,
    },
    Insert {
        at: At,
        snippet: &'static str,
    },
    /// Replaces the number at or after `at` with one of the snippets' huge ones.
    HugeNumber {
        at: At,
        number: &'static str,
    },
    /// `depth` levels of flow sequences, flow mappings or block sequences.
    Nest {
        at: At,
        depth: usize,
        style: u8,
    },
    /// An anchored value and aliases to it: the start of an alias bomb.
    Alias {
        at: At,
        copies: usize,
        to: At,
    },
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    let numbers = &[
        "18446744073709551616",
        "-9223372036854775809",
        "1e400",
        "99999999999999999999999999999999999999999999999999",
        "4294967296",
        "0.000000000000000000000000000000000000000001",
        "256.256.256.256",
        "10.0.0.0/33",
    ][..];
    prop_oneof![
        3 => (arb_at(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        1 => arb_at().prop_map(|at| Mutation::Truncate { at }),
        2 => (arb_at(), 1usize..64).prop_map(|(at, len)| Mutation::Delete { at, len }),
        2 => (arb_at(), 1usize..400, arb_at())
            .prop_map(|(from, len, to)| Mutation::Duplicate { from, len, to }),
        5 => (arb_at(), proptest::sample::select(SNIPPETS))
            .prop_map(|(at, snippet)| Mutation::Insert { at, snippet }),
        2 => (arb_at(), proptest::sample::select(numbers))
            .prop_map(|(at, number)| Mutation::HugeNumber { at, number }),
        1 => (arb_at(), prop_oneof![1usize..80, 80usize..400], 0u8..3)
            .prop_map(|(at, depth, style)| Mutation::Nest { at, depth, style }),
        1 => (arb_at(), 1usize..40, arb_at())
            .prop_map(|(at, copies, to)| Mutation::Alias { at, copies, to }),
    ]
}

impl Mutation {
    fn apply(&self, text: &mut Vec<u8>) {
        let insert = |text: &mut Vec<u8>, at: usize, bytes: &[u8]| {
            text.splice(at..at, bytes.iter().copied());
        };
        match *self {
            Self::FlipBit { at, bit } => {
                let i = at.resolve(text);
                if let Some(byte) = text.get_mut(i) {
                    *byte ^= 1 << bit;
                }
            }
            Self::Truncate { at } => {
                let i = at.resolve(text);
                text.truncate(i);
            }
            Self::Delete { at, len } => {
                let i = at.resolve(text);
                text.drain(i..(i + len).min(text.len()));
            }
            Self::Duplicate { from, len, to } => {
                let i = from.resolve(text);
                let span = text[i..(i + len).min(text.len())].to_vec();
                let j = to.resolve(text);
                insert(text, j, &span);
            }
            Self::Insert { at, snippet } => {
                let i = at.resolve(text);
                insert(text, i, snippet.as_bytes());
            }
            Self::HugeNumber { at, number } => {
                let i = at.resolve(text);
                let start = (i..text.len()).find(|&k| text[k].is_ascii_digit());
                if let Some(start) = start {
                    let end = (start..text.len())
                        .find(|&k| !(text[k].is_ascii_digit() || text[k] == b'.'))
                        .unwrap_or(text.len());
                    text.splice(start..end, number.bytes());
                }
            }
            Self::Nest { at, depth, style } => {
                let i = at.resolve(text);
                let nested = match style {
                    0 => format!("{}x{}", "[".repeat(depth), "]".repeat(depth)),
                    1 => format!("{}x{}", "{a: ".repeat(depth), "}".repeat(depth)),
                    _ => (0..depth)
                        .map(|d| format!("\n{}- ", " ".repeat(2 * d)))
                        .collect::<String>(),
                };
                insert(text, i, nested.as_bytes());
            }
            Self::Alias { at, copies, to } => {
                let i = at.resolve(text);
                insert(text, i, b"&bomb ");
                let aliases = format!("[{}]", vec!["*bomb"; copies].join(", "));
                let j = to.resolve(text);
                insert(text, j, aliases.as_bytes());
            }
        }
    }
}

/// The highest document number `text` can have: YAML documents start at `---` lines (see
/// `yaml_documents`), JSON values take at least a byte each.
fn max_document(text: &str) -> usize {
    if text.trim_start().starts_with(['{', '[']) {
        return text.len().max(1);
    }
    1 + text
        .split_inclusive('\n')
        .skip(1)
        .filter(|line| {
            line.strip_prefix("---")
                .is_some_and(|r| r.is_empty() || r.starts_with([' ', '\t', '\r', '\n']))
        })
        .count()
}

/// Parses `text` and checks every promise [`parse_documents`] makes.
fn check(text: &str) -> Result<(), TestCaseError> {
    let started = Instant::now();
    let parsed = parse_documents(text);
    let took = started.elapsed();
    prop_assert!(took < PER_CASE, "{took:?} to parse {} bytes", text.len());
    let max = max_document(text);
    match parsed {
        Err(error) => {
            prop_assert!((1..=max).contains(&error.document()), "{error} of {max}");
            let too_many = matches!(error, StreamError::TooManyObjects { .. });
            prop_assert!(
                !too_many,
                "a small file cannot hold a million objects: {error}"
            );
        }
        Ok(Documents { objects, errors }) => {
            let mut keys = HashSet::new();
            for object in &objects {
                let key = object.key();
                prop_assert!(!key.name.is_empty(), "{key:?}");
                prop_assert!(keys.insert(key.clone()), "{key} returned twice");
            }
            let mut previous = 1;
            for error in &errors {
                prop_assert!((1..=max).contains(&error.document), "{error} of {max}");
                prop_assert!(
                    error.document >= previous,
                    "{error} after document {previous}"
                );
                previous = error.document;
                if let Invalid::Duplicate { first } = error.problem {
                    prop_assert!((1..=error.document).contains(&first), "{error}");
                }
                // Display never panics, and names the document.
                let message = error.to_string();
                let named = format!("document {}", error.document);
                prop_assert!(message.starts_with(&named), "{message}");
            }
            // Aliases are capped, so what comes out is in proportion to what went in.
            let size = format!("{objects:?}").len();
            prop_assert!(
                size <= 1_000 * text.len().max(1_000),
                "{size} bytes of objects from {} bytes of text",
                text.len()
            );
        }
    }
    Ok(())
}

/// A field of an object set to something of the wrong type, or of the right type and a
/// hostile value.
fn arb_field_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        proptest::sample::select(SNIPPETS).prop_map(Value::from),
        proptest::sample::select(
            &[
                "",
                "10.244.1.5",
                "10.244.1.0/24",
                "fd00::1",
                "0.0.0.0/0",
                "1.2.3.4/32",
                "192.0.2.200",
                "In",
                "NotIn",
                "Running",
                "True",
                "FailOpen",
                "v1",
                "Pod",
                "EgressGateway",
                "static-egress.io/v1alpha1",
            ][..]
        )
        .prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            vec(("[a-zA-Z]{1,8}", inner), 0..4)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
        ]
    })
}

/// Sets the value at a path picked from `picks` in `value`, walking into existing fields.
fn set_somewhere(value: &mut Value, picks: &[usize], new: Value) {
    let Some((&pick, rest)) = picks.split_first() else {
        *value = new;
        return;
    };
    match value {
        Value::Object(map) if !map.is_empty() => {
            let len = map.len();
            if let Some((_, inner)) = map.iter_mut().nth(pick % len) {
                set_somewhere(inner, rest, new);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let len = items.len();
            set_somewhere(&mut items[pick % len], rest, new);
        }
        _ => *value = new,
    }
}

/// `kubectl get -o json` output turned into YAML flow style, keys unquoted: valid YAML that
/// starts like JSON.
fn flow_yaml(json: &str) -> String {
    json.lines()
        .map(|line| {
            let indent = line.len() - line.trim_start().len();
            let rest = &line[indent..];
            match rest.strip_prefix('"').and_then(|r| r.split_once("\": ")) {
                Some((key, value)) => format!("{}{key}: {value}\n", &line[..indent]),
                None => format!("{line}\n"),
            }
        })
        .collect()
}

/// What a parse says about the objects, whatever the format and the document numbers: the
/// objects, and each error's object and whether it is a duplicate.
type Outcome = (Vec<ParsedObject>, Vec<(Option<ObjectKey>, bool)>);

fn outcome(text: &str) -> Result<Outcome, String> {
    let docs = parse_documents(text).map_err(|e| format!("{e}\n{text}"))?;
    let errors = docs
        .errors
        .iter()
        .map(|e| {
            (
                e.object.clone(),
                matches!(e.problem, Invalid::Duplicate { .. }),
            )
        })
        .collect();
    Ok((docs.objects, errors))
}

proptest! {
    #![proptest_config(config())]

    /// Realistic files, mutated byte by byte and span by span.
    #[test]
    fn mutated_files_never_break_the_parser(
        seed in 0..SEEDS.len(),
        mutations in vec(arb_mutation(), 1..6),
    ) {
        static STARTED: OnceLock<Instant> = OnceLock::new();
        if spent(&STARTED) {
            return Ok(());
        }
        let mut bytes = SEEDS[seed].clone().into_bytes();
        for mutation in &mutations {
            mutation.apply(&mut bytes);
        }
        check(&String::from_utf8_lossy(&bytes))?;
    }

    /// Valid YAML and JSON whose objects have fields of the wrong type or hostile values:
    /// these reach conversion, where byte mutations mostly stop at the syntax.
    #[test]
    fn objects_with_wrong_fields_never_break_the_parser(
        seed in 0..4usize,
        edits in vec((vec(any::<usize>(), 1..5), arb_field_value()), 1..4),
        as_json in any::<bool>(),
    ) {
        static STARTED: OnceLock<Instant> = OnceLock::new();
        if spent(&STARTED) {
            return Ok(());
        }
        let yaml = [NAMESPACE, NODE, POD, GATEWAY][seed];
        let mut value: Value = serde_saphyr::from_str(yaml)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (path, new) in edits {
            set_somewhere(&mut value, &path, new);
        }
        let text = if as_json {
            serde_json::to_string(&value).map_err(|e| TestCaseError::fail(e.to_string()))?
        } else {
            serde_saphyr::to_string(&value).map_err(|e| TestCaseError::fail(e.to_string()))?
        };
        check(&text)?;
    }
}

proptest! {
    // Six parses of up to five whole objects a case: fewer cases.
    #![proptest_config(ProptestConfig { cases: config().cases / 8, ..config() })]

    /// The same objects read the same in every format the README names: a YAML stream, JSON
    /// values one after another, a JSON array, a JSON `List` indented with tabs, YAML flow
    /// style, and a YAML `List`.
    #[test]
    fn every_format_reads_the_same(picks in vec(0..4usize, 0..5)) {
        static STARTED: OnceLock<Instant> = OnceLock::new();
        if spent(&STARTED) {
            return Ok(());
        }
        let yaml: Vec<&str> = picks.iter().map(|&i| [NAMESPACE, NODE, POD, GATEWAY][i]).collect();
        let json: Vec<String> = yaml.iter().map(|y| json(y)).collect();
        let flow: Vec<String> = json.iter().map(|j| flow_yaml(j)).collect();
        let compact: Vec<String> = json
            .iter()
            .map(|j| serde_json::from_str::<Value>(j).map(|v| v.to_string()))
            .collect::<Result<_, _>>()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let renderings = [
            yaml.iter().map(|y| format!("---\n{y}")).collect::<String>(),
            json.join("\n"),
            format!("[{}]", json.join(",\n")),
            format!(
                "{{\n\t\"apiVersion\": \"v1\",\n\t\"kind\": \"List\",\n\t\"items\": [\n\t{}\n\t]\n}}",
                json.join(",\n").replace('\n', "\n\t")
            ),
            flow.join("---\n"),
            format!("apiVersion: v1\nkind: List\nitems:\n{}",
                compact.iter().map(|c| format!("- {c}\n")).collect::<String>()),
        ];
        let expected = outcome(&renderings[0]).map_err(TestCaseError::fail)?;
        prop_assert_eq!(expected.0.len(), picks.iter().collect::<HashSet<_>>().len());
        for text in &renderings[1..] {
            let got = outcome(text).map_err(TestCaseError::fail)?;
            prop_assert_eq!(&got, &expected, "{}", text);
        }
    }
}
