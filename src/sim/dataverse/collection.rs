//! Collection queries of the Dataverse simulator: `$filter` (comparisons joined by `and`/`or`,
//! `not`, parentheses), `$select`, `$count`, server-driven paging (`Prefer: odata.maxpagesize`,
//! `@odata.nextLink` with a `$skiptoken`), and change tracking (`Prefer: odata.track-changes`,
//! `@odata.deltaLink` with a `$deltatoken`, deleted rows as `$deletedEntity` entries), per table
//! on or off (specs/dynamics.md, addendum "Change tracking through the Web API").
//!
//! Rows are served in primary-key order and a page's `$skiptoken` is the last key it held, so a
//! link stays valid while rows come and go. A delta token is the simulator's change counter when
//! the tracked read began: a row changed while the pages were being read comes again in the next
//! delta rather than being missed.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use axum::http::StatusCode;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use super::{Raw, Reply, Row, SimState, odata_error, render_fields};

/// Dataverse's own page size when no `odata.maxpagesize` is asked for.
const DEFAULT_PAGE_SIZE: usize = 5000;

/// The error Dataverse answers a change-tracking request on a table without it.
pub const CHANGE_TRACKING_OFF_CODE: &str = "0x80044800";

/// A deleted row, kept for change tracking.
#[derive(Debug, Clone)]
pub(super) struct Deletion {
    pub set: String,
    pub id: Uuid,
    pub version: u64,
}

/// What the `Prefer` header asks for.
#[derive(Debug, Default, PartialEq, Eq)]
struct Preferences {
    max_page_size: Option<usize>,
    track_changes: bool,
}

fn preferences(prefer: Option<&str>) -> Preferences {
    let mut p = Preferences::default();
    for part in prefer.unwrap_or("").split(',') {
        let part = part.trim();
        if let Some(n) = part.strip_prefix("odata.maxpagesize=") {
            p.max_page_size = n.trim().parse().ok().filter(|n| *n > 0);
        } else if part == "odata.track-changes" {
            p.track_changes = true;
        }
    }
    p
}

/// One entry of a result: a row, or a deletion (delta results only).
enum Entry<'a> {
    Row(&'a Row),
    Deleted(Uuid),
}

/// `GET {set}` with its query options.
pub(super) fn query(
    s: &mut SimState,
    set: &str,
    pk: &str,
    query: &BTreeMap<String, String>,
    prefer: Option<&str>,
) -> Reply {
    let prefs = preferences(prefer);
    let api = format!("{}{}", s.org, super::API_PREFIX);
    let delta_from = match query.get("$deltatoken").map(|t| t.parse::<u64>()) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(_)) => return odata_error(StatusCode::BAD_REQUEST, "0x80044801", "Invalid delta token."),
    };
    let tracked = delta_from.is_some() || prefs.track_changes;
    if tracked && s.untracked.contains(set) {
        let logical = super::find_set(set).map_or(set, |(_, _, l)| l);
        return odata_error(
            StatusCode::BAD_REQUEST,
            CHANGE_TRACKING_OFF_CODE,
            &format!("Entity '{logical}' is not enabled for change tracking."),
        );
    }
    if tracked && (query.contains_key("$filter") || query.contains_key("$orderby")) {
        return odata_error(
            StatusCode::BAD_REQUEST,
            "0x80060888",
            "$filter and $orderby are not supported with change tracking.",
        );
    }
    let filter = match query.get("$filter").map(|f| parse_filter(f)).transpose() {
        Ok(f) => f,
        Err(e) => return odata_error(StatusCode::BAD_REQUEST, "0x80060888", &e),
    };
    let select: Option<Vec<String>> = query.get("$select").map(|s| {
        let mut cols: Vec<String> = s
            .split(',')
            .map(|c| c.trim().to_owned())
            .filter(|c| !c.is_empty())
            .collect();
        if !cols.iter().any(|c| c == pk) {
            cols.push(pk.to_owned());
        }
        cols
    });
    let after = match query.get("$skiptoken").map(|t| Uuid::parse_str(t)) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => return odata_error(StatusCode::BAD_REQUEST, "0x80060888", "Invalid $skiptoken."),
    };
    // Where the next delta starts: carried along the pages of a tracked read.
    let next_token = match query.get("$trackfrom").map(|t| t.parse::<u64>()) {
        Some(Ok(t)) => t,
        _ => s.next_version,
    };
    let page_size = prefs
        .max_page_size
        .unwrap_or(DEFAULT_PAGE_SIZE)
        .min(DEFAULT_PAGE_SIZE);

    // `(x eq a or x eq b …)`: the rows come from an index of x, not a scan of the table.
    let candidates: Option<Vec<Uuid>> = filter
        .as_ref()
        .and_then(Filter::one_column_values)
        .map(|(field, values)| s.rows_with(set, &field, &values));
    let s: &SimState = s;
    let empty = BTreeMap::new();
    let table = s.tables.get(set).unwrap_or(&empty);
    let start = after.map_or(Bound::Unbounded, Bound::Excluded);
    let scanned: Box<dyn Iterator<Item = (&Uuid, &Row)>> = match &candidates {
        None => Box::new(table.range((start, Bound::Unbounded))),
        Some(ids) => Box::new(
            ids.iter()
                .filter(move |id| after.is_none_or(|a| **id > a))
                .filter_map(|id| table.get_key_value(id)),
        ),
    };
    let rows = scanned
        .filter(|(_, row)| delta_from.is_none_or(|from| row.version > from))
        .filter(|(_, row)| filter.as_ref().is_none_or(|f| f.matches(row)))
        .map(|(id, row)| (*id, Entry::Row(row)));
    let mut entries: Vec<(Uuid, Entry<'_>)> = match delta_from {
        None => rows.take(page_size + 1).collect(),
        Some(from) => {
            // Changed rows and deletions since the token, merged in key order.
            let mut all: Vec<(Uuid, Entry<'_>)> = rows.collect();
            let mut deleted: Vec<Uuid> = s
                .deleted
                .iter()
                .filter(|d| d.set == set && d.version > from && after.is_none_or(|a| d.id > a))
                .filter(|d| !table.contains_key(&d.id))
                .map(|d| d.id)
                .collect();
            deleted.sort();
            deleted.dedup();
            all.extend(deleted.into_iter().map(|id| (id, Entry::Deleted(id))));
            all.sort_by_key(|(id, _)| *id);
            all.truncate(page_size + 1);
            all
        }
    };
    let more = entries.len() > page_size;
    entries.truncate(page_size);

    let mut out = String::from("{");
    let context = match query.get("$select") {
        Some(l) => format!("{api}$metadata#{set}({l})"),
        None => format!("{api}$metadata#{set}"),
    };
    out.push_str(&format!("\"@odata.context\":{}", Value::String(context)));
    if after.is_none() && query.get("$count").is_some_and(|c| c == "true") {
        let total = table
            .values()
            .filter(|row| filter.as_ref().is_none_or(|f| f.matches(row)))
            .count();
        out.push_str(&format!(
            ",\"@odata.count\":{total},\"@Microsoft.Dynamics.CRM.totalrecordcount\":{total},\
             \"@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded\":false"
        ));
    }
    let rendered: Vec<String> = entries
        .iter()
        .map(|(id, entry)| match entry {
            Entry::Row(row) => render_fields(row, select.as_deref(), None),
            Entry::Deleted(id_) => {
                debug_assert_eq!(id, id_);
                serde_json::json!({
                    "@odata.context": format!("{api}$metadata#{set}/$deletedEntity"),
                    "id": id_.to_string(),
                    "reason": "deleted",
                })
                .to_string()
            }
        })
        .collect();
    out.push_str(&format!(",\"value\":[{}]", rendered.join(",")));
    if more && let Some((last, _)) = entries.last() {
        let mut params: Vec<(String, String)> = query
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "$skiptoken" | "$trackfrom" | "$count"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        params.push(("$skiptoken".into(), last.to_string()));
        if tracked {
            params.push(("$trackfrom".into(), next_token.to_string()));
        }
        let link = format!("{api}{set}?{}", encode(&params));
        out.push_str(&format!(",\"@odata.nextLink\":{}", Value::String(link)));
    } else if tracked {
        let mut params: Vec<(String, String)> = Vec::new();
        if let Some(sel) = query.get("$select") {
            params.push(("$select".into(), sel.clone()));
        }
        params.push(("$deltatoken".into(), next_token.to_string()));
        let link = format!("{api}{set}?{}", encode(&params));
        out.push_str(&format!(",\"@odata.deltaLink\":{}", Value::String(link)));
    }
    out.push('}');
    let mut headers = Vec::new();
    if let Some(n) = prefs.max_page_size {
        headers.push(("Preference-Applied", format!("odata.maxpagesize={n}")));
    }
    Reply {
        status: StatusCode::OK,
        body: out,
        headers,
    }
}

fn encode(params: &[(String, String)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish()
}

// ---------------------------------------------------------------------------------------------
// $filter

/// A parsed `$filter`.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Filter {
    Compare { field: String, op: Op, literal: Value },
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
    Not(Box<Filter>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

impl SimState {
    /// Ids (sorted) of the rows of `set` whose `field` is one of `values` (lower-case text).
    fn rows_with(&mut self, set: &str, field: &str, values: &[String]) -> Vec<Uuid> {
        let version = self.next_version;
        let key = (set.to_owned(), field.to_owned());
        let fresh = self.index.get(&key).is_some_and(|(at, _)| *at == version);
        if !fresh {
            let mut by_value: HashMap<String, Vec<Uuid>> = HashMap::new();
            for (id, row) in self.tables.get(set).into_iter().flatten() {
                if let Some(Value::String(v)) = row.fields.get(field).map(Raw::value) {
                    by_value.entry(v.to_lowercase()).or_default().push(*id);
                }
            }
            self.index.insert(key.clone(), (version, by_value));
        }
        let mut ids: Vec<Uuid> = self
            .index
            .get(&key)
            .into_iter()
            .flat_map(|(_, by_value)| values.iter().filter_map(|v| by_value.get(v)).flatten().copied())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

impl Filter {
    /// `(x eq 'a' or x eq 'b' …)` over one column with text (or Guid) values: the column and
    /// the values, lower-case.
    fn one_column_values(&self) -> Option<(String, Vec<String>)> {
        match self {
            Filter::Compare {
                field,
                op: Op::Eq,
                literal: Value::String(v),
            } => Some((field.clone(), vec![v.to_lowercase()])),
            Filter::Or(a, b) => {
                let (fa, mut va) = a.one_column_values()?;
                let (fb, vb) = b.one_column_values()?;
                (fa == fb).then(|| {
                    va.extend(vb);
                    (fa, va)
                })
            }
            _ => None,
        }
    }

    pub(super) fn matches(&self, row: &Row) -> bool {
        match self {
            Filter::And(a, b) => a.matches(row) && b.matches(row),
            Filter::Or(a, b) => a.matches(row) || b.matches(row),
            Filter::Not(a) => !a.matches(row),
            Filter::Compare { field, op, literal } => {
                let actual = row.fields.get(field).map_or(Value::Null, Raw::value);
                compare(&actual, *op, literal)
            }
        }
    }
}

fn compare(actual: &Value, op: Op, literal: &Value) -> bool {
    use std::cmp::Ordering;
    let ordering: Option<Ordering> = match (actual, literal) {
        (Value::Null, Value::Null) => Some(Ordering::Equal),
        (Value::Null, _) | (_, Value::Null) => None,
        (Value::String(a), Value::String(b)) => {
            if let (Ok(x), Ok(y)) = (Uuid::parse_str(a), Uuid::parse_str(b)) {
                Some(x.cmp(&y))
            } else if let (Ok(x), Ok(y)) = (
                OffsetDateTime::parse(a, &Rfc3339),
                OffsetDateTime::parse(b, &Rfc3339),
            ) {
                Some(x.cmp(&y))
            } else {
                Some(a.as_str().cmp(b.as_str()))
            }
        }
        (Value::Number(a), Value::Number(b)) => {
            a.as_f64().zip(b.as_f64()).and_then(|(a, b)| a.partial_cmp(&b))
        }
        (Value::Bool(a), Value::Bool(b)) => Some(a.cmp(b)),
        _ => None,
    };
    match op {
        Op::Eq => ordering == Some(Ordering::Equal),
        // In OData, `x ne null` is true for every non-null x, and `null ne 'a'` too.
        Op::Ne => ordering != Some(Ordering::Equal),
        Op::Gt => ordering == Some(Ordering::Greater),
        Op::Ge => matches!(ordering, Some(Ordering::Greater | Ordering::Equal)),
        Op::Lt => ordering == Some(Ordering::Less),
        Op::Le => matches!(ordering, Some(Ordering::Less | Ordering::Equal)),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Open,
    Close,
    Word(String),
    Text(String),
}

fn tokenize(filter: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = filter.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            // Every whitespace the word loop below stops at, or it would make empty words
            // without consuming anything, forever (a form feed in a fuzzed filter did).
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' => {
                chars.next();
                tokens.push(Token::Open);
            }
            ')' => {
                chars.next();
                tokens.push(Token::Close);
            }
            '\'' => {
                chars.next();
                let mut text = String::new();
                loop {
                    match chars.next() {
                        None => return Err(format!("unterminated string in $filter {filter:?}")),
                        Some('\'') if chars.peek() == Some(&'\'') => {
                            chars.next();
                            text.push('\'');
                        }
                        Some('\'') => break,
                        Some(ch) => text.push(ch),
                    }
                }
                tokens.push(Token::Text(text));
            }
            _ => {
                let mut word = String::new();
                while let Some(&ch) = chars.peek() {
                    if ch.is_whitespace() || ch == '(' || ch == ')' || ch == '\'' {
                        break;
                    }
                    word.push(ch);
                    chars.next();
                }
                tokens.push(Token::Word(word));
            }
        }
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
}

impl Parser {
    fn peek_word(&self, word: &str) -> bool {
        matches!(self.tokens.get(self.at), Some(Token::Word(w)) if w == word)
    }

    fn or(&mut self) -> Result<Filter, String> {
        let mut left = self.and()?;
        while self.peek_word("or") {
            self.at += 1;
            left = Filter::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Filter, String> {
        let mut left = self.unary()?;
        while self.peek_word("and") {
            self.at += 1;
            left = Filter::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Filter, String> {
        if self.peek_word("not") {
            self.at += 1;
            return Ok(Filter::Not(Box::new(self.unary()?)));
        }
        if self.tokens.get(self.at) == Some(&Token::Open) {
            self.at += 1;
            let inner = self.or()?;
            if self.tokens.get(self.at) != Some(&Token::Close) {
                return Err("unbalanced parentheses in $filter".into());
            }
            self.at += 1;
            return Ok(inner);
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Filter, String> {
        let field = match self.tokens.get(self.at) {
            Some(Token::Word(w)) => w.clone(),
            other => return Err(format!("expected a column name in $filter, found {other:?}")),
        };
        let op = match self.tokens.get(self.at + 1) {
            Some(Token::Word(w)) => match w.as_str() {
                "eq" => Op::Eq,
                "ne" => Op::Ne,
                "gt" => Op::Gt,
                "ge" => Op::Ge,
                "lt" => Op::Lt,
                "le" => Op::Le,
                other => {
                    return Err(format!(
                        "the simulator does not support the $filter operator {other:?}"
                    ));
                }
            },
            other => return Err(format!("expected an operator after {field:?}, found {other:?}")),
        };
        let literal = match self.tokens.get(self.at + 2) {
            Some(Token::Text(t)) => Value::String(t.clone()),
            Some(Token::Word(w)) => literal(w)?,
            other => return Err(format!("expected a value after {field:?}, found {other:?}")),
        };
        self.at += 3;
        Ok(Filter::Compare { field, op, literal })
    }
}

/// An unquoted literal: null, true/false, a Guid, a date-time, a number.
fn literal(word: &str) -> Result<Value, String> {
    match word {
        "null" => return Ok(Value::Null),
        "true" => return Ok(Value::Bool(true)),
        "false" => return Ok(Value::Bool(false)),
        _ => {}
    }
    if Uuid::parse_str(word).is_ok() || OffsetDateTime::parse(word, &Rfc3339).is_ok() {
        return Ok(Value::String(word.to_owned()));
    }
    serde_json::from_str::<serde_json::Number>(word)
        .map(Value::Number)
        .map_err(|_| format!("unsupported literal {word:?} in $filter"))
}

pub(super) fn parse_filter(filter: &str) -> Result<Filter, String> {
    let mut parser = Parser {
        tokens: tokenize(filter)?,
        at: 0,
    };
    let parsed = parser.or()?;
    if parser.at != parser.tokens.len() {
        return Err(format!("unexpected text at the end of $filter {filter:?}"));
    }
    Ok(parsed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn row(fields: &[(&str, &str)]) -> Row {
        Row {
            fields: fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Raw((*v).to_owned())))
                .collect(),
            version: 1,
        }
    }

    #[test]
    fn filters_parse_strings_guids_numbers_and_dates() {
        let f = parse_filter(
            "name eq 'O''Brien' and category eq 1000 and _x_value eq 5a1e0000-0000-4000-8000-000000001000",
        )
        .unwrap();
        let r = row(&[
            ("name", "\"O'Brien\""),
            ("category", "1000"),
            ("_x_value", "\"5A1E0000-0000-4000-8000-000000001000\""),
        ]);
        assert!(f.matches(&r));
        let r2 = row(&[("name", "\"O'Brien\""), ("category", "1001")]);
        assert!(!f.matches(&r2));
        assert!(parse_filter("category foo 3").is_err());
        assert!(parse_filter("(category eq 3").is_err());
    }

    #[test]
    fn filters_accept_any_whitespace_between_words() {
        let r = row(&[("statecode", "0")]);
        for space in ['\u{0b}', '\u{0c}', '\u{85}', '\u{a0}', '\u{2028}', '\u{3000}'] {
            let f = parse_filter(&format!("statecode{space}eq{space}0")).unwrap();
            assert!(f.matches(&r), "{space:?}");
            assert!(parse_filter(&format!("{space}")).is_err(), "{space:?}");
        }
    }

    #[test]
    fn filters_combine_or_not_and_ranges() {
        let r = row(&[
            ("statecode", "0"),
            ("modifiedon", "\"2025-03-01T10:00:00Z\""),
            ("description", "null"),
        ]);
        let yes = [
            "statecode eq 0 and modifiedon gt 2025-02-01T00:00:00Z",
            "(statecode eq 1 or statecode eq 0) and not (statecode eq 2)",
            "modifiedon ge 2025-03-01T10:00:00Z and modifiedon le 2025-03-01T10:00:00Z",
            "description eq null and statecode ne 1",
            "modifiedon lt 2025-03-01T10:00:00.001Z",
        ];
        for f in yes {
            assert!(parse_filter(f).unwrap().matches(&r), "{f}");
        }
        let no = [
            "modifiedon gt 2025-03-01T10:00:00Z",
            "statecode eq 1 or description ne null",
            "not statecode eq 0",
        ];
        for f in no {
            assert!(!parse_filter(f).unwrap().matches(&r), "{f}");
        }
    }

    #[test]
    fn prefer_header_is_read() {
        assert_eq!(
            preferences(Some(
                "odata.include-annotations=\"*\",odata.maxpagesize=50, odata.track-changes"
            )),
            Preferences {
                max_page_size: Some(50),
                track_changes: true
            }
        );
        assert_eq!(preferences(None), Preferences::default());
    }
}
