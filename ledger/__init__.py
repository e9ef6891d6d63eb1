"""The ledger data: encoding, keys, transactions, blocks, the application, storage, configs."""
