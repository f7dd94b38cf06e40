//! Dead letters: records that cannot be used, copied to a Kafka topic in the platform's DLQ
//! shape so they can be inspected and replayed.
//!
//! Each dead letter's value is the JSON object the platform's consumers write
//! (`topic, partition, offset, timestamp, tenant_id?, event_id?, event_type?, key_base64?,
//! value_base64, headers, error, consumer`), its key the original record's key or, for a record
//! without one, `topic:partition:offset` (the position for records that did not come from
//! Kafka), and its headers `tenant_id`, `event_type`, `source` (the consumer) and
//! `original_topic`. Of the original headers Keel keeps those its codec reads (`tenant_id`,
//! `event_type`, `event_id`, `source`), so those are what a letter's `headers` object holds.
//!
//! [`DeadLetterWriter::send_all`] produces a batch and waits for every acknowledgement; the
//! durable writer calls it before it lets the batch's epochs count as stored, so a record's
//! position is never committed before its dead letter is in Kafka.

use std::time::Duration;

use base64::Engine as _;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use serde_json::{Map, Value, json};

use crate::error::{IngestError, SourceError, clip};
use crate::kafka::{Deliveries, KafkaAddress};
use crate::record::{Position, Record};

/// The consumer name dead letters carry.
pub const CONSUMER: &str = "keel";

/// Most bytes of a refused record's value a dead letter carries. Base64 makes them a third
/// larger, and a letter must stay under the 1,000,000-byte message that producers and brokers
/// accept by default: a letter too large for the topic would fail its batch at every retry and
/// hold the positions of every later record back. A record cut short says so (`value_size`,
/// `value_truncated`); its position still names where the whole of it is.
pub const MAX_LETTER_VALUE: usize = 512 * 1024;

/// Most bytes of a refused record's key a dead letter carries (`key_size`, `key_truncated` when
/// cut); a letter whose record's key is longer is keyed by the record's position instead.
pub const MAX_LETTER_KEY: usize = 16 * 1024;

/// Most bytes of each text a letter copies from the record or its refusal: the reason (which
/// can quote the record) and the tenant, event type, id and source (as read, possibly the very
/// thing that was wrong); longer ones are cut and end in `…`. With the caps above, a letter
/// stays under some 750 KB whatever it was made of.
pub const MAX_LETTER_TEXT: usize = 4096;

/// One record for the dead-letter topic.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    /// Kafka key.
    pub key: Vec<u8>,
    /// The JSON value.
    pub value: Vec<u8>,
    /// Kafka headers.
    pub headers: Vec<(&'static str, String)>,
    /// Where the refused record was.
    pub position: Position,
}

/// The dead letter of `record`, refused for `error`; `now` stamps it when the record carries no
/// time of its own.
pub fn dead_letter(record: Option<&Record<'_>>, error: &IngestError, now: i64) -> DeadLetter {
    let (topic, partition, offset, key) = match &error.position {
        Position::Kafka {
            topic,
            partition,
            offset,
        } => (
            topic.as_str().to_owned(),
            Value::from(*partition),
            Value::from(*offset),
            format!("{topic}:{partition}:{offset}").into_bytes(),
        ),
        other => (
            other.to_string(),
            Value::Null,
            Value::Null,
            other.to_string().into_bytes(),
        ),
    };
    let original_key = record.and_then(|r| r.headers.key.as_deref());
    let key = original_key
        .filter(|k| k.len() <= MAX_LETTER_KEY)
        .map_or(key, <[u8]>::to_vec);
    let mut headers = Map::new();
    let mut object = Map::new();
    object.insert("topic".into(), Value::from(topic.clone()));
    object.insert("partition".into(), partition);
    object.insert("offset".into(), offset);
    object.insert("timestamp".into(), Value::from(now));
    if let Some(record) = record {
        for (name, value) in [
            ("tenant_id", &record.headers.tenant_id),
            ("event_type", &record.headers.event_type),
            ("event_id", &record.headers.event_id),
            ("source", &record.headers.source),
        ] {
            if let Some(value) = value {
                headers.insert(name.into(), Value::from(clipped(value)));
            }
        }
    }
    let tenant = error
        .tenant_id
        .as_deref()
        .map(clipped)
        .or_else(|| headers.get("tenant_id")?.as_str().map(str::to_owned));
    let event_type = error
        .event_type
        .as_deref()
        .map(clipped)
        .or_else(|| headers.get("event_type")?.as_str().map(str::to_owned));
    if let Some(tenant) = &tenant {
        object.insert("tenant_id".into(), Value::from(tenant.as_str()));
    }
    if let Some(id) = headers.get("event_id") {
        object.insert("event_id".into(), id.clone());
    }
    if let Some(kind) = &event_type {
        object.insert("event_type".into(), Value::from(kind.as_str()));
    }
    if let Some(original) = original_key {
        insert_bytes(&mut object, "key", original, MAX_LETTER_KEY);
    }
    insert_bytes(
        &mut object,
        "value",
        record.map_or(&[][..], |r| r.value),
        MAX_LETTER_VALUE,
    );
    object.insert("headers".into(), Value::Object(headers));
    object.insert("error".into(), Value::from(clipped(&error.reason)));
    object.insert("consumer".into(), json!(CONSUMER));
    let mut letter_headers = vec![("source", CONSUMER.to_owned()), ("original_topic", topic)];
    if let Some(tenant) = tenant {
        letter_headers.push(("tenant_id", tenant));
    }
    if let Some(kind) = event_type {
        letter_headers.push(("event_type", kind));
    }
    DeadLetter {
        key,
        value: serde_json::to_vec(&Value::Object(object)).expect("JSON values serialize"),
        headers: letter_headers,
        position: error.position.clone(),
    }
}

/// `text`, cut to at most [`MAX_LETTER_TEXT`] bytes and marked `…` when cut.
fn clipped(text: &str) -> String {
    clip(text, MAX_LETTER_TEXT)
}

/// Puts `bytes` into a letter as `{name}_base64`, at most `limit` of them; when they are cut,
/// `{name}_size` gives their whole length and `{name}_truncated` is true.
fn insert_bytes(object: &mut Map<String, Value>, name: &str, bytes: &[u8], limit: usize) {
    let kept = &bytes[..bytes.len().min(limit)];
    object.insert(
        format!("{name}_base64"),
        Value::from(base64::engine::general_purpose::STANDARD.encode(kept)),
    );
    if kept.len() < bytes.len() {
        object.insert(format!("{name}_size"), Value::from(bytes.len()));
        object.insert(format!("{name}_truncated"), Value::from(true));
    }
}

/// Produces dead letters to one topic and waits for the broker's acknowledgements.
pub struct DeadLetterWriter {
    producer: ThreadedProducer<Deliveries>,
    deliveries: Deliveries,
    address: KafkaAddress,
}

impl std::fmt::Debug for DeadLetterWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetterWriter")
            .field("address", &self.address)
            .finish()
    }
}

impl DeadLetterWriter {
    /// An idempotent producer (acks from all in-sync replicas) for `address`.
    pub fn new(address: KafkaAddress) -> Result<Self, SourceError> {
        let deliveries = Deliveries::default();
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &address.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000")
            .create_with_context(deliveries.clone())?;
        Ok(DeadLetterWriter {
            producer,
            deliveries,
            address,
        })
    }

    /// Where the letters go.
    pub fn address(&self) -> &KafkaAddress {
        &self.address
    }

    /// Produces every letter and waits until the broker has them all.
    pub fn send_all(&self, letters: &[DeadLetter]) -> Result<(), SourceError> {
        // This batch's failures only: an earlier batch's were reported with it.
        let _ = self.deliveries.take();
        for letter in letters {
            let mut headers = OwnedHeaders::new_with_capacity(letter.headers.len());
            for (name, value) in &letter.headers {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value.as_bytes()),
                });
            }
            let mut record = BaseRecord::to(&self.address.topic)
                .key(&letter.key)
                .payload(&letter.value)
                .headers(headers);
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull,
                        ),
                        returned,
                    )) => {
                        record = returned;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err((error, _)) => return Err(error.into()),
                }
            }
        }
        self.producer.flush(Duration::from_secs(60))?;
        let (failed, first) = self.deliveries.take();
        if failed > 0 {
            return Err(SourceError::Config(format!(
                "{failed} dead letters were not delivered to {}: {first}",
                self.address.topic,
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Headers;
    use keel_operators::sym::Sym;
    use std::borrow::Cow;

    #[test]
    fn letters_have_the_platform_shape() {
        let record = Record {
            position: Position::Kafka {
                topic: Sym::new("analytics_events"),
                partition: 2,
                offset: 41,
            },
            value: b"{not json",
            headers: Headers {
                tenant_id: Some(Cow::Borrowed("t-1")),
                event_type: Some(Cow::Borrowed("viewer_connect")),
                event_id: None,
                source: Some(Cow::Borrowed("decklog")),
                key: None,
            },
        };
        let error = IngestError {
            position: record.position.clone(),
            reason: "not JSON".into(),
            event_type: None,
            tenant_id: None,
            excerpt: String::new(),
        };
        let letter = dead_letter(Some(&record), &error, 7);
        assert_eq!(letter.key, b"analytics_events:2:41");
        let value: Value = serde_json::from_slice(&letter.value).unwrap();
        assert_eq!(value["topic"], "analytics_events");
        assert_eq!(value["partition"], 2);
        assert_eq!(value["offset"], 41);
        assert_eq!(value["timestamp"], 7);
        assert_eq!(value["tenant_id"], "t-1");
        assert_eq!(value["event_type"], "viewer_connect");
        assert!(value.get("event_id").is_none());
        assert!(value.get("key_base64").is_none());

        // A record with a key keeps it, as the letter's key and in the value.
        let keyed = Record {
            headers: Headers {
                key: Some(Cow::Borrowed(&b"ev-9\xff"[..])),
                ..record.headers.clone()
            },
            ..record
        };
        let letter = dead_letter(Some(&keyed), &error, 7);
        assert_eq!(letter.key, b"ev-9\xff");
        let value: Value = serde_json::from_slice(&letter.value).unwrap();
        assert_eq!(value["key_base64"], "ZXYtOf8=");
        assert_eq!(value["offset"], 41);
        assert_eq!(value["value_base64"], "e25vdCBqc29u");
        assert_eq!(value["headers"]["source"], "decklog");
        assert_eq!(value["error"], "not JSON");
        assert_eq!(value["consumer"], "keel");
        assert!(
            letter
                .headers
                .contains(&("original_topic", "analytics_events".into()))
        );
        assert!(letter.headers.contains(&("source", "keel".into())));
    }

    /// A refused record as large as a topic's messages get, with a large key, is copied cut
    /// short, so its letter still fits a message: a letter too large would fail at every retry.
    #[test]
    fn letters_of_huge_records_fit_a_message() {
        let value = vec![b'x'; 2_000_000];
        let key = vec![b'k'; MAX_LETTER_KEY + 1];
        let record = Record {
            position: Position::Kafka {
                topic: Sym::new("analytics_events"),
                partition: 0,
                offset: 5,
            },
            value: &value,
            headers: Headers {
                key: Some(Cow::Borrowed(&key[..])),
                ..Headers::default()
            },
        };
        let error = IngestError {
            position: record.position.clone(),
            reason: "record is not a JSON object".into(),
            event_type: None,
            tenant_id: None,
            excerpt: String::new(),
        };
        let letter = dead_letter(Some(&record), &error, 7);
        assert!(letter.value.len() < 1_000_000, "{}", letter.value.len());
        assert_eq!(letter.key, b"analytics_events:0:5");
        // Texts quoted from the record (a tenant that is 600 KB of control characters, and a
        // reason quoting it) are cut too, in the value and in the headers.
        let odd = "\u{1}é".repeat(200_000);
        let quoting = IngestError {
            reason: format!("tenant_id {odd:?} is not a UUID"),
            tenant_id: Some(odd.clone()),
            ..error.clone()
        };
        let headed = Record {
            headers: Headers {
                tenant_id: Some(Cow::Borrowed(&odd)),
                source: Some(Cow::Borrowed(&odd)),
                ..Headers::default()
            },
            position: record.position.clone(),
            value: &value,
        };
        let quoted = dead_letter(Some(&headed), &quoting, 7);
        let headers: usize = quoted.headers.iter().map(|(_, v)| v.len()).sum();
        assert!(
            quoted.value.len() + headers < 800_000,
            "{}",
            quoted.value.len() + headers
        );
        let json: Value = serde_json::from_slice(&quoted.value).unwrap();
        assert!(json["error"].as_str().unwrap().ends_with('…'));
        assert!(json["tenant_id"].as_str().unwrap().starts_with("\u{1}é"));
        let json: Value = serde_json::from_slice(&letter.value).unwrap();
        let decode = |field: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(json[field].as_str().unwrap())
                .unwrap()
        };
        assert_eq!(decode("value_base64"), &value[..MAX_LETTER_VALUE]);
        assert_eq!(
            (&json["value_size"], &json["value_truncated"]),
            (&Value::from(2_000_000), &Value::from(true))
        );
        assert_eq!(decode("key_base64"), &key[..MAX_LETTER_KEY]);
        assert_eq!(json["key_size"], MAX_LETTER_KEY + 1);
        assert_eq!(json["key_truncated"], true);

        // Exactly at each limit: kept whole, and nothing says otherwise.
        let (value, key) = (&value[..MAX_LETTER_VALUE], &key[..MAX_LETTER_KEY]);
        let whole = Record {
            value,
            headers: Headers {
                key: Some(Cow::Borrowed(key)),
                ..Headers::default()
            },
            position: record.position.clone(),
        };
        let letter = dead_letter(Some(&whole), &error, 7);
        assert_eq!(letter.key, key);
        let json: Value = serde_json::from_slice(&letter.value).unwrap();
        for field in ["value_size", "value_truncated", "key_size", "key_truncated"] {
            assert!(json.get(field).is_none(), "{field}");
        }

        // And the producer takes it, where an uncut letter is refused as too large.
        let cluster = rdkafka::mocking::MockCluster::new(1).expect("a mock cluster");
        cluster.create_topic("letters", 1, 1).expect("a topic");
        let writer = DeadLetterWriter::new(KafkaAddress {
            brokers: cluster.bootstrap_servers(),
            topic: "letters".into(),
        })
        .expect("a producer");
        let huge = dead_letter(Some(&record), &error, 7);
        writer
            .send_all(&[huge])
            .expect("the cut letter is delivered");
        let mut uncut = letter;
        uncut.value = vec![b'x'; 1_100_000];
        assert!(writer.send_all(&[uncut]).is_err());
    }
}
