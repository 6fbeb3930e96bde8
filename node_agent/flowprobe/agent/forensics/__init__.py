"""PCAP forensics: a bounded capture ring, frozen into per-connection pcaps when something goes wrong."""
