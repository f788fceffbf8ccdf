//! Refresh-token persistence under `state_dir`.
