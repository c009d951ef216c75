//! Field conversions, Dynamics value → Marketo JSON value (DESIGN.md §6).
//!
//! Tolerant of both Dynamics representations: the webhook's typed values (Money, OptionSetValue,
//! `/Date()/`) and the Web API's plain ones (money and decimals as numbers, option sets as
//! integers, dates as ISO strings). A value that does not fit its conversion becomes null rather
//! than an error: one odd field must not stop an opportunity from syncing, and Marketo stores
//! null for "no value" (specs/marketo.md §3.2).

use rust_decimal::Decimal;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, OffsetDateTime, UtcOffset};
use uuid::Uuid;

use super::config::{Conversion, FieldMapping, SyncConfig};
use crate::dynamics::AttributeValue;

/// The Marketo value of `value` (absent = null) under `mapping`.
pub fn convert(mapping: &FieldMapping, value: Option<&AttributeValue>) -> Value {
    let Some(value) = value else {
        return Value::Null;
    };
    use AttributeValue as A;
    match &mapping.conversion {
        Conversion::String => match value {
            A::String(s) => Value::String(s.clone()),
            A::Int(n) => Value::String(n.to_string()),
            A::Decimal(d) | A::Money(d) => Value::String(d.normalize().to_string()),
            A::Bool(b) => Value::String(b.to_string()),
            A::OptionSet(v) => Value::String(v.to_string()),
            A::DateTime(t) => datetime(*t),
            A::EntityReference(r) => Value::String(r.id.to_string()),
            _ => Value::Null,
        },
        Conversion::Int | Conversion::OptionsetValue => match value {
            A::Int(n) => Value::from(*n),
            A::OptionSet(v) => Value::from(*v),
            A::Decimal(d) | A::Money(d) => i64::try_from(d.round()).map_or(Value::Null, Value::from),
            A::String(s) => s.trim().parse::<i64>().map_or(Value::Null, Value::from),
            _ => Value::Null,
        },
        Conversion::Decimal | Conversion::Money => match value {
            A::Decimal(d) | A::Money(d) => number(*d),
            A::Int(n) => Value::from(*n),
            A::String(s) => s.trim().parse::<Decimal>().map_or(Value::Null, number),
            _ => Value::Null,
        },
        Conversion::Bool => match value {
            A::Bool(b) => Value::Bool(*b),
            A::Int(0) | A::OptionSet(0) => Value::Bool(false),
            A::Int(1) | A::OptionSet(1) => Value::Bool(true),
            A::String(s) => s.trim().parse::<bool>().map_or(Value::Null, Value::Bool),
            _ => Value::Null,
        },
        Conversion::Date => match value {
            A::DateTime(t) => date(t.to_offset(UtcOffset::UTC).date()),
            A::String(s) => parse_time(s).map_or(Value::Null, |t| date(t.date())),
            _ => Value::Null,
        },
        Conversion::Datetime => match value {
            A::DateTime(t) => datetime(*t),
            A::String(s) => parse_time(s).map_or(Value::Null, datetime),
            _ => Value::Null,
        },
        // An option value without a label is emitted as null (never a panic, never the raw
        // number): Marketo's field holds labels, and a number there would look like one.
        Conversion::OptionsetLabel => value
            .as_option_value()
            .and_then(|v| SyncConfig::label(mapping, v))
            .map_or(Value::Null, |l| Value::String(l.to_owned())),
        Conversion::LookupId => match value {
            A::EntityReference(r) => Value::String(r.id.to_string()),
            A::String(s) => Uuid::parse_str(s.trim()).map_or(Value::Null, |id| Value::String(id.to_string())),
            _ => Value::Null,
        },
        Conversion::LookupName => match value {
            A::EntityReference(r) => r.name.clone().map_or(Value::Null, Value::String),
            _ => Value::Null,
        },
        // Refused by SyncConfig::problems at start; null if it ever gets here.
        Conversion::Unknown(_) => Value::Null,
    }
}

/// An exact decimal as a JSON number (Marketo currency is a float, specs/marketo.md §3.2).
fn number(d: Decimal) -> Value {
    serde_json::from_str::<serde_json::Number>(&d.normalize().to_string()).map_or(Value::Null, Value::Number)
}

fn date(d: Date) -> Value {
    d.format(format_description!("[year]-[month]-[day]"))
        .map_or(Value::Null, Value::String)
}

fn datetime(t: OffsetDateTime) -> Value {
    t.to_offset(UtcOffset::UTC)
        .format(&Rfc3339)
        .map_or(Value::Null, Value::String)
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
            convert(&m, Some(&AttributeValue::String("Big deal".into()))),
            json!("Big deal")
        );
        assert_eq!(convert(&m, Some(&AttributeValue::Null)), Value::Null);
        assert_eq!(convert(&m, None), Value::Null);
        assert_eq!(convert(&m, Some(&AttributeValue::Int(7))), json!("7"));
    }

    #[test]
    fn int_takes_integers_and_web_api_numbers() {
        let m = map(Conversion::Int);
        assert_eq!(convert(&m, Some(&AttributeValue::Int(60))), json!(60));
        assert_eq!(
            convert(&m, Some(&AttributeValue::Decimal(dec("59.6")))),
            json!(60)
        );
        assert_eq!(
            convert(&m, Some(&AttributeValue::String("abc".into()))),
            Value::Null
        );
    }

    #[test]
    fn money_and_decimal_are_exact_numbers_whatever_the_representation() {
        for conversion in [Conversion::Money, Conversion::Decimal] {
            let m = map(conversion);
            assert_eq!(
                convert(&m, Some(&AttributeValue::Money(dec("1604.47")))),
                json!(1604.47)
            );
            assert_eq!(
                convert(&m, Some(&AttributeValue::Decimal(dec("25000.00")))),
                json!(25000)
            );
            assert_eq!(convert(&m, Some(&AttributeValue::Int(12))), json!(12));
            assert_eq!(convert(&m, Some(&AttributeValue::Null)), Value::Null);
        }
    }

    #[test]
    fn bool_takes_booleans_and_zero_one() {
        let m = map(Conversion::Bool);
        assert_eq!(convert(&m, Some(&AttributeValue::Bool(true))), json!(true));
        assert_eq!(convert(&m, Some(&AttributeValue::Int(0))), json!(false));
        assert_eq!(convert(&m, Some(&AttributeValue::OptionSet(1))), json!(true));
        assert_eq!(convert(&m, Some(&AttributeValue::Int(5))), Value::Null);
    }

    #[test]
    fn date_is_the_utc_calendar_day() {
        let m = map(Conversion::Date);
        assert_eq!(
            convert(
                &m,
                Some(&AttributeValue::DateTime(datetime!(2025-03-31 00:00 UTC)))
            ),
            json!("2025-03-31")
        );
        assert_eq!(
            convert(
                &m,
                Some(&AttributeValue::DateTime(datetime!(2025-03-31 01:00 +02:00)))
            ),
            json!("2025-03-30")
        );
        assert_eq!(
            convert(&m, Some(&AttributeValue::String("2025-03-31".into()))),
            json!("2025-03-31")
        );
        assert_eq!(
            convert(&m, Some(&AttributeValue::String("2025-03-31T00:00:00Z".into()))),
            json!("2025-03-31")
        );
    }

    #[test]
    fn datetime_is_rfc3339_utc() {
        let m = map(Conversion::Datetime);
        assert_eq!(
            convert(
                &m,
                Some(&AttributeValue::DateTime(datetime!(2025-01-15 13:00 +01:00)))
            ),
            json!("2025-01-15T12:00:00Z")
        );
        assert_eq!(
            convert(&m, Some(&AttributeValue::String("2025-01-15T12:00:00Z".into()))),
            json!("2025-01-15T12:00:00Z")
        );
    }

    #[test]
    fn optionset_label_uses_labels_and_unlabelled_value_is_null() {
        let mut m = map(Conversion::OptionsetLabel);
        m.labels.insert("1".into(), "Hot".into());
        assert_eq!(convert(&m, Some(&AttributeValue::OptionSet(1))), json!("Hot"));
        assert_eq!(convert(&m, Some(&AttributeValue::Int(1))), json!("Hot"));
        assert_eq!(convert(&m, Some(&AttributeValue::OptionSet(9))), Value::Null);
        assert_eq!(
            convert(&m, Some(&AttributeValue::String("1".into()))),
            Value::Null
        );
    }

    #[test]
    fn optionset_value_is_the_number() {
        let m = map(Conversion::OptionsetValue);
        assert_eq!(convert(&m, Some(&AttributeValue::OptionSet(3))), json!(3));
        assert_eq!(convert(&m, Some(&AttributeValue::Int(3))), json!(3));
    }

    #[test]
    fn lookup_id_and_lookup_name_read_the_reference() {
        let id = Uuid::from_u128(42);
        let r = AttributeValue::EntityReference(EntityRef {
            logical_name: "systemuser".into(),
            id,
            name: Some("Ann Owner".into()),
        });
        assert_eq!(
            convert(&map(Conversion::LookupId), Some(&r)),
            json!(id.to_string())
        );
        assert_eq!(
            convert(&map(Conversion::LookupName), Some(&r)),
            json!("Ann Owner")
        );
        assert_eq!(
            convert(
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
        assert_eq!(convert(&map(Conversion::LookupName), Some(&unnamed)), Value::Null);
    }

    #[test]
    fn mismatched_value_becomes_null_never_a_panic() {
        let odd = AttributeValue::Other(json!({"weird": true}));
        for (name, conversion) in [
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
            "nonsense",
        ]
        .map(|n| (n, Conversion::from(n.to_owned())))
        {
            assert_eq!(convert(&map(conversion), Some(&odd)), Value::Null, "{name}");
        }
    }
}
