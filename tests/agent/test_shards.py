"""Sharded offline reads: tshark processes on shares of the connections."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from flowprobe.agent.capture.tshark import ShardedRows, Tools, read_sharded, shard_filter
from flowprobe.agent.config import AgentConfig
from flowprobe.agent.pipeline import Pipeline, Sinks
from flowprobe.agent.sessionize.stats import Stats
from flowprobe.devenv.pcapgen import write_pcap
from tests.agent.helpers import DATA

pytestmark = pytest.mark.capture


def _records(path: Path, shards: int) -> tuple[list[str], str | None, bool]:
    out: list[str] = []
    sinks = Sinks(exchange=[lambda ex: out.append(repr(sorted(ex.to_dict().items())))])
    pipeline = Pipeline(AgentConfig(), sinks, Stats())
    rows = read_sharded(Tools.find(), str(path), pipeline.tshark_options, shards)
    pipeline.feed(rows)
    pipeline.finish()
    return sorted(out), rows.error, isinstance(rows, ShardedRows)


@pytest.fixture(scope="module")
def mix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("shards") / "mix.pcap"
    with path.open("wb") as f:
        write_pcap(f, {"http": 600, "redis": 200, "postgresql": 200})
    return path


def _count(path: Path, bpf: str) -> int:
    r = subprocess.run(
        ["tcpdump", "-r", str(path), "-w", "-", bpf], capture_output=True, check=True
    )
    return int(
        subprocess.run(
            ["capinfos", "-c", "-M", "-r", "/dev/stdin"],
            input=r.stdout,
            capture_output=True,
            check=True,
            text=False,
        )
        .stdout.split()[-1]
        .decode()
    )


@pytest.mark.parametrize("shards", [2, 3])
def test_shares_partition_every_packet(mix: Path, shards: int) -> None:
    total = _count(mix, "")
    counts = [_count(mix, shard_filter(k, shards)) for k in range(shards)]
    assert sum(counts) == total
    # Connections spread over the shares instead of piling into one.
    assert min(counts) > total / shards / 2


@pytest.mark.parametrize("shards", [2, 3])
def test_sharded_read_reports_what_one_tshark_reports(mix: Path, shards: int) -> None:
    single, err1, sharded1 = _records(mix, 1)
    many, err, sharded = _records(mix, shards)
    assert not sharded1 and sharded
    assert err1 is None and err is None
    assert len(single) == 1000
    assert many == single


def test_real_capture_with_ipv4_and_udp(tmp_path: Path) -> None:
    for pcap in ("dns/udp.pcapng", "http/keepalive.pcapng", "redis/pipeline.pcapng"):
        single, _, _ = _records(DATA / pcap, 1)
        assert single
        assert _records(DATA / pcap, 2)[0] == single


def test_truncated_file_is_an_error_after_what_was_read(mix: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.pcap"
    data = mix.read_bytes()
    cut.write_bytes(data[: len(data) // 2 + 7])
    records, error, sharded = _records(cut, 2)
    assert sharded
    assert error is not None and "truncated" in error
    assert 300 < len(records) < 1000


def test_compressed_file_falls_back_to_one_tshark(mix: Path, tmp_path: Path) -> None:
    gz = tmp_path / "mix.pcap.gz"
    subprocess.run(f"gzip -c {mix} > {gz}", shell=True, check=True)
    records, error, sharded = _records(gz, 2)
    assert not sharded and error is None
    assert len(records) == 1000


def test_only_live_tshark_flushes_every_row(mix: Path) -> None:
    # A flush per row costs tshark 30-70% more CPU; only a live capture needs
    # its rows at once (docs/capture.md).
    tools = Tools.find()
    options = Pipeline(AgentConfig(), Sinks()).tshark_options
    rows = read_sharded(tools, str(mix), options, 2)
    assert isinstance(rows, ShardedRows)
    try:
        assert all("-l" not in r.args for r in rows.rows)
    finally:
        rows.stop()
    assert "-l" not in options.tshark_args(tools, str(mix))
    assert "-l" in options.tshark_args(tools, "-", live=True)
