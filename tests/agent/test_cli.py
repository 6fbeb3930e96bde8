"""The command line on good and bad input: exit codes, one-line errors, nothing lost."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from tests.agent.helpers import DATA, agent

KEEPALIVE = DATA / "http" / "keepalive.pcapng"


@pytest.mark.capture
def test_read_writes_json_lines_to_a_file(tmp_path: Path) -> None:
    out = tmp_path / "x.jsonl"
    r = agent("read", str(KEEPALIVE), "--output", str(out))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(lines) == 10
    assert all(ln["flowprobe.record"] == "exchange" for ln in lines)


@pytest.mark.capture
def test_gzip_compressed_pcap_reads_the_same(tmp_path: Path) -> None:
    gz = tmp_path / "k.pcapng.gz"
    gz.write_bytes(gzip.compress(KEEPALIVE.read_bytes()))
    plain, packed = agent("read", str(KEEPALIVE)), agent("read", str(gz))
    assert packed.returncode == 0, packed.stderr
    assert packed.stdout == plain.stdout


@pytest.mark.capture
def test_summary_table_has_edges_and_endpoints() -> None:
    r = agent("read", str(KEEPALIVE), "--summary")
    assert r.returncode == 0
    assert "10.251.0.1 -> 10.251.0.2:8080" in r.stdout
    assert "GET /items/{id}" in r.stdout  # ids become placeholders
    edge_line = next(ln for ln in r.stdout.splitlines() if "->" in ln and "EDGE" not in ln)
    assert edge_line.split()[4] == "10"  # count column


@pytest.mark.capture
def test_truncated_file_reports_what_it_read_then_fails(tmp_path: Path) -> None:
    data = (DATA / "http" / "delays.pcapng").read_bytes()
    cut = tmp_path / "cut.pcapng"
    cut.write_bytes(data[: int(len(data) * 0.7)])
    r = agent("read", str(cut))
    assert r.returncode == 2
    assert len(r.stdout.splitlines()) >= 2  # exchanges before the damage
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "cut short" in err[0]


@pytest.mark.capture
def test_not_a_capture_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pcap"
    junk.write_text("hello, I am not a pcap\n" * 10)
    r = agent("read", str(junk))
    assert r.returncode == 2
    assert r.stdout == ""
    assert "junk.pcap" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_missing_file() -> None:
    r = agent("read", "/nonexistent/x.pcap")
    assert r.returncode == 2
    assert r.stderr.strip() == "flowprobe-agent: /nonexistent/x.pcap: no such file"


def test_missing_tshark_says_what_to_install() -> None:
    r = agent("read", str(KEEPALIVE), env={**os.environ, "FLOWPROBE_TSHARK": "/nonexistent/tshark"})
    assert r.returncode == 2
    assert "apt-get install tshark" in r.stderr


def test_bad_port_rule_is_a_usage_error() -> None:
    r = agent("read", str(KEEPALIVE), "--port", "gopher=70")
    assert r.returncode == 2
    assert "PROTOCOL=PORT" in r.stderr
