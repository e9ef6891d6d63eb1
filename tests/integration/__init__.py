"""Integration tests: real replica processes on 127.0.0.1, real TCP, real SQLite."""
