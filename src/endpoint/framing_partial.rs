//! One request message as the reader receives it ([`Partial`]): its gRPC
//! prefix, then its body, a top-level field its type does not read dropped
//! as it arrives (see [`super`]).

use prost::bytes::{Buf, Bytes, BytesMut};

use super::FramingError;

/// gRPC's message prefix: a compression flag and a 4-byte length.
const PREFIX: usize = 5;

/// The room first made for what is kept of a message whose type drops a
/// field.
const KEPT_START: usize = 128;

/// One message as it arrives: its prefix, then its body with the dropped
/// field left out. Memory is held only for what is kept, and given back
/// when the message is decoded.
#[derive(Default)]
pub(super) struct Partial {
    pub(super) prefix: [u8; PREFIX],
    pub(super) prefix_len: usize,
    /// Bytes of the body still to come.
    pub(super) remaining: usize,
    pub(super) kept: BytesMut,
    /// Where in `kept` the next top-level field starts; past its end while
    /// a kept field's value is still arriving.
    pub(super) next_field: usize,
    /// Bytes of a dropped field still to come.
    pub(super) dropping: usize,
    /// Fields are no longer told apart: an encoding the scan does not
    /// follow, left whole for the decoder to judge.
    pub(super) keep_rest: bool,
}

impl Partial {
    pub(super) fn is_empty(&self) -> bool {
        self.prefix_len == 0
    }

    /// The message's whole size, prefix included, once its prefix is in.
    pub(super) fn size(&self) -> Option<usize> {
        (self.prefix_len == PREFIX).then(|| PREFIX + self.body_len())
    }

    fn body_len(&self) -> usize {
        u32::from_be_bytes([
            self.prefix[1],
            self.prefix[2],
            self.prefix[3],
            self.prefix[4],
        ]) as usize
    }

    pub(super) fn complete(&self) -> bool {
        self.prefix_len == PREFIX && self.remaining == 0
    }

    /// Takes from `chunk` what belongs to this message. Returns once the
    /// prefix is complete (so that the message's budget is taken before its
    /// body is read), the message is, or the chunk is used up.
    pub(super) fn read(
        &mut self,
        chunk: &mut Bytes,
        dropped: Option<u32>,
        max_message: usize,
    ) -> Result<(), FramingError> {
        if self.prefix_len < PREFIX {
            let n = (PREFIX - self.prefix_len).min(chunk.len());
            self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&chunk[..n]);
            self.prefix_len += n;
            chunk.advance(n);
            if self.prefix_len == PREFIX {
                self.check_prefix(max_message)?;
                self.remaining = self.body_len();
                self.keep_rest = dropped.is_none();
                if self.keep_rest {
                    // The whole body in one allocation: grown a frame at a
                    // time, a large request left the allocator the smaller
                    // buffers it outgrew.
                    self.kept.reserve(self.remaining);
                } else {
                    // What is kept of a message with a dropped field is
                    // small (names, a version, a nonce): one allocation
                    // holds it, where growing from empty took several.
                    self.kept.reserve(self.remaining.min(KEPT_START));
                }
            }
            return Ok(());
        }
        while !chunk.is_empty() && self.remaining > 0 {
            let n = if self.dropping > 0 {
                let n = self.dropping.min(chunk.len()).min(self.remaining);
                self.dropping -= n;
                chunk.advance(n);
                self.remaining -= n;
                continue;
            } else if self.keep_rest {
                self.remaining
            } else if self.next_field > self.kept.len() {
                self.next_field - self.kept.len()
            } else {
                // A field header, a byte at a time, so that no byte of a
                // dropped value is kept.
                1
            };
            let n = n.min(chunk.len()).min(self.remaining);
            self.kept.extend_from_slice(&chunk[..n]);
            chunk.advance(n);
            self.remaining -= n;
            if !self.keep_rest && self.next_field <= self.kept.len() {
                self.scan_header(dropped);
            }
        }
        if self.remaining == 0 && self.dropping > 0 {
            return Err(FramingError::Malformed(
                "the request is not a valid protobuf: a field runs past the end of the message"
                    .into(),
            ));
        }
        Ok(())
    }

    fn check_prefix(&self, max_message: usize) -> Result<(), FramingError> {
        match self.prefix[0] {
            0 => {}
            1 => return Err(FramingError::Compressed),
            f => {
                return Err(FramingError::Malformed(format!(
                    "invalid gRPC message prefix (compression flag {f}); is this gRPC?"
                )))
            }
        }
        let len = self.body_len();
        if len > max_message {
            return Err(FramingError::TooLarge {
                size: len,
                max: max_message,
            });
        }
        Ok(())
    }

    /// Reads the field header at `next_field` if it is all in: a dropped
    /// field's header is taken back out and its value skipped, any other
    /// field is kept whole.
    fn scan_header(&mut self, dropped: Option<u32>) {
        let header = &self.kept[self.next_field..];
        let Some((key, tag_len)) = varint(header) else {
            // Longer than a varint can be: not a header the scan follows.
            if header.len() >= 10 {
                self.keep_rest = true;
            }
            return;
        };
        let (field, wire_type) = (key >> 3, key & 7);
        let value_at = self.next_field + tag_len;
        let rest = &self.kept[value_at..];
        let end = match wire_type {
            0 => match varint(rest) {
                Some((_, n)) => value_at + n,
                None if rest.len() >= 10 => return self.keep_rest = true,
                None => return,
            },
            1 => value_at + 8,
            5 => value_at + 4,
            2 => match varint(rest) {
                Some((len, n)) => {
                    let Ok(len) = usize::try_from(len) else {
                        return self.keep_rest = true;
                    };
                    if Some(field) == dropped.map(u64::from) {
                        self.kept.truncate(self.next_field);
                        self.dropping = len;
                        return;
                    }
                    (value_at + n).saturating_add(len)
                }
                None if rest.len() >= 10 => return self.keep_rest = true,
                None => return,
            },
            // Groups, or no wire type at all: the decoder judges the rest.
            _ => return self.keep_rest = true,
        };
        self.next_field = end;
    }
}

/// A protobuf varint at the start of `b` and its length; `None` if it is not
/// all there (or longer than a varint can be).
fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, byte) in b.iter().take(10).enumerate() {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}
