//! Shared helpers of the cross-crate tests in `tests/` (the root package exists only for them).
