//! The token endpoint client: request building, response parsing, error classification.
