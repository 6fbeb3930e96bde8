"""L7 parsers: one module per protocol, pure functions of tshark's columns."""
