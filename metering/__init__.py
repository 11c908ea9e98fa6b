"""Usage metering and billing (issue 5): usage records, local batching, staging, beat aggregation."""
