//! Field conversions, Dynamics value → Marketo JSON value (DESIGN.md §6).
//!
//! Tolerant of both Dynamics representations: the webhook's typed values (Money, OptionSetValue,
//! `/Date()/`) and the Web API's plain ones (money and decimals as numbers, option sets as
//! integers, dates as ISO strings). A value that is truly empty (null, absent, blank text)
//! becomes null: Marketo then clears the field, as Dynamics did. A value that does not fit its
//! conversion is *rejected*: the Marketo field is left as it is (the field is not sent), and the
//! caller counts and reports it. Overwriting the field with null would erase good data in
//! Marketo because of one odd value in Dynamics.

use rust_decimal::Decimal;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, OffsetDateTime, UtcOffset};
use uuid::Uuid;

use super::config::{Conversion, FieldMapping, SyncConfig};
use crate::dynamics::AttributeValue;

/// Why a value does not fit its conversion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub reason: String,
}

/// The Marketo value of `value` (absent or empty = null) under `mapping`, or why it does not
/// fit the conversion.
pub fn convert(mapping: &FieldMapping, value: Option<&AttributeValue>) -> Result<Value, Rejected> {
    use AttributeValue as A;
    let value = match value {
        None | Some(A::Null) => return Ok(Value::Null),
        Some(A::String(s)) if s.trim().is_empty() => return Ok(Value::Null),
        Some(v) => v,
    };
    let converted = match &mapping.conversion {
        Conversion::String => match value {
            A::String(s) => Some(Value::String(s.clone())),
            A::Int(n) => Some(Value::String(n.to_string())),
            A::Decimal(d) | A::Money(d) => Some(Value::String(d.normalize().to_string())),
            A::Bool(b) => Some(Value::String(b.to_string())),
            A::OptionSet(v) => Some(Value::String(v.to_string())),
            A::DateTime(t) => datetime(*t),
            A::EntityReference(r) => Some(Value::String(r.id.to_string())),
            _ => None,
        },
        Conversion::Int | Conversion::OptionsetValue => match value {
            A::Int(n) => Some(Value::from(*n)),
            A::OptionSet(v) => Some(Value::from(*v)),
            A::Decimal(d) | A::Money(d) => i64::try_from(d.round()).ok().map(Value::from),
            A::String(s) => s.trim().parse::<i64>().ok().map(Value::from),
            _ => None,
        },
        Conversion::Decimal | Conversion::Money => match value {
            A::Decimal(d) | A::Money(d) => number(*d),
            A::Int(n) => Some(Value::from(*n)),
            A::String(s) => s.trim().parse::<Decimal>().ok().and_then(number),
            _ => None,
        },
        Conversion::Bool => match value {
            A::Bool(b) => Some(Value::Bool(*b)),
            A::Int(0) | A::OptionSet(0) => Some(Value::Bool(false)),
            A::Int(1) | A::OptionSet(1) => Some(Value::Bool(true)),
            A::String(s) => s.trim().parse::<bool>().ok().map(Value::Bool),
            _ => None,
        },
        Conversion::Date => match value {
            A::DateTime(t) => date(t.to_offset(UtcOffset::UTC).date()),
            A::String(s) => parse_time(s).and_then(|t| date(t.date())),
            _ => None,
        },
        Conversion::Datetime => match value {
            A::DateTime(t) => datetime(*t),
            A::String(s) => parse_time(s).and_then(datetime),
            _ => None,
        },
        // An option value without a label is rejected (never the raw number): Marketo's field
        // holds labels, and a number there would look like one.
        Conversion::OptionsetLabel => value
            .as_option_value()
            .and_then(|v| SyncConfig::label(mapping, v))
            .map(|l| Value::String(l.to_owned())),
        Conversion::LookupId => match value {
            A::EntityReference(r) => Some(Value::String(r.id.to_string())),
            A::String(s) => Uuid::parse_str(s.trim())
                .ok()
                .map(|id| Value::String(id.to_string())),
            _ => None,
        },
        Conversion::LookupName => match value {
            // A reference without its name (Dynamics often sends none) names nothing: null.
            A::EntityReference(r) => Some(r.name.clone().map_or(Value::Null, Value::String)),
            _ => None,
        },
        // Refused by SyncConfig::problems at start; rejected if it ever gets here.
        Conversion::Unknown(_) => None,
    };
    converted.ok_or_else(|| Rejected {
        reason: format!(
            "{} does not fit the {} conversion",
            describe(value),
            conversion_name(&mapping.conversion)
        ),
    })
}

/// A short description of a Dynamics value for a rejection reason.
fn describe(value: &AttributeValue) -> String {
    // The stored form is `{"type": …, "value": …}`: the value alone says it best.
    let text = serde_json::to_value(value)
        .ok()
        .and_then(|v| v.get("value").cloned())
        .map_or_else(|| "a value".to_owned(), |v| v.to_string());
    // Bounded: a reason is logged and stored.
    if text.chars().count() > 80 {
        format!("{}…", text.chars().take(80).collect::<String>())
    } else {
        text
    }
}

fn conversion_name(c: &Conversion) -> String {
    serde_json::to_value(c)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{c:?}"))
}

/// An exact decimal as a JSON number (Marketo currency is a float, specs/marketo.md §3.2).
fn number(d: Decimal) -> Option<Value> {
    serde_json::from_str::<serde_json::Number>(&d.normalize().to_string())
        .ok()
        .map(Value::Number)
}

fn date(d: Date) -> Option<Value> {
    d.format(format_description!("[year]-[month]-[day]"))
        .ok()
        .map(Value::String)
}

fn datetime(t: OffsetDateTime) -> Option<Value> {
    t.to_offset(UtcOffset::UTC)
        .format(&Rfc3339)
        .ok()
        .map(Value::String)
}

/// An RFC 3339 timestamp or a bare `YYYY-MM-DD` (midnight UTC), as the Web API sends them.
fn parse_time(s: &str) -> Option<OffsetDateTime> {
    let s = s.trim();
    OffsetDateTime::parse(s, &Rfc3339).ok().or_else(|| {
        Date::parse(s, format_description!("[year]-[month]-[day]"))
            .ok()
            .map(|d| d.midnight().assume_utc())
    })
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use serde_json::json;
    use time::macros::datetime;

    use super::*;
    use crate::dynamics::EntityRef;

    /// The converted value, or the marker `"<rejected>"`.
    fn conv(m: &FieldMapping, v: Option<&AttributeValue>) -> Value {
        convert(m, v).unwrap_or_else(|_| json!(REJECTED))
    }

    const REJECTED: &str = "<rejected>";

    fn map(conversion: Conversion) -> FieldMapping {
        FieldMapping::new("x", "y", conversion)
    }

    fn dec(s: &str) -> Decimal {
        match Decimal::from_str(s) {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn string_takes_text_and_clears_to_null() {
        let m = map(Conversion::String);
        assert_eq!(
            conv(&m, Some(&AttributeValue::String("Big deal".into()))),
            json!("Big deal")
        );
        assert_eq!(conv(&m, Some(&AttributeValue::Null)), Value::Null);
        assert_eq!(conv(&m, None), Value::Null);
        assert_eq!(conv(&m, Some(&AttributeValue::Int(7))), json!("7"));
    }

    #[test]
    fn int_takes_integers_and_web_api_numbers() {
        let m = map(Conversion::Int);
        assert_eq!(conv(&m, Some(&AttributeValue::Int(60))), json!(60));
        assert_eq!(conv(&m, Some(&AttributeValue::Decimal(dec("59.6")))), json!(60));
        assert_eq!(
            conv(&m, Some(&AttributeValue::String("abc".into()))),
            json!(REJECTED)
        );
    }

    #[test]
    fn money_and_decimal_are_exact_numbers_whatever_the_representation() {
        for conversion in [Conversion::Money, Conversion::Decimal] {
            let m = map(conversion);
            assert_eq!(
                conv(&m, Some(&AttributeValue::Money(dec("1604.47")))),
                json!(1604.47)
            );
            assert_eq!(
                conv(&m, Some(&AttributeValue::Decimal(dec("25000.00")))),
                json!(25000)
            );
            assert_eq!(conv(&m, Some(&AttributeValue::Int(12))), json!(12));
            assert_eq!(conv(&m, Some(&AttributeValue::Null)), Value::Null);
        }
    }

    #[test]
    fn bool_takes_booleans_and_zero_one() {
        let m = map(Conversion::Bool);
        assert_eq!(conv(&m, Some(&AttributeValue::Bool(true))), json!(true));
        assert_eq!(conv(&m, Some(&AttributeValue::Int(0))), json!(false));
        assert_eq!(conv(&m, Some(&AttributeValue::OptionSet(1))), json!(true));
        assert_eq!(conv(&m, Some(&AttributeValue::Int(5))), json!(REJECTED));
    }

    #[test]
    fn date_is_the_utc_calendar_day() {
        let m = map(Conversion::Date);
        assert_eq!(
            conv(
                &m,
                Some(&AttributeValue::DateTime(datetime!(2025-03-31 00:00 UTC)))
            ),
            json!("2025-03-31")
        );
        assert_eq!(
            conv(
                &m,
                Some(&AttributeValue::DateTime(datetime!(2025-03-31 01:00 +02:00)))
            ),
            json!("2025-03-30")
        );
        assert_eq!(
            conv(&m, Some(&AttributeValue::String("2025-03-31".into()))),
            json!("2025-03-31")
        );
        assert_eq!(
            conv(&m, Some(&AttributeValue::String("2025-03-31T00:00:00Z".into()))),
            json!("2025-03-31")
        );
    }

    #[test]
    fn datetime_is_rfc3339_utc() {
        let m = map(Conversion::Datetime);
        assert_eq!(
            conv(
                &m,
                Some(&AttributeValue::DateTime(datetime!(2025-01-15 13:00 +01:00)))
            ),
            json!("2025-01-15T12:00:00Z")
        );
        assert_eq!(
            conv(&m, Some(&AttributeValue::String("2025-01-15T12:00:00Z".into()))),
            json!("2025-01-15T12:00:00Z")
        );
    }

    #[test]
    fn optionset_label_uses_labels_and_rejects_an_unlabelled_value() {
        let mut m = map(Conversion::OptionsetLabel);
        m.labels.insert("1".into(), "Hot".into());
        assert_eq!(conv(&m, Some(&AttributeValue::OptionSet(1))), json!("Hot"));
        assert_eq!(conv(&m, Some(&AttributeValue::Int(1))), json!("Hot"));
        assert_eq!(conv(&m, Some(&AttributeValue::OptionSet(9))), json!(REJECTED));
        assert_eq!(
            conv(&m, Some(&AttributeValue::String("1".into()))),
            json!(REJECTED)
        );
    }

    #[test]
    fn optionset_value_is_the_number() {
        let m = map(Conversion::OptionsetValue);
        assert_eq!(conv(&m, Some(&AttributeValue::OptionSet(3))), json!(3));
        assert_eq!(conv(&m, Some(&AttributeValue::Int(3))), json!(3));
    }

    #[test]
    fn lookup_id_and_lookup_name_read_the_reference() {
        let id = Uuid::from_u128(42);
        let r = AttributeValue::EntityReference(EntityRef {
            logical_name: "systemuser".into(),
            id,
            name: Some("Ann Owner".into()),
        });
        assert_eq!(conv(&map(Conversion::LookupId), Some(&r)), json!(id.to_string()));
        assert_eq!(conv(&map(Conversion::LookupName), Some(&r)), json!("Ann Owner"));
        assert_eq!(
            conv(
                &map(Conversion::LookupId),
                Some(&AttributeValue::String(id.to_string()))
            ),
            json!(id.to_string())
        );
        let unnamed = AttributeValue::EntityReference(EntityRef {
            logical_name: "systemuser".into(),
            id,
            name: None,
        });
        assert_eq!(conv(&map(Conversion::LookupName), Some(&unnamed)), Value::Null);
    }

    /// Every conversion a mapping may name.
    const CONVERSIONS: [&str; 11] = [
        "string",
        "int",
        "decimal",
        "money",
        "bool",
        "date",
        "datetime",
        "optionset_label",
        "optionset_value",
        "lookup_id",
        "lookup_name",
    ];

    #[test]
    fn a_mismatched_value_is_rejected_never_null_never_a_panic() {
        let odd = AttributeValue::Other(json!({"weird": true}));
        for (name, conversion) in CONVERSIONS
            .into_iter()
            .chain(["nonsense"])
            .map(|n| (n, Conversion::from(n.to_owned())))
        {
            let m = map(conversion);
            let rejected = convert(&m, Some(&odd)).expect_err(name);
            assert!(rejected.reason.contains("weird"), "{name}: {}", rejected.reason);
        }
    }

    #[test]
    fn a_truly_empty_value_clears_the_field_under_every_conversion() {
        for name in CONVERSIONS {
            let m = map(Conversion::from(name.to_owned()));
            for empty in [
                None,
                Some(AttributeValue::Null),
                Some(AttributeValue::String("  ".into())),
            ] {
                assert_eq!(convert(&m, empty.as_ref()), Ok(Value::Null), "{name} {empty:?}");
            }
        }
    }

    #[test]
    fn a_value_that_does_not_fit_says_what_and_which_conversion() {
        let r = convert(
            &map(Conversion::Int),
            Some(&AttributeValue::String("about half".into())),
        )
        .unwrap_err();
        assert_eq!(r.reason, "\"about half\" does not fit the int conversion");
    }
}
