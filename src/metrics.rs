//! Multi-label metrics (SPEC section 6).
