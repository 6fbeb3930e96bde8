"""Where records go: JSON Lines, the summary table, OTLP."""
