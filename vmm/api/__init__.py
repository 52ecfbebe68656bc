"""The Firecracker-compatible HTTP API of a VMM process (one process, one microVM). Reference: docs/api.md."""
