"""The shipped network templates and attack scenarios, installed as ledger.configs (see pyproject.toml)."""
