"""The ``memory`` benchmark suite (``longattn bench --suite memory``) at tiny sizes: policies on
stories260K with real token dropping and the index's recall, and the long tiered decode with its
fast-tier bound and bit-identical reload."""

import json

import pytest

pytest.importorskip("transformers")

from longattn.bench import get_suite, memory  # noqa: E402
from longattn.bench.memory import policy_configs  # noqa: E402
from longattn.bench.suite import run_suite  # noqa: E402

pytestmark = pytest.mark.cpu_only(reason="the benchmark is a CPU program (longattn.bench takes no device)")


def test_memory_suite_records_policies_and_the_long_decode(tmp_path, stories):
    res = run_suite(memory.SUITE, tmp_path, methods=["full", "streaming", "blocks", "retrieval", "retrieval-exact"],
                    policy_tokens=512, continuation=128, budget=128, lengths=[4096], decode=3)
    assert res["status"] == "ok"
    pol = {r["policy"]: r for r in res["records"] if r["test"] == "policies"}
    assert list(pol) == ["full", "streaming", "blocks", "retrieval", "retrieval-exact"]
    assert pol["streaming"]["tokens_kept"] == [[128] * 4] * 5  # 5 layers × 4 key heads, really dropped
    assert pol["streaming"]["kv_bytes"] < pol["full"]["kv_bytes"]
    assert pol["full"]["nll_vs_full"] == 0.0 and pol["full"]["recall"] is None
    assert pol["retrieval"]["index_bytes"] > 0 and 0.0 <= pol["retrieval"]["recall"] <= 1.0
    assert pol["retrieval-exact"]["backend"] == "exact" and pol["retrieval-exact"]["recall"] is None
    long = {r["policy"]: r for r in res["records"] if r["test"] == "long_decode"}
    assert set(long) == {"blocks", "retrieval"}
    for r in long.values():
        assert r["status"] == "ok" and r["reload_bit_identical"]
        assert r["peak_fast_tokens"] <= r["fast_budget_tokens"] == 64 + 256 + 64
        assert r["host_bytes"] > 0 and r["prompt"] == 4096  # (4096 tokens fit the host tier: no disk)
    assert long["retrieval"]["recall"] is not None
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["records"]) == len(res["records"])
    report = (tmp_path / "report.md").read_text()
    assert "## KV policies on stories260K" in report and "| retrieval-exact | exact |" in report
    assert "## Long prompt through the tiered memory" in report and "| retrieval | 4,096 |" in report


def test_memory_suite_is_registered_and_checks_its_options(tmp_path):
    assert get_suite("memory") is memory.SUITE
    with pytest.raises(ValueError, match="unknown part"):
        run_suite(memory.SUITE, tmp_path, parts=("nope",))
    with pytest.raises(ValueError, match="prompt lengths must be >= 4096"):
        run_suite(memory.SUITE, tmp_path, lengths=[100])
    with pytest.raises(ValueError, match="budget must be >= 128"):
        run_suite(memory.SUITE, tmp_path, budget=64)
    assert not (tmp_path / "results.json").exists()  # every refusal came before any work
    with pytest.raises(ValueError, match="budget must be >= 128"):
        policy_configs(64, 5, 4)
