//! W3C Trace Context (`traceparent`): one trace from the POST that creates a group, through
//! its reconciles and worker Jobs, to every webhook sent for it. The API takes a client's
//! `traceparent` (or starts a trace), records it on the ImageGroup in [`ANNOTATION`], the
//! store keeps it with each event, and every webhook attempt carries it with a span id of
//! its own. Propagation needs no exporter: it works whether spans are exported or not
//! ([`export`]: off unless the OpenTelemetry variables ask for it).

pub mod export;

use std::collections::BTreeMap;
use std::fmt;

/// The ImageGroup annotation holding the group's trace context (a `traceparent` value).
pub const ANNOTATION: &str = "kinsight.io/traceparent";
/// Where a worker Job finds its group's trace context (the OpenTelemetry convention).
pub const ENV: &str = "TRACEPARENT";
/// The header, in requests in and webhooks out.
pub const HEADER: &str = "traceparent";
/// The vendors' trace state that goes with a `traceparent` (W3C Trace Context).
pub const STATE_HEADER: &str = "tracestate";
/// Where a group keeps the client's `tracestate` beside [`ANNOTATION`].
pub const STATE_ANNOTATION: &str = "kinsight.io/tracestate";

/// A span's place in a trace: the `traceparent` value, version `00`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

/// The `sampled` flag.
const SAMPLED: u8 = 0x01;

impl TraceParent {
    /// A new trace, sampled, with a random trace and span id.
    pub fn new_trace() -> Self {
        Self {
            trace_id: nonzero_random(),
            span_id: nonzero_random(),
            flags: SAMPLED,
        }
    }

    /// A trace whose id is a group's uid (a UUID is 16 bytes): a group made without a trace
    /// context (applied with kubectl, or before kinsight kept one) still gets one trace id
    /// across its webhooks. `None` when the uid is no UUID.
    pub fn from_uid(uid: &str) -> Option<Self> {
        let hex: String = uid.chars().filter(|c| *c != '-').collect();
        let trace_id = decode::<16>(&hex.to_ascii_lowercase())?;
        (trace_id != [0; 16]).then(|| Self {
            trace_id,
            span_id: nonzero_random(),
            flags: SAMPLED,
        })
    }

    /// The same trace, in a new span (its child).
    pub fn child(&self) -> Self {
        Self {
            span_id: nonzero_random(),
            ..*self
        }
    }

    /// Parses a `traceparent` header. `None` for anything the W3C spec says to ignore: a
    /// wrong length or character, version `ff`, all-zero ids. A later version is read by
    /// its version-00 prefix, as the spec asks.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        // Annotations and environment variables may hold any text: byte offsets below are
        // character offsets only in ASCII.
        if !text.is_ascii() {
            return None;
        }
        let version = decode::<1>(text.get(..2)?)?[0];
        if version == 0xff {
            return None;
        }
        // Version 00 is exactly 55 characters; a later one may append `-...` fields.
        if text.len() < 55 || (version == 0 && text.len() != 55) {
            return None;
        }
        if version != 0 && text.len() > 55 && !text[55..].starts_with('-') {
            return None;
        }
        let bytes = text.as_bytes();
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        let trace_id = decode::<16>(&text[3..35])?;
        let span_id = decode::<8>(&text[36..52])?;
        let flags = decode::<1>(&text[53..55])?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.span_id),
            self.flags
        )
    }
}

/// Opens `span` in the trace of `parent` (a new trace when `None`) and returns the trace
/// context its own work carries on: the span's ids when spans are exported, else the
/// same trace with a fresh span id (or a new trace).
pub fn start(span: &tracing::Span, parent: Option<&TraceParent>) -> TraceParent {
    export::join(span, parent).unwrap_or_else(|| match parent {
        Some(parent) => parent.child(),
        None => TraceParent::new_trace(),
    })
}

/// The trace context for work handed on from inside the current span (a worker Job made
/// in a reconcile): that span's, when it is exported and in `parent`'s trace, else a fresh
/// child of `parent`.
pub fn handed_on(parent: &TraceParent) -> TraceParent {
    export::current()
        .filter(|current| current.trace_id == parent.trace_id)
        .unwrap_or_else(|| parent.child())
}

/// A group's trace: its [`ANNOTATION`] when that parses, else the one its uid names.
pub fn of_group(annotations: &BTreeMap<String, String>, uid: Option<&str>) -> Option<TraceParent> {
    annotated(annotations).or_else(|| uid.and_then(TraceParent::from_uid))
}

/// The trace context recorded on a group, when there is a valid one.
pub fn annotated(annotations: &BTreeMap<String, String>) -> Option<TraceParent> {
    annotations
        .get(ANNOTATION)
        .and_then(|text| TraceParent::parse(text))
}

/// A trace context as text, the way it is stored with a group and its events and sent on
/// webhooks: a `tracestate` only ever goes with a `traceparent`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceContext {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The context recorded on a group ([`ANNOTATION`], [`STATE_ANNOTATION`]), the valid
    /// parts only.
    pub fn annotated(annotations: &BTreeMap<String, String>) -> Self {
        let traceparent = annotated(annotations).map(|t| t.to_string());
        let tracestate = traceparent
            .as_ref()
            .and_then(|_| annotations.get(STATE_ANNOTATION))
            .and_then(|text| parse_tracestate(text));
        TraceContext {
            traceparent,
            tracestate,
        }
    }
}

/// Lowercase hex only: the spec forbids upper case.
fn decode<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

fn nonzero_random<const N: usize>() -> [u8; N] {
    loop {
        let bytes: [u8; N] = rand::random();
        if bytes != [0; N] {
            return bytes;
        }
    }
}

/// A `tracestate` worth keeping: printable ASCII, at most 512 characters (the spec's
/// limit); anything else is dropped, never an error.
pub fn parse_tracestate(text: &str) -> Option<String> {
    let text = text.trim();
    (!text.is_empty() && text.len() <= 512 && text.bytes().all(|b| (0x20..0x7f).contains(&b)))
        .then(|| text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_reads_and_prints_back_the_same() {
        let parsed = TraceParent::parse(VALID).expect("valid");
        assert_eq!(parsed.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex::encode(parsed.span_id), "00f067aa0ba902b7");
        assert_eq!(parsed.flags, 1);
        assert_eq!(parsed.to_string(), VALID);
    }

    #[test]
    fn invalid_values_are_ignored() {
        for bad in [
            "",
            "garbage",
            // Version ff is invalid.
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // All-zero trace id, all-zero span id.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Wrong lengths.
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            // Version 00 takes nothing after the flags.
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            // Upper case and non-hex.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // Wrong separators.
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            // Not ASCII (an annotation may hold anything), a multi-byte character across
            // the places fields are cut at.
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0é-x",
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?} must be ignored");
        }
    }

    #[test]
    fn a_later_version_is_read_by_its_version_00_prefix() {
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes";
        let parsed = TraceParent::parse(later).expect("a later version");
        assert_eq!(parsed.to_string(), VALID);
        let glued = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x";
        assert_eq!(TraceParent::parse(glued), None);
    }

    #[test]
    fn a_new_trace_and_a_child_are_well_formed_and_keep_the_trace_id() {
        let root = TraceParent::new_trace();
        let text = root.to_string();
        assert_eq!(TraceParent::parse(&text), Some(root));
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
        assert_ne!(TraceParent::new_trace().trace_id, root.trace_id);
    }

    #[test]
    fn a_group_uid_gives_its_trace_id() {
        let uid = "5f0c2a7e-1d3b-4c8e-9a6f-0b1c2d3e4f50";
        let trace = TraceParent::from_uid(uid).expect("a UUID");
        assert_eq!(trace.trace_id_hex(), "5f0c2a7e1d3b4c8e9a6f0b1c2d3e4f50");
        assert_eq!(TraceParent::from_uid("not-a-uuid"), None);
    }

    #[test]
    fn tracestate_is_kept_when_printable_and_bounded() {
        assert_eq!(
            parse_tracestate(" congo=t61rcWkgMzE "),
            Some("congo=t61rcWkgMzE".into())
        );
        assert_eq!(parse_tracestate(""), None);
        assert_eq!(parse_tracestate("a=\u{7}"), None);
        assert_eq!(parse_tracestate(&"a".repeat(513)), None);
    }
}
