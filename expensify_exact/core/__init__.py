"""The accounting core, plain Python: normalizing reports, mapping and drafting journal entries, posting them
exactly once, replay, reconciliation and the digest. No Dagster import."""
