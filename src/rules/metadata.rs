//! A rule's `metadata:` mapping, turned from YAML into the protobuf `Struct` Envoy receives as
//! dynamic metadata.

use std::collections::HashMap;

use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};

/// A YAML mapping as a protobuf `Struct`; keys must be strings.
pub fn to_struct(map: &serde_yaml::Mapping) -> Result<Struct, String> {
    let mut fields = HashMap::new();
    for (key, value) in map {
        let key = key
            .as_str()
            .ok_or_else(|| format!("metadata keys must be strings, found {key:?}"))?;
        fields.insert(key.to_string(), yaml_to_value(value)?);
    }
    Ok(Struct { fields })
}

fn yaml_to_value(value: &serde_yaml::Value) -> Result<Value, String> {
    use serde_yaml::Value as Y;
    let kind = match value {
        Y::Null => Kind::NullValue(0),
        Y::Bool(b) => Kind::BoolValue(*b),
        Y::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Y::String(s) => Kind::StringValue(s.clone()),
        Y::Sequence(items) => Kind::ListValue(ListValue {
            values: items.iter().map(yaml_to_value).collect::<Result<_, _>>()?,
        }),
        Y::Mapping(map) => Kind::StructValue(to_struct(map)?),
        Y::Tagged(tagged) => return yaml_to_value(&tagged.value),
    };
    Ok(Value { kind: Some(kind) })
}
