"""Units the API reports in: every ``*_mb`` field is decimal megabytes (10^6 bytes) and every
``*_gb`` setting decimal gigabytes (10^9 bytes), as the Hugging Face Hub and disk vendors show
sizes; ``*_bytes`` fields are bytes."""

MB = 1_000_000
GB = 1_000_000_000
