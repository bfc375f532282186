//! A YAML document to a generic value with a bounded number of values.
//!
//! YAML anchors and aliases let a small file stand for a huge tree ("billion
//! laughs": ten aliases of ten aliases of ... of one scalar). serde_norway
//! bounds the number of alias *jumps* to 100 per event of the document,
//! which stops the exponential form but not a quadratic one (one anchor of
//! n scalars aliased n times is n² values from 2n events; one anchored long
//! string aliased n times is n copies of it: a 1 MiB file becomes tens of
//! gigabytes of `serde_json::Value`). So the value is built here, each node
//! and each byte of text taken from a budget, and building stops with an
//! error at the first node over it.

use std::cell::Cell;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// The message of the error a document over its budget fails with.
pub const OVER_BUDGET: &str = "expands to more values than the file's size allows";

/// What one node (scalar, sequence, mapping or key) costs, on top of the
/// bytes of its text: about what it takes in memory over the text, so a
/// file without aliases costs at most about 5 units per byte of YAML (the
/// densest YAML spends 2 bytes per node: `[0,0,0]`).
pub const NODE_COST: usize = 8;

/// Builds a [`Value`], taking [`NODE_COST`] units of the budget per node
/// and one per byte of each string (keys included).
pub struct Budgeted<'a>(pub &'a Cell<usize>);

fn take<E: de::Error>(budget: &Cell<usize>, text_len: usize) -> Result<(), E> {
    let cost = NODE_COST.saturating_add(text_len);
    let Some(left) = budget.get().checked_sub(cost) else {
        budget.set(0);
        return Err(E::custom(format!(
            "{OVER_BUDGET} ({} units per byte plus {}, a node costing {NODE_COST} and each byte of text 1; \
             YAML aliases repeating a node?)",
            super::EXPANSION_PER_BYTE,
            super::EXPANSION_SLACK
        )));
    };
    budget.set(left);
    Ok(())
}

impl Budgeted<'_> {
    fn take<E: de::Error>(&self) -> Result<(), E> {
        take(self.0, 0)
    }
}

/// A mapping key: a string, as in JSON and in every Kubernetes object (a
/// plain YAML key such as `80` or `true` is read as its text, as serde_json's
/// own `Value` reads it through serde_norway).
struct Key<'a>(&'a Cell<usize>);

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        let key = <String as serde::Deserialize>::deserialize(deserializer)?;
        take(self.0, key.len())?;
        Ok(key)
    }
}

impl<'de> DeserializeSeed<'de> for Budgeted<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Budgeted<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any YAML/JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Number(v.into()))
    }

    // As serde_json's own Value does: an integer beyond 64 bits is an error.
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        self.take()?;
        serde::Deserialize::deserialize(de::value::I128Deserializer::<E>::new(v)).map(Value::Number)
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        self.take()?;
        serde::Deserialize::deserialize(de::value::U128Deserializer::<E>::new(v)).map(Value::Number)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.take()?;
        // NaN and the infinities have no JSON form: null, as serde_json does.
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        take(self.0, v.len())?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        take(self.0, v.len())?;
        Ok(Value::String(v))
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Null)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.take()?;
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Budgeted(self.0))? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.take()?;
        let mut out = Map::new();
        while let Some(key) = map.next_key_seed(Key(self.0))? {
            let value = map.next_value_seed(Budgeted(self.0))?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}
