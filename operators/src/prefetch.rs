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
/// them can straddle two or three lines, and a look-up that reads one field and then updates
/// others would otherwise miss on the second.
#[inline(always)]
pub fn prefetch_whole<T>(value: &T) {
    const LINE: usize = 64;
    let start: *const T = value;
    let start: *const u8 = start.cast();
    let size = size_of::<T>();
    let mut offset = 0;
    while offset < size {
        prefetch_address(start.wrapping_add(offset));
        offset += LINE;
    }
    // The last byte: where the value does not start on a line, its end sits a line further.
    if size > 0 {
        prefetch_address(start.wrapping_add(size - 1));
    }
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

    /// Hints on values of every size, at every offset into a line, read nothing and change
    /// nothing (and the loop over a value's lines ends for empty ones).
    #[test]
    fn hints_of_any_size_change_nothing() {
        let bytes: Vec<u8> = (0..=255).collect();
        for offset in 0..64 {
            let odd: &[u8; 80] = bytes[offset..offset + 80].try_into().unwrap();
            prefetch(odd);
            prefetch_whole(odd);
            prefetch_whole(&bytes[offset]);
        }
        prefetch_whole(&());
        prefetch_whole(&[0u64; 100]);
        assert_eq!(bytes, (0..=255).collect::<Vec<u8>>());
    }
}
