"""Ingestion: `tick.ingest_tick` (the one ingestion function), `runtime.IngestionRuntime`
(what every runner opens: engine, price source, shutdown) and the embedded scheduler."""
