//! Content-defined chunking of a byte stream (FastCDC 2020).
//!
//! Invariant: the cut points of a stream do not depend on how the stream was
//! delivered (buffer sizes, short reads). Only the last chunk of a buffer can
//! have been cut by the buffer's end rather than by the content, so it is
//! carried into the next fill unless the stream has ended.
//!
//! Calls nothing else in the crate but `format`.

use std::io::{self, Read};

use fastcdc::v2020::FastCDC;

use crate::format::ChunkerParams;

/// Splits a reader into chunks and hands each to `sink` as a slice of an
/// internal buffer (no copy per chunk). Returns the number of bytes read.
pub fn chunk_stream<R: Read, E: From<io::Error>>(
    params: ChunkerParams,
    mut reader: R,
    mut sink: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<u64, E> {
    let max = params.max as usize;
    // Several max-size chunks per fill keeps the carried tail a small share.
    let cap = (max * 16).max(4 << 20);
    let mut buf = vec![0u8; cap];
    let mut filled = 0usize;
    let mut total = 0u64;
    let mut eof = false;
    while !eof || filled > 0 {
        while !eof && filled < cap {
            match reader.read(&mut buf[filled..]) {
                Ok(0) => eof = true,
                Ok(n) => {
                    filled += n;
                    total += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if filled == 0 {
            break;
        }
        let mut consumed = 0usize;
        let cdc = FastCDC::new(
            &buf[..filled],
            params.min as usize,
            params.avg as usize,
            max,
        );
        for c in cdc {
            let end = c.offset + c.length;
            if end == filled && !eof {
                // Cut by the buffer's end, not the content: carry it over.
                break;
            }
            sink(&buf[c.offset..end])?;
            consumed = end;
        }
        buf.copy_within(consumed..filled, 0);
        filled -= consumed;
        if eof && consumed == 0 && filled > 0 {
            // Cannot happen (at EOF every chunk is emitted), but never loop.
            sink(&buf[..filled])?;
            filled = 0;
        }
    }
    Ok(total)
}

/// Cut points of an in-memory buffer (chunk lengths), for tests and tools.
pub fn chunk_lengths(params: ChunkerParams, data: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let _ = chunk_stream::<_, io::Error>(params, data, |c| {
        out.push(c.len());
        Ok(())
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// A reader that returns at most `step` bytes per call.
    struct Dribble<'a> {
        data: &'a [u8],
        step: usize,
    }
    impl Read for Dribble<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(out.len()).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn boundaries_do_not_depend_on_read_sizes() {
        let p = ChunkerParams::default();
        let data = pseudo_random(9 << 20, 42);
        let whole: Vec<usize> = FastCDC::new(&data, 4096, 16384, 65536)
            .map(|c| c.length)
            .collect();
        let mut dribbled = Vec::new();
        chunk_stream::<_, io::Error>(
            p,
            Dribble {
                data: &data,
                step: 7919,
            },
            |c| {
                dribbled.push(c.len());
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(whole, dribbled);
        assert_eq!(dribbled.iter().sum::<usize>(), data.len());
    }

    #[test]
    fn empty_stream_has_no_chunks() {
        assert!(chunk_lengths(ChunkerParams::default(), &[]).is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// An insertion disturbs only the chunks around it: once a cut
        /// point after it lines up with an original one, every later cut
        /// is the original's (chunking from a cut depends only on the
        /// bytes that follow), and that happens within a few chunks.
        ///
        /// "A few": each chunk after the edit may end where the original
        /// did or not, depending on where its examination started (the
        /// minimum size skips bytes), so now and then two or three are
        /// lost before one lines up. This test once asserted "at most two"
        /// and failed on a clean checkout with three (the saved case in
        /// proptest-regressions/chunker.txt); eight leaves room for that
        /// without letting a chunker that never resynchronises pass.
        #[test]
        fn boundaries_resynchronise_after_insertion(
            seed in any::<u64>(),
            at_frac in 0.0f64..1.0,
            insert in proptest::collection::vec(any::<u8>(), 1..300),
        ) {
            let p = ChunkerParams::default();
            let data = pseudo_random(2 << 20, seed);
            let at = (data.len() as f64 * at_frac) as usize;
            let mut edited = data[..at].to_vec();
            edited.extend_from_slice(&insert);
            edited.extend_from_slice(&data[at..]);

            let cuts = |lens: Vec<usize>| {
                let mut acc = 0usize;
                lens.into_iter().map(|l| { acc += l; acc }).collect::<Vec<_>>()
            };
            let orig_after: Vec<usize> = cuts(chunk_lengths(p, &data))
                .into_iter()
                .filter(|c| *c > at)
                .collect();
            let new_after: Vec<usize> = cuts(chunk_lengths(p, &edited))
                .into_iter()
                .filter(|c| *c > at + insert.len())
                .map(|c| c - insert.len())
                .collect();
            // The end of the data is a cut on both sides, so one lines up.
            let Some(f) = new_after.iter().position(|c| orig_after.contains(c)) else {
                return Err(TestCaseError::fail("no cut point lines up, not even the end"));
            };
            let o = orig_after.iter().position(|c| *c == new_after[f]).unwrap_or(0);
            prop_assert_eq!(&new_after[f..], &orig_after[o..]);
            prop_assert!(o <= 8, "{} of {} cut points lost before one lined up", o, orig_after.len());
        }
    }
}
