//! A bound on how deeply a YAML document nests, checked before serde_norway
//! parses it.
//!
//! serde_norway loads a whole document's events before deserializing it,
//! and refuses more than 128 levels only then. libyaml's scanner spends time
//! proportional to the flow nesting depth on every token (it walks its
//! stack of possible simple keys), so a document of n nested `[` costs n²:
//! 100,000 of them (200 KB) take a minute, an 8 MiB file hours. Walking
//! the same parser's events one at a time and stopping at the first level
//! past the limit costs at most the limit per token, for the part read.

use std::mem::MaybeUninit;

#[expect(
    clippy::unsafe_removed_from_name,
    reason = "serde_norway's own name for it; the unsafety is in every call"
)]
use unsafe_libyaml_norway as sys;

/// The deepest nesting of sequences and mappings a document may have: the
/// one serde_norway enforces itself (its recursion limit), so no document
/// it would accept is refused here.
pub const MAX_NESTING: usize = 128;

/// The start of the error a document nested deeper fails with.
pub const TOO_DEEP: &str = "nested more than";

/// A libyaml parser reading `input`, deleted on drop.
struct Parser<'input> {
    sys: Box<MaybeUninit<sys::yaml_parser_t>>,
    _input: &'input [u8],
}

impl<'input> Parser<'input> {
    fn new(input: &'input [u8]) -> Option<Self> {
        // Boxed: libyaml keeps pointers to the input, none into the
        // parser, but the parser never moves anyway.
        let mut sys = Box::new(MaybeUninit::<sys::yaml_parser_t>::uninit());
        let parser = sys.as_mut_ptr();
        // SAFETY: `parser` points to writable memory for a yaml_parser_t,
        // which yaml_parser_initialize fills in (it fails only when out of
        // memory, leaving nothing to free).
        if unsafe { sys::yaml_parser_initialize(parser) }.fail {
            return None;
        }
        // SAFETY: the parser is initialized; `input` outlives it (the
        // lifetime on `Parser`), and libyaml only reads it.
        unsafe {
            sys::yaml_parser_set_encoding(parser, sys::YAML_UTF8_ENCODING);
            sys::yaml_parser_set_input_string(parser, input.as_ptr(), input.len() as u64);
        }
        Some(Self { sys, _input: input })
    }

    /// The next event's type and start (line, column), 0-based; `None` at
    /// a syntax error (left for serde_norway to report).
    fn next(&mut self) -> Option<(sys::yaml_event_type_t, u64, u64)> {
        let mut event = MaybeUninit::<sys::yaml_event_t>::uninit();
        let parser = self.sys.as_mut_ptr();
        // SAFETY: the parser is initialized (`new`); after a failed parse
        // nothing is read from `event`, after a successful one it holds an
        // event that is read and then deleted exactly once.
        unsafe {
            // Never called again after a failure: `too_deep` stops there.
            if sys::yaml_parser_parse(parser, event.as_mut_ptr()).fail {
                return None;
            }
            let event = event.as_mut_ptr();
            let out = ((*event).type_, (*event).start_mark.line, (*event).start_mark.column);
            sys::yaml_event_delete(event);
            Some(out)
        }
    }
}

impl Drop for Parser<'_> {
    fn drop(&mut self) {
        // SAFETY: initialized in `new` (a `Parser` exists only then) and
        // deleted only here.
        unsafe { sys::yaml_parser_delete(self.sys.as_mut_ptr()) };
    }
}

/// The first document (1-based) nesting deeper than [`MAX_NESTING`], and
/// where; `None` when there is none, or a syntax error comes first.
#[must_use]
pub fn too_deep(text: &str) -> Option<(usize, String)> {
    let mut parser = Parser::new(text.as_bytes())?;
    let mut document = 0;
    let mut depth = 0usize;
    loop {
        let (event, line, column) = parser.next()?;
        match event {
            sys::YAML_DOCUMENT_START_EVENT => {
                document += 1;
                depth = 0;
            }
            sys::YAML_SEQUENCE_START_EVENT | sys::YAML_MAPPING_START_EVENT => {
                depth += 1;
                if depth > MAX_NESTING {
                    let at = format!(
                        "nested more than {MAX_NESTING} levels deep (at line {} column {})",
                        line + 1,
                        column + 1
                    );
                    return Some((document.max(1), at));
                }
            }
            sys::YAML_SEQUENCE_END_EVENT | sys::YAML_MAPPING_END_EVENT => depth = depth.saturating_sub(1),
            sys::YAML_STREAM_END_EVENT => return None,
            _ => {}
        }
    }
}
