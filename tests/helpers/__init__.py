"""What the tests use that is not a test (see tests/README.md)."""
