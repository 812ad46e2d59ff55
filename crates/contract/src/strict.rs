//! Strict JSON input (`docs/evaluation.md`, integers and input shapes): a deserializer wrapper that
//! refuses what serde and serde_json let through by default.
//!
//! - **Duplicate keys.** serde_json keeps the last of repeated keys in maps and `Value`s, so
//!   `{"mode":"active","mode":"disabled"}` read as disabled while a reviewer saw active. Every object key
//!   is remembered per object and a repeat is refused.
//! - **Arrays for objects.** serde's derived structs accept a sequence of their fields in order
//!   (`"usage":[500,0,0]`). A struct is read from an object only.
//! - **Integers beyond 2^53 − 1.** RFC 8785 canonical JSON writes larger integers as floats, so a budget
//!   of `18446744073709551615` changed its snapshot's hash on the way through the store. Every integer
//!   is at most [`MAX_SAFE_INTEGER`] in magnitude. A zero-fraction number such as `2.0` is not an
//!   integer: fields that want one refuse it as they refuse `2.5`.
//!
//! The wrapper sits between `serde_path_to_error` and the real deserializer, so its errors carry the
//! JSON path like any other: a repeated key is reported at the key's own path.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};

/// The largest integer RFC 8785 canonical JSON (and so a snapshot hash) represents exactly: 2^53 − 1.
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// A deserializer that applies the checks of the module docs to everything read through it.
pub(crate) struct Strict<'k, D> {
    inner: D,
    /// Set while reading an object key: the keys its object has seen so far.
    keys: Option<&'k mut HashSet<String>>,
}

impl<D> Strict<'static, D> {
    pub(crate) fn new(inner: D) -> Self {
        Self { inner, keys: None }
    }
}

/// Wraps a visitor so that what it visits is checked, and nested values are read strictly too.
struct Checked<'k, V> {
    inner: V,
    /// Refuse a sequence: the visitor builds a struct.
    object_only: bool,
    keys: Option<&'k mut HashSet<String>>,
}

impl<'k, V> Checked<'k, V> {
    fn new(inner: V, keys: Option<&'k mut HashSet<String>>) -> Self {
        Self { inner, object_only: false, keys }
    }
}

fn check_unsigned<E: de::Error>(value: u128) -> Result<(), E> {
    check_magnitude(value, value)
}

fn check_signed<E: de::Error>(value: i128) -> Result<(), E> {
    check_magnitude(value, value.unsigned_abs())
}

fn check_magnitude<E: de::Error>(value: impl fmt::Display, magnitude: u128) -> Result<(), E> {
    if magnitude > u128::from(MAX_SAFE_INTEGER) {
        return Err(E::custom(format!(
            "is {value}, beyond 9007199254740991 (2^53 − 1), the largest integer accepted in magnitude"
        )));
    }
    Ok(())
}

macro_rules! forward_deserialize {
    ($($method:ident($($arg:ident: $ty:ty),*);)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, D::Error> {
                self.inner.$method($($arg,)* Checked::new(visitor, self.keys))
            }
        )*
    };
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Strict<'_, D> {
    type Error = D::Error;

    forward_deserialize! {
        deserialize_any();
        deserialize_bool();
        deserialize_i8();
        deserialize_i16();
        deserialize_i32();
        deserialize_i64();
        deserialize_i128();
        deserialize_u8();
        deserialize_u16();
        deserialize_u32();
        deserialize_u64();
        deserialize_u128();
        deserialize_f32();
        deserialize_f64();
        deserialize_char();
        deserialize_str();
        deserialize_string();
        deserialize_bytes();
        deserialize_byte_buf();
        deserialize_option();
        deserialize_unit();
        deserialize_unit_struct(name: &'static str);
        deserialize_newtype_struct(name: &'static str);
        deserialize_seq();
        deserialize_tuple(len: usize);
        deserialize_tuple_struct(name: &'static str, len: usize);
        deserialize_map();
        deserialize_enum(name: &'static str, variants: &'static [&'static str]);
        deserialize_identifier();
        deserialize_ignored_any();
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        let checked = Checked { inner: visitor, object_only: true, keys: self.keys };
        self.inner.deserialize_struct(name, fields, checked)
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

macro_rules! forward_visit {
    ($($method:ident($ty:ty)$(: $check:ident)?;)*) => {
        $(
            fn $method<E: de::Error>(self, value: $ty) -> Result<V::Value, E> {
                $($check(value.into())?;)?
                self.inner.$method(value)
            }
        )*
    };
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Checked<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(f)
    }

    forward_visit! {
        visit_bool(bool);
        visit_i8(i8);
        visit_i16(i16);
        visit_i32(i32);
        visit_i64(i64): check_signed;
        visit_i128(i128): check_signed;
        visit_u8(u8);
        visit_u16(u16);
        visit_u32(u32);
        visit_u64(u64): check_unsigned;
        visit_u128(u128): check_unsigned;
        visit_f32(f32);
        visit_f64(f64);
        visit_char(char);
        visit_bytes(&[u8]);
        visit_byte_buf(Vec<u8>);
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<V::Value, E> {
        let Self { inner, keys, .. } = self;
        // The key is read first, so that a path-tracking reader above knows it when the error names it.
        let value_read = inner.visit_str(value)?;
        remember(keys, value).map(|()| value_read)
    }

    fn visit_borrowed_str<E: de::Error>(self, value: &'de str) -> Result<V::Value, E> {
        let Self { inner, keys, .. } = self;
        let value_read = inner.visit_borrowed_str(value)?;
        remember(keys, value).map(|()| value_read)
    }

    fn visit_string<E: de::Error>(self, value: String) -> Result<V::Value, E> {
        let Self { inner, keys, .. } = self;
        match keys {
            None => inner.visit_string(value),
            Some(seen) => {
                let value_read = inner.visit_string(value.clone())?;
                remember(Some(seen), &value).map(|()| value_read)
            }
        }
    }

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_none()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<V::Value, D::Error> {
        self.inner.visit_some(Strict::new(deserializer))
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, deserializer: D) -> Result<V::Value, D::Error> {
        self.inner.visit_newtype_struct(Strict::new(deserializer))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        if self.object_only {
            return Err(de::Error::invalid_type(de::Unexpected::Seq, &self.inner));
        }
        self.inner.visit_seq(StrictSeq(seq))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.inner.visit_map(StrictMap { inner: map, seen: HashSet::new() })
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        self.inner.visit_enum(StrictEnum(data))
    }
}

/// Records an object key; a key seen before in the same object is refused.
fn remember<E: de::Error>(keys: Option<&mut HashSet<String>>, key: &str) -> Result<(), E> {
    match keys {
        Some(seen) if seen.contains(key) => Err(E::custom("is given more than once")),
        Some(seen) => {
            seen.insert(key.to_owned());
            Ok(())
        }
        None => Ok(()),
    }
}

/// A seed whose value is read strictly (`keys` set while it reads an object key).
struct StrictSeed<'k, S> {
    inner: S,
    keys: Option<&'k mut HashSet<String>>,
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for StrictSeed<'_, S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<S::Value, D::Error> {
        self.inner.deserialize(Strict { inner: deserializer, keys: self.keys })
    }
}

struct StrictSeq<A>(A);

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for StrictSeq<A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, A::Error> {
        self.0.next_element_seed(StrictSeed { inner: seed, keys: None })
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

struct StrictMap<A> {
    inner: A,
    seen: HashSet<String>,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for StrictMap<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        self.inner.next_key_seed(StrictSeed { inner: seed, keys: Some(&mut self.seen) })
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.inner.next_value_seed(StrictSeed { inner: seed, keys: None })
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

struct StrictEnum<A>(A);

impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for StrictEnum<A> {
    type Error = A::Error;
    type Variant = StrictVariant<A::Variant>;

    fn variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<(T::Value, Self::Variant), A::Error> {
        let (value, variant) = self.0.variant_seed(StrictSeed { inner: seed, keys: None })?;
        Ok((value, StrictVariant(variant)))
    }
}

struct StrictVariant<A>(A);

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for StrictVariant<A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.0.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        self.0.newtype_variant_seed(StrictSeed { inner: seed, keys: None })
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        self.0.tuple_variant(len, Checked::new(visitor, None))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        self.0.struct_variant(fields, Checked { inner: visitor, object_only: true, keys: None })
    }
}
