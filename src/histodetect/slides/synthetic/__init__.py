"""SYNTHETIC slides with planted tumours, their annotations and whole slide sets (for tests)."""
