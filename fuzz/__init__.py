"""Fuzz harnesses for every parser and receive path; see fuzz/README.md."""
