"""Data out for research: Parquet (over HTTP and as a lake on disk) and the per-day quality figures."""
