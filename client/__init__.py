"""The client: sans-IO reply quorums, the Trio library with a sync wrapper, and the CLI."""
