//! Rows as ClickHouse `RowBinary`, written straight from the row types through serde.
//!
//! `RowBinary` is ClickHouse's plainest input format: each column's value in table order with no
//! names or separators — `String` as a LEB128 length and the bytes, `UInt64`/`Int64`/`Float64`
//! as 8 little-endian bytes, `UInt8` as one byte, `Nullable(T)` as a byte (1: NULL, 0: a `T`
//! follows). `DateTime64(3)` is its `Int64` of milliseconds and `LowCardinality(String)` is a
//! `String` on the wire, so one encoding serves every server version Keel supports. The server
//! parses no text, and Keel builds no intermediate values: a row serializes field by field into
//! the batch it is staged in.
//!
//! Alongside a row, the encoder writes the row's key: the encoded key columns, in table order.
//! Strings are length-prefixed and numbers fixed-width, so equal keys give equal bytes and
//! different keys different bytes; the durable stage keeps one row per such key.

use serde::Serialize;
use serde::ser::{self, Impossible};
use serde_json::Value;

use keel_operators::table::{Change, Row};

use crate::clickhouse::{Column, Kind, TableSpec};

/// Why a row could not be encoded (its type does not fit the table it was traced into).
#[derive(Debug, thiserror::Error)]
#[error("table {table}: {message}")]
pub struct EncodeError {
    /// The table.
    pub table: &'static str,
    /// What did not fit.
    pub message: String,
}

/// A serde error carrying only its message; [`TableSpec::encode`] adds the table.
#[derive(Debug)]
struct Mismatch(String);

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Mismatch {}

impl ser::Error for Mismatch {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Mismatch(msg.to_string())
    }
}

fn varint(mut n: usize, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn string(text: &[u8], out: &mut Vec<u8>) {
    varint(text.len(), out);
    out.extend_from_slice(text);
}

/// The value a column takes when a row does not give one (tombstones, skipped fields).
fn default(column: &Column, out: &mut Vec<u8>) {
    if column.nullable {
        out.push(1);
        return;
    }
    match column.kind {
        Kind::Text | Kind::Json => out.push(0),
        Kind::Bool => out.push(0),
        Kind::UInt | Kind::Int | Kind::Float | Kind::Time => out.extend_from_slice(&[0; 8]),
    }
}

/// One column's value.
struct Cell<'a> {
    column: &'a Column,
    out: &'a mut Vec<u8>,
}

impl Cell<'_> {
    fn present(&mut self) {
        if self.column.nullable {
            self.out.push(0);
        }
    }

    fn integer(mut self, v: i128) -> Result<(), Mismatch> {
        self.present();
        match self.column.kind {
            Kind::UInt => self.out.extend_from_slice(&(v as u64).to_le_bytes()),
            Kind::Int | Kind::Time => self.out.extend_from_slice(&(v as i64).to_le_bytes()),
            Kind::Float => self.out.extend_from_slice(&(v as f64).to_le_bytes()),
            Kind::Bool => self.out.push(u8::from(v != 0)),
            Kind::Text | Kind::Json => string(v.to_string().as_bytes(), self.out),
        }
        Ok(())
    }

    fn float(mut self, v: f64) -> Result<(), Mismatch> {
        self.present();
        match self.column.kind {
            Kind::Float => self.out.extend_from_slice(&v.to_le_bytes()),
            Kind::UInt => self.out.extend_from_slice(&(v as u64).to_le_bytes()),
            Kind::Int | Kind::Time => self.out.extend_from_slice(&(v as i64).to_le_bytes()),
            Kind::Bool => self.out.push(u8::from(v != 0.0)),
            Kind::Text | Kind::Json => string(v.to_string().as_bytes(), self.out),
        }
        Ok(())
    }

    fn text(mut self, v: &str) -> Result<(), Mismatch> {
        match self.column.kind {
            Kind::Text | Kind::Json => {
                self.present();
                string(v.as_bytes(), self.out);
                Ok(())
            }
            _ => Err(Mismatch(format!(
                "column {} holds numbers, the row gave text",
                self.column.name
            ))),
        }
    }

    fn null(self) -> Result<(), Mismatch> {
        default(self.column, self.out);
        Ok(())
    }

    fn nested(&self) -> Mismatch {
        Mismatch(format!(
            "column {} holds a scalar, the row gave a compound value",
            self.column.name
        ))
    }

    /// A JSON value: key columns of tombstones, and every value of a `Json` column.
    fn json(self, value: &Value) -> Result<(), Mismatch> {
        match value {
            Value::Null => self.null(),
            _ if self.column.kind == Kind::Json => {
                let mut cell = self;
                cell.present();
                string(value.to_string().as_bytes(), cell.out);
                Ok(())
            }
            Value::Bool(b) => self.integer(i128::from(*b)),
            Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => self.integer(i128::from(i)),
                (_, Some(u), _) => self.integer(i128::from(u)),
                (_, _, Some(f)) => self.float(f),
                _ => self.null(),
            },
            Value::String(s) => self.text(s),
            Value::Array(_) | Value::Object(_) => Err(self.nested()),
        }
    }
}

/// `Serializer` methods for the integer types (and `bool`): each value widened to `i128`, which
/// holds them all, and checked against the column's type by [`Cell::integer`].
macro_rules! widened_integers {
    ($($method:ident: $t:ty),* $(,)?) => {
        $(
            fn $method(self, v: $t) -> Result<(), Mismatch> {
                self.integer(i128::from(v))
            }
        )*
    };
}

impl<'a> ser::Serializer for Cell<'a> {
    type Ok = ();
    type Error = Mismatch;
    type SerializeSeq = Impossible<(), Mismatch>;
    type SerializeTuple = Impossible<(), Mismatch>;
    type SerializeTupleStruct = Impossible<(), Mismatch>;
    type SerializeTupleVariant = Impossible<(), Mismatch>;
    type SerializeMap = Impossible<(), Mismatch>;
    type SerializeStruct = Impossible<(), Mismatch>;
    type SerializeStructVariant = Impossible<(), Mismatch>;

    widened_integers! {
        serialize_bool: bool, serialize_i8: i8, serialize_i16: i16, serialize_i32: i32,
        serialize_i64: i64, serialize_u8: u8, serialize_u16: u16, serialize_u32: u32,
        serialize_u64: u64,
    }
    fn serialize_f32(self, v: f32) -> Result<(), Mismatch> {
        self.float(f64::from(v))
    }
    fn serialize_f64(self, v: f64) -> Result<(), Mismatch> {
        self.float(v)
    }
    fn serialize_char(self, v: char) -> Result<(), Mismatch> {
        self.text(v.encode_utf8(&mut [0; 4]))
    }
    fn serialize_str(self, v: &str) -> Result<(), Mismatch> {
        self.text(v)
    }
    fn serialize_bytes(self, _: &[u8]) -> Result<(), Mismatch> {
        Err(self.nested())
    }
    fn serialize_none(self) -> Result<(), Mismatch> {
        self.null()
    }
    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> Result<(), Mismatch> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Mismatch> {
        self.null()
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), Mismatch> {
        self.null()
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<(), Mismatch> {
        self.text(variant)
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), Mismatch> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<(), Mismatch> {
        Err(self.nested())
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, Mismatch> {
        Err(self.nested())
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, Mismatch> {
        Err(self.nested())
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, Mismatch> {
        Err(self.nested())
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, Mismatch> {
        Err(self.nested())
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Mismatch> {
        Err(self.nested())
    }
    fn serialize_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStruct, Mismatch> {
        Err(self.nested())
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, Mismatch> {
        Err(self.nested())
    }
}

/// A whole row: a struct whose fields are the table's columns, in order.
struct RowWriter<'a> {
    columns: &'a [Column],
    out: &'a mut Vec<u8>,
    key: &'a mut Vec<u8>,
}

/// The fields of a row, one column after another.
struct Fields<'a> {
    columns: &'a [Column],
    out: &'a mut Vec<u8>,
    key: &'a mut Vec<u8>,
    next: usize,
}

impl Fields<'_> {
    fn column(&mut self, name: &str) -> Result<&Column, Mismatch> {
        match self.columns.get(self.next) {
            Some(column) if column.name == name => {
                self.next += 1;
                Ok(column)
            }
            Some(column) => Err(Mismatch(format!(
                "field {name} where column {} was expected",
                column.name
            ))),
            None => Err(Mismatch(format!("field {name} has no column"))),
        }
    }
}

impl ser::SerializeStruct for Fields<'_> {
    type Ok = ();
    type Error = Mismatch;

    fn serialize_field<T: ?Sized + Serialize>(
        &mut self,
        name: &'static str,
        value: &T,
    ) -> Result<(), Mismatch> {
        let columns = self.columns;
        let index = self.next;
        self.column(name)?;
        let column = &columns[index];
        let start = self.out.len();
        if column.kind == Kind::Json {
            let value = serde_json::to_value(value).map_err(|e| Mismatch(e.to_string()))?;
            Cell {
                column,
                out: self.out,
            }
            .json(&value)?;
        } else {
            value.serialize(Cell {
                column,
                out: self.out,
            })?;
        }
        if column.key {
            self.key.extend_from_slice(&self.out[start..]);
        }
        Ok(())
    }

    fn skip_field(&mut self, name: &'static str) -> Result<(), Mismatch> {
        let columns = self.columns;
        let index = self.next;
        self.column(name)?;
        let start = self.out.len();
        default(&columns[index], self.out);
        if columns[index].key {
            self.key.extend_from_slice(&self.out[start..]);
        }
        Ok(())
    }

    fn end(self) -> Result<(), Mismatch> {
        match self.columns.get(self.next) {
            None => Ok(()),
            Some(column) => Err(Mismatch(format!("no field for column {}", column.name))),
        }
    }
}

impl<'a> ser::Serializer for RowWriter<'a> {
    type Ok = ();
    type Error = Mismatch;
    type SerializeSeq = Impossible<(), Mismatch>;
    type SerializeTuple = Impossible<(), Mismatch>;
    type SerializeTupleStruct = Impossible<(), Mismatch>;
    type SerializeTupleVariant = Impossible<(), Mismatch>;
    type SerializeMap = Impossible<(), Mismatch>;
    type SerializeStruct = Fields<'a>;
    type SerializeStructVariant = Impossible<(), Mismatch>;

    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Fields<'a>, Mismatch> {
        Ok(Fields {
            columns: self.columns,
            out: self.out,
            key: self.key,
            next: 0,
        })
    }

    fn serialize_bool(self, _: bool) -> Result<(), Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_i8(self, _: i8) -> Result<(), Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_i16(self, _: i16) -> Result<(), Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_i32(self, _: i32) -> Result<(), Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_i64(self, _: i64) -> Result<(), Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_u8(self, _: u8) -> Result<(), Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_u16(self, _: u16) -> Result<(), Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_u32(self, _: u32) -> Result<(), Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_u64(self, _: u64) -> Result<(), Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_f32(self, _: f32) -> Result<(), Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_f64(self, _: f64) -> Result<(), Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_char(self, _: char) -> Result<(), Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_str(self, _: &str) -> Result<(), Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_bytes(self, _: &[u8]) -> Result<(), Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_none(self) -> Result<(), Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_some<T: ?Sized + Serialize>(self, _: &T) -> Result<(), Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_unit(self) -> Result<(), Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
    ) -> Result<(), Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), Mismatch> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<(), Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Mismatch> {
        Err(not_a_struct())
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, Mismatch> {
        Err(not_a_struct())
    }
}

fn not_a_struct() -> Mismatch {
    Mismatch("rows must serialize as structs with one field per column".into())
}

impl TableSpec {
    /// Appends the `RowBinary` row for `change`, staged at `version`, to `out` (columns, then
    /// `_version` and `_deleted`), and the change's key bytes to `key`. On an error nothing is
    /// appended to either.
    pub fn encode<R: Row>(
        &self,
        change: &Change<R>,
        version: u64,
        out: &mut Vec<u8>,
        key: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        let (row_start, key_start) = (out.len(), key.len());
        let written = match change {
            Change::Upsert(row) => row.serialize(RowWriter {
                columns: &self.columns,
                out,
                key,
            }),
            Change::Delete(k) => self.tombstone(k, out, key),
        };
        if let Err(Mismatch(message)) = written {
            out.truncate(row_start);
            key.truncate(key_start);
            return Err(EncodeError {
                table: self.name,
                message,
            });
        }
        out.extend_from_slice(&version.to_le_bytes());
        out.push(u8::from(matches!(change, Change::Delete(_))));
        Ok(())
    }

    /// A row with only the key columns set: the key has no row any more.
    fn tombstone(
        &self,
        key: &impl Serialize,
        out: &mut Vec<u8>,
        key_out: &mut Vec<u8>,
    ) -> Result<(), Mismatch> {
        let value = serde_json::to_value(key).map_err(|e| Mismatch(e.to_string()))?;
        let values = match value {
            Value::Array(values) if self.key.len() > 1 => values,
            single => vec![single],
        };
        if values.len() != self.key.len() {
            return Err(Mismatch(format!(
                "a key of {} values for {} key columns",
                values.len(),
                self.key.len()
            )));
        }
        for column in &self.columns {
            let start = out.len();
            match self.key.iter().position(|k| *k == column.name) {
                Some(i) => {
                    Cell { column, out }.json(&values[i])?;
                    key_out.extend_from_slice(&out[start..]);
                }
                None => default(column, out),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clickhouse::tests::Window;
    use serde::Deserialize;

    fn row() -> Window {
        Window {
            tenant_id: "t".into(),
            name: "ab".into(),
            start: 0x0102,
            ended: None,
            live: true,
            tags: vec!["x".into()],
            state: Some("DRY".into()),
            share: 0.5,
        }
    }

    #[test]
    fn a_row_is_its_columns_back_to_back() {
        let spec = TableSpec::of::<Window>("windows");
        let (mut out, mut key) = (Vec::new(), Vec::new());
        spec.encode(&Change::Upsert(row()), 7, &mut out, &mut key)
            .unwrap();
        let mut expected = vec![1, b't', 2, b'a', b'b', 2, 1, 0, 0, 0, 0, 0, 0];
        expected.push(1); // ended: NULL
        expected.push(1); // live
        expected.extend_from_slice(b"\x05[\"x\"]"); // tags, as JSON text
        expected.extend_from_slice(b"\x00\x03DRY"); // state: not NULL, "DRY"
        expected.extend_from_slice(&0.5f64.to_le_bytes());
        expected.extend_from_slice(&7u64.to_le_bytes());
        expected.push(0);
        assert_eq!(out, expected);
        assert_eq!(key, expected[..13]);
    }

    #[test]
    fn a_tombstone_has_its_key_and_defaults() {
        let spec = TableSpec::of::<Window>("windows");
        let (mut out, mut key) = (Vec::new(), Vec::new());
        let gone = Change::<Window>::Delete(("t".into(), "ab".into(), 0x0102));
        spec.encode(&gone, 8, &mut out, &mut key).unwrap();
        let mut expected = vec![1, b't', 2, b'a', b'b', 2, 1, 0, 0, 0, 0, 0, 0];
        expected.extend_from_slice(&[1, 0, 0, 1]); // NULL, false, "", NULL
        expected.extend_from_slice(&[0; 8]);
        expected.extend_from_slice(&8u64.to_le_bytes());
        expected.push(1);
        assert_eq!(out, expected);
        // The same key bytes as the row it removes.
        let (mut row_out, mut row_key) = (Vec::new(), Vec::new());
        spec.encode(&Change::Upsert(row()), 7, &mut row_out, &mut row_key)
            .unwrap();
        assert_eq!(key, row_key);
    }

    #[test]
    fn long_strings_get_multi_byte_lengths_and_keys_stay_distinct() {
        let spec = TableSpec::of::<Window>("windows");
        let mut long = row();
        long.name = "n".repeat(300);
        let (mut out, mut key) = (Vec::new(), Vec::new());
        spec.encode(&Change::Upsert(long), 1, &mut out, &mut key)
            .unwrap();
        // 300 = 0b10_0101100: 0xAC then 0x02.
        assert_eq!(&out[2..4], &[0xAC, 0x02]);
        // ("ab", "c") and ("a", "bc") concatenate alike but encode apart.
        let a = Change::<Window>::Delete(("ab".into(), "c".into(), 1));
        let b = Change::<Window>::Delete(("a".into(), "bc".into(), 1));
        let (mut ka, mut kb, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
        spec.encode(&a, 1, &mut scratch, &mut ka).unwrap();
        spec.encode(&b, 1, &mut scratch, &mut kb).unwrap();
        assert_ne!(ka, kb);
    }

    #[test]
    fn a_key_that_does_not_fit_is_an_error_and_writes_nothing() {
        let spec = TableSpec::of::<Window>("windows");
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        struct Other {
            tenant_id: String,
        }
        impl Row for Other {
            type Key = String;
            fn key(&self) -> String {
                self.tenant_id.clone()
            }
        }
        let (mut out, mut key) = (vec![9], vec![9]);
        let error = spec
            .encode(
                &Change::Upsert(Other {
                    tenant_id: "t".into(),
                }),
                1,
                &mut out,
                &mut key,
            )
            .unwrap_err();
        assert!(
            error.to_string().contains("no field for column name"),
            "{error}"
        );
        assert_eq!((out, key), (vec![9], vec![9]));
        let error = spec
            .encode(
                &Change::<Other>::Delete("t".into()),
                1,
                &mut Vec::new(),
                &mut Vec::new(),
            )
            .unwrap_err();
        assert!(
            error.to_string().contains("a key of 1 values for 3"),
            "{error}"
        );
    }
}
