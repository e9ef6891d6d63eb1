"""The replica: pure PBFT core, simulator, Trio runtime, transport, launcher and CLI."""
