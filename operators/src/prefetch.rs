//! Asking the processor to start loading a value's cache line ahead of its use.
//!
//! State of millions of rows misses the cache on nearly every look-up; a worker that knows the
//! next few records can ask for their lines while it works on the current one, so the misses
//! overlap instead of following each other. A prefetch is only a hint: it never faults, never
//! changes what a program computes, and is dropped where the target has no such instruction.

/// Starts loading the cache line that holds `value` (for reading and writing soon).
#[inline(always)]
pub fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        let line: *const T = value;
        // SAFETY: `_mm_prefetch` is an `unsafe fn` only because it is a target-feature
        // intrinsic; SSE is part of the x86-64 baseline, and a prefetch reads nothing the
        // program can observe. The address comes from a live reference.
        #[allow(unsafe_code)]
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}
