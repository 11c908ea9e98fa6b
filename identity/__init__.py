"""Identity: customers and their API keys (management plane in Postgres; request authentication)."""
