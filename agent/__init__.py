"""The daemon and CLI around core/: config, ingestion, worker, publishing."""
