//! Rendering query results: an aligned text table, CSV with a header, JSON (one object per line,
//! or one array), or an Arrow IPC stream.
//!
//! JSON objects carry every column, `null` included, so each row has the same keys. In a text
//! table, line breaks and tabs inside a value are shown escaped (`\n`, `\r`, `\t`), and every
//! other control character as `\u{…}`: written as they are, a value's second line would read as
//! a row of its own, and an escape sequence in a stream name (events come from the fleet) would
//! be obeyed by the terminal showing the table.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, StringArray};
use arrow::datatypes::DataType;

use arrow::array::RecordBatch;
use arrow::error::ArrowError;

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// An aligned text table.
    Table,
    /// CSV with a header row.
    Csv,
    /// One JSON object per row, one per line.
    Json,
    /// One JSON array of row objects.
    JsonArray,
    /// An Arrow IPC stream.
    Arrow,
}

/// Renders `batches` in `format`.
pub fn render(batches: &[RecordBatch], format: Format) -> Result<Vec<u8>, ArrowError> {
    let mut out = Vec::new();
    if format != Format::Arrow {
        temporals_have_text(batches)?;
    }
    match format {
        Format::Table => {
            let shown = batches
                .iter()
                .map(escape_control_chars)
                .collect::<Result<Vec<_>, _>>()?;
            out = (arrow::util::pretty::pretty_format_batches(&shown)?.to_string() + "\n")
                .into_bytes();
        }
        Format::Csv => {
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            for batch in batches {
                writer.write(batch)?;
            }
        }
        Format::Json => {
            let mut writer = arrow::json::WriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, arrow::json::writer::LineDelimited>(&mut out);
            for batch in batches {
                writer.write(batch)?;
            }
            writer.finish()?;
        }
        Format::JsonArray => {
            let mut writer = arrow::json::WriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, arrow::json::writer::JsonArray>(&mut out);
            for batch in batches {
                writer.write(batch)?;
            }
            writer.finish()?;
            if out.is_empty() {
                out.extend_from_slice(b"[]");
            }
        }
        Format::Arrow => {
            let schema = batches
                .first()
                .map(|b| b.schema())
                .unwrap_or_else(|| Arc::new(arrow::datatypes::Schema::empty()));
            let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut out, &schema)?;
            for batch in batches {
                writer.write(batch)?;
            }
            writer.finish()?;
        }
    }
    Ok(out)
}

/// Refuses a date or time that has no text form (a timestamp past the calendar's range, such
/// as `arrow_cast(-99999999999999, 'Timestamp(Second, None)')`), naming its column: the JSON
/// writer and the text table would write the formatting error in its place as if it were the
/// value ("ERROR: Cast error: …"); CSV refused it without naming the column.
fn temporals_have_text(batches: &[RecordBatch]) -> Result<(), ArrowError> {
    let options = arrow::util::display::FormatOptions::new().with_display_error(false);
    for batch in batches {
        for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
            if !holds_time(column.data_type()) || column.null_count() == column.len() {
                continue;
            }
            let formatter = arrow::util::display::ArrayFormatter::try_new(column, &options)?;
            for row in (0..column.len()).filter(|&row| column.is_valid(row)) {
                formatter.value(row).try_to_string().map_err(|error| {
                    ArrowError::CastError(format!(
                        "column {:?} has a value with no text form: {error}",
                        field.name()
                    ))
                })?;
            }
        }
    }
    Ok(())
}

/// Whether values of `data_type` are, or hold, dates or times (in lists, structs, maps).
fn holds_time(data_type: &DataType) -> bool {
    match data_type {
        t if t.is_temporal() => true,
        DataType::List(f)
        | DataType::LargeList(f)
        | DataType::ListView(f)
        | DataType::LargeListView(f)
        | DataType::FixedSizeList(f, _)
        | DataType::Map(f, _) => holds_time(f.data_type()),
        DataType::Struct(fields) => fields.iter().any(|f| holds_time(f.data_type())),
        DataType::Dictionary(_, values) => holds_time(values),
        _ => false,
    }
}

/// `value` with its control characters written as escapes.
fn escape_controls(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

/// `batch` with control characters (line breaks, tabs, escapes) in its text columns written as
/// escapes (a batch without any comes back as it is).
fn escape_control_chars(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns());
    let mut changed = false;
    for column in batch.columns() {
        if !matches!(
            column.data_type(),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        ) {
            columns.push(column.clone());
            continue;
        }
        let text = arrow::compute::cast(column, &DataType::Utf8)?;
        let text = text
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("cast to Utf8");
        if !text
            .iter()
            .flatten()
            .any(|value| value.contains(char::is_control))
        {
            columns.push(column.clone());
            continue;
        }
        changed = true;
        let escaped: StringArray = text
            .iter()
            .map(|value| value.map(escape_controls))
            .collect();
        columns.push(Arc::new(escaped));
    }
    if !changed {
        return Ok(batch.clone());
    }
    // Escaped columns are plain Utf8 now, whatever they were.
    let fields: Vec<arrow::datatypes::Field> = batch
        .schema()
        .fields()
        .iter()
        .zip(&columns)
        .map(|(field, column)| {
            field
                .as_ref()
                .clone()
                .with_data_type(column.data_type().clone())
        })
        .collect();
    RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;

    fn batch() -> RecordBatch {
        RecordBatch::try_from_iter([
            (
                "name",
                Arc::new(StringArray::from(vec![Some("two\nlines"), None])) as ArrayRef,
            ),
            (
                "n",
                Arc::new(Int64Array::from(vec![Some(1), None])) as ArrayRef,
            ),
        ])
        .unwrap()
    }

    fn text(batches: &[RecordBatch], format: Format) -> String {
        String::from_utf8(render(batches, format).unwrap()).unwrap()
    }

    #[test]
    fn json_rows_carry_their_nulls() {
        assert_eq!(
            text(&[batch()], Format::Json),
            "{\"name\":\"two\\nlines\",\"n\":1}\n{\"name\":null,\"n\":null}\n"
        );
        assert_eq!(
            text(&[batch()], Format::JsonArray),
            "[{\"name\":\"two\\nlines\",\"n\":1},{\"name\":null,\"n\":null}]"
        );
    }

    #[test]
    fn a_table_keeps_one_line_per_row() {
        let table = text(&[batch()], Format::Table);
        assert_eq!(table.lines().count(), 6, "{table}");
        assert!(table.contains("| two\\nlines |"), "{table}");
        // Nor can a value steer the terminal (ESC, and the one-character CSI of C1).
        let steering = RecordBatch::try_from_iter([(
            "name",
            Arc::new(StringArray::from(vec!["a\u{1b}[2Jb\u{9b}c\u{7f}"])) as ArrayRef,
        )])
        .unwrap();
        let table = text(&[steering], Format::Table);
        assert!(table.contains("| a\\u{1b}[2Jb\\u{9b}c\\u{7f} |"), "{table}");
        assert!(!table.contains(['\u{1b}', '\u{9b}', '\u{7f}']), "{table}");
        // CSV quotes the value whole instead.
        assert!(text(&[batch()], Format::Csv).contains("\"two\nlines\""));
    }

    /// A timestamp past the calendar's range is an error naming its column in every format
    /// that writes it as text, never the error's text in its place.
    #[test]
    fn a_time_with_no_text_form_is_an_error_not_a_value() {
        use arrow::array::TimestampSecondArray;
        let far = RecordBatch::try_from_iter([(
            "at",
            Arc::new(TimestampSecondArray::from(vec![
                Some(0),
                None,
                Some(-99_999_999_999_999),
            ])) as ArrayRef,
        )])
        .unwrap();
        let refused = |batch: &RecordBatch, column: &str, formats: &[Format]| {
            for &format in formats {
                let error = render(std::slice::from_ref(batch), format).unwrap_err();
                assert!(
                    error
                        .to_string()
                        .contains(&format!("column {column:?} has a value with no text form")),
                    "{format:?}: {error}"
                );
            }
        };
        let every = [Format::Table, Format::Json, Format::JsonArray, Format::Csv];
        refused(&far, "at", &every);
        // Inside a list too.
        let times = Arc::new(TimestampSecondArray::from(vec![0, -99_999_999_999_999]));
        let list = arrow::array::ListArray::new(
            Arc::new(arrow::datatypes::Field::new_list_field(
                times.data_type().clone(),
                true,
            )),
            arrow::buffer::OffsetBuffer::new(vec![0, 2].into()),
            times,
            None,
        );
        let nested = RecordBatch::try_from_iter([("ats", Arc::new(list) as ArrayRef)]).unwrap();
        refused(&nested, "ats", &every[..3]);
        let near = far.slice(0, 2);
        assert_eq!(
            text(&[near], Format::JsonArray),
            "[{\"at\":\"1970-01-01T00:00:00\"},{\"at\":null}]"
        );
    }

    #[test]
    fn an_empty_result_keeps_its_columns() {
        let empty = RecordBatch::new_empty(batch().schema());
        assert_eq!(text(std::slice::from_ref(&empty), Format::Csv), "name,n\n");
        assert!(text(std::slice::from_ref(&empty), Format::Table).contains("| name | n |"));
        assert_eq!(text(std::slice::from_ref(&empty), Format::JsonArray), "[]");
    }
}
