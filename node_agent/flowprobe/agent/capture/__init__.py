"""Packet capture: tshark/dumpcap processes that hand Python one text row per packet."""
