//! Asking the processor to start loading a value's cache line ahead of its use.
//!
//! State of millions of rows misses the cache on nearly every look-up; a worker that knows the
//! next few records can ask for their lines while it works on the current one, so the misses
//! overlap instead of following each other. A prefetch is only a hint: it never faults, never
//! changes what a program computes, and is dropped where the target has no such instruction.

/// Starts loading the cache line that holds `value` (for reading and writing soon).
#[inline(always)]
pub fn prefetch<T>(value: &T) {
    let start: *const T = value;
    prefetch_address(start.cast());
}

/// Starts loading every cache line `value` spans: a value of a few dozen bytes in an array of
/// them can straddle two lines, and a look-up that reads one field and then updates others
/// would otherwise miss on the second.
#[inline(always)]
pub fn prefetch_whole<T>(value: &T) {
    let start: *const T = value;
    let start: *const u8 = start.cast();
    for offset in line_offsets(start.addr() % LINE, size_of::<T>()) {
        prefetch_address(start.wrapping_add(offset));
    }
}

/// The cache line length assumed.
const LINE: usize = 64;

/// One offset into each cache line spanned by `size` bytes that begin `misalign` bytes into a
/// line: 0, then the start of every later line (all inside the bytes).
#[inline(always)]
fn line_offsets(misalign: usize, size: usize) -> impl Iterator<Item = usize> {
    let next_line = LINE - misalign % LINE;
    (size > 0)
        .then_some(0)
        .into_iter()
        .chain((next_line..size).step_by(LINE))
}

#[inline(always)]
fn prefetch_address(address: *const u8) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `_mm_prefetch` is an `unsafe fn` only because it is a target-feature
        // intrinsic; SSE is part of the x86-64 baseline, and a prefetch reads nothing the
        // program can observe and never faults. Callers pass addresses inside a live value.
        #[allow(unsafe_code)]
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(address.cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = address;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every line a value spans gets exactly one offset, inside the value, whatever its size
    /// and where it starts in a line.
    #[test]
    fn one_offset_in_each_spanned_line() {
        for misalign in 0..LINE {
            for size in 0..300 {
                let offsets: Vec<usize> = line_offsets(misalign, size).collect();
                assert!(offsets.iter().all(|&o| o < size), "{misalign} {size}");
                let lines: Vec<usize> = offsets.iter().map(|o| (misalign + o) / LINE).collect();
                let spanned: Vec<usize> = match size {
                    0 => Vec::new(),
                    _ => (0..=(misalign + size - 1) / LINE).collect(),
                };
                assert_eq!(lines, spanned, "misalign {misalign}, size {size}");
            }
        }
    }

    /// Hints on values of every size and alignment do not panic.
    #[test]
    fn hints_of_any_size() {
        let bytes: Vec<u8> = (0..=255).collect();
        for offset in 0..64 {
            let odd: &[u8; 80] = bytes[offset..offset + 80].try_into().unwrap();
            prefetch(odd);
            prefetch_whole(odd);
            prefetch_whole(&bytes[offset]);
        }
        prefetch_whole(&());
        prefetch_whole(&[0u64; 100]);
    }
}
