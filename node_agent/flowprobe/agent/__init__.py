"""flowprobe node agent: capture -> parse -> sessionize -> enrich -> export."""
