"""The benchmark harness itself (CPU, tiny shapes): timing, rows, skip reasons, files, plots, compare,
and the FLOP/byte formulas against hand counts."""

from __future__ import annotations

import argparse
import csv
import json

import pytest
import torch

from unispeech_fast import BackendNotSupportedError
from unispeech_fast.bench import cli, flops, harness, report
from unispeech_fast.bench.harness import Case, Provider, Suite
from unispeech_fast.bench.suites import make_suite

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------- formulas
def test_conv_and_attention_flops_match_hand_counts():
    # conv: B=2, C_in=4, C_out=6, groups=2 (2 input channels per output), K=3, T_out=10: 2*2*6*2*3*10
    assert flops.conv1d_flops(2, 4, 6, 3, 10, groups=2) == 1440
    with pytest.raises(ValueError, match="divisible by groups"):
        flops.conv1d_flops(1, 5, 6, 3, 10, groups=2)
    # attention B=1, H=2, N=3, D=4: QK^T and PV are 2 * (2 heads * 3 * 3 * 4) multiply-adds each
    assert flops.attention_flops(1, 2, 3, 4, "fwd") == 288
    assert flops.attention_flops(1, 2, 3, 4, "bwd") == 720
    assert flops.attention_flops(1, 2, 3, 4, "fwd_bwd") == 1008
    # bytes, fp16: one [1, 3, 2, 4] tensor is 48 bytes; fwd q, k, v, out; bwd q, k, v, out, dout, dq, dk, dv
    assert flops.attention_bytes(1, 2, 3, 4, 2, "fwd") == 4 * 48
    assert flops.attention_bytes(1, 2, 3, 4, 2, "bwd") == 8 * 48
    # pos conv B=1, T=5, H=8, groups=4 (2 channels each), K=3: 2*1*8*2*3*5 fwd, input + weight grads bwd
    assert flops.pos_conv_flops(1, 5, 8, 4, 3, "fwd") == 480
    assert flops.pos_conv_flops(1, 5, 8, 4, 3, "fwd_bwd") == 3 * 480
    with pytest.raises(ValueError, match="mode must be one of"):
        flops.attention_flops(1, 1, 1, 1, "forward")


def test_feature_extractor_flops_match_hand_counts():
    # 20 samples; layer 0: C 1->2, K=4, S=2 -> T=9, 2*2*1*4*9 = 144; layer 1: C 2->3, K=2, S=2 -> T=4,
    # 2*3*2*2*4 = 96. Backward: layer 0 weight grad only (144), layer 1 weight + input grads (192).
    args = (1, 20, (2, 3), (4, 2), (2, 2))
    assert flops.feature_extractor_flops(*args, "fwd") == 240
    assert flops.feature_extractor_flops(*args, "bwd") == 336
    # bytes fp32: layer 0 in 20 + w 8 + out 18 = 46 elements; layer 1 in 18 + w 12 + out 12 = 42 elements
    assert flops.feature_extractor_bytes(*args, 4, "fwd") == 4 * (46 + 42)
    # bwd: layer 0 dout 18 + in 20 + 2 * w 8 = 54; layer 1 dout 12 + in 18 + 2 * w 12 + din 18 = 72
    assert flops.feature_extractor_bytes(*args, 4, "bwd") == 4 * (54 + 72)


def test_model_flops_match_hand_count():
    from unispeech_fast import UniSpeechSatConfig

    config = UniSpeechSatConfig(conv_dim=(4, 4), conv_kernel=(4, 2), conv_stride=(2, 2), hidden_size=8,
                                num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, vocab_size=32)
    # 20 samples -> 9 -> 4 frames. conv stack 2*4*1*4*9 + 2*4*4*2*4 = 288 + 256; projection 2*4*4*8 = 256;
    # pos conv 2*8*4*4*4 = 1024; q/k/v/out 4 * 2*4*8*8 = 2048; FFN 2 * 2*4*8*16 = 2048; attention
    # 4*2*4*4*4 = 512 (2 heads of dim 4 over 4 frames); CTC head 2*4*8*32 = 2048.
    assert flops.model_flops(config, 1, 20, "inference") == 544 + 256 + 1024 + 2048 + 2048 + 512 + 2048
    # fine-tuning adds the backward of everything but the frozen convs
    dense = 256 + 1024 + 4096 + 2048
    assert flops.model_flops(config, 1, 20, "finetune") == 544 + dense + 512 + 2 * dense + 2.5 * 512


def test_device_peaks_by_name():
    assert flops.device_peak("NVIDIA H100 80GB HBM3", "float16") == (989.4, 3.35)
    assert flops.device_peak("NVIDIA H100 PCIe", "bfloat16") == (756.0, 2.0)
    assert flops.device_peak("NVIDIA H200", "float32") == (67.0, 4.8)
    assert flops.device_peak("NVIDIA A100-SXM4-80GB", "float32") == (19.5, 2.0)
    assert flops.device_peak("cpu (x86_64, 2 threads)", "float32") == (None, None)


# ---------------------------------------------------------------------------------------------- timing
def test_quantile_and_time_fn_counts_calls():
    assert harness.quantile([5, 1, 4, 2, 3], 0.2) == pytest.approx(1.8)
    assert harness.quantile([7.0], 0.8) == 7.0
    calls = []
    timing = harness.time_fn(lambda: calls.append(1), CPU, warmup=2, reps=5)
    assert len(calls) == 7 and timing.reps == 5
    assert 0 <= timing.min_ms <= timing.p20_ms <= timing.median_ms <= timing.p80_ms
    assert harness.peak_memory_bytes(lambda: None, CPU) is None  # n/a on CPU, by design
    with pytest.raises(ValueError, match="reps must be >= 1"):
        harness.time_fn(lambda: None, CPU, warmup=0, reps=0)


def _toy_suite(providers):
    case = Case("toy", {"N": 8}, torch.float32, CPU, "N")

    def make_inputs(case):
        return {"x": torch.randn(case.params["N"], requires_grad=True)}

    return Suite("toy", [case], providers, make_inputs, flops=lambda c, m: 1e6, bytes=lambda c, m: 2e6,
                 warmup=0, reps=2)


def test_run_suite_reports_ok_skipped_and_error_rows():
    def good(case, inputs):
        return (lambda: (inputs["x"] * 2).sum()), [inputs["x"]]

    def boom(case, inputs):
        raise RuntimeError("kernel exploded\nsecond line")

    def refuses(case, inputs):
        def forward():
            raise BackendNotSupportedError("backend 'cuda' cannot run 'toy':\n  - no GPU here")
        return forward, [inputs["x"]]

    suite = _toy_suite([
        Provider("good", good),
        Provider("fwd-only", good, modes=("fwd",)),
        Provider("declines", good, lambda case: ["needs a GPU", "and a driver"]),
        Provider("boom", boom),
        Provider("refuses", refuses),
    ])
    rows = {(r.provider, r.mode): r for r in harness.run_suite(suite)}
    assert len(rows) == 5 * 3  # every provider x mode has a row: nothing is dropped
    ok = rows[("good", "fwd_bwd")]
    assert ok.status == "ok" and ok.median_ms > 0 and ok.reps == 2 and ok.peak_mem_mb is None
    assert ok.tflops == pytest.approx(1e6 / (ok.median_ms / 1e3) / 1e12)
    assert ok.gbps == pytest.approx(2e6 / (ok.median_ms / 1e3) / 1e9)
    assert ok.pct_peak_flops is None  # CPU peak unknown
    assert rows[("fwd-only", "fwd")].status == "ok"
    assert rows[("fwd-only", "bwd")].status == "skipped" and "mode 'bwd'" in rows[("fwd-only", "bwd")].reason
    assert rows[("declines", "fwd")].status == "skipped"
    assert rows[("declines", "fwd")].reason == "needs a GPU; and a driver"
    assert rows[("boom", "bwd")].status == "error"
    assert rows[("boom", "bwd")].reason == "RuntimeError: kernel exploded"
    assert rows[("refuses", "fwd")].status == "skipped" and "no GPU here" in rows[("refuses", "fwd")].reason


# ---------------------------------------------------------------------------------------------- real suites
def test_pos_conv_suite_on_cpu_runs_eager_and_explains_skips():
    suite = make_suite("pos_conv", "cpu", ["float32"], quick=True)
    suite.cases = suite.cases[:1]
    rows = harness.run_suite(suite, warmup=0, reps=1)
    by = {(r.provider, r.mode): r for r in rows}
    for mode in ("fwd", "bwd", "fwd_bwd"):
        row = by[("eager", mode)]
        assert row.status == "ok", row.reason
        p = suite.cases[0].params
        assert row.flops == flops.pos_conv_flops(p["B"], p["T"], p["H"], p["G"], p["K"], mode)
        assert by[("transformers-conv", mode)].status == "ok", by[("transformers-conv", mode)].reason
    assert by[("triton", "fwd")].status == "skipped" and "interpreter" in by[("triton", "fwd")].reason
    assert by[("cuda", "fwd")].status == "skipped" and by[("cuda", "fwd")].reason
    compiled = by[("torch.compile", "fwd")]
    assert compiled.status == "skipped" and "--quick" in compiled.reason
    table = report.format_table(report.to_records(rows))
    assert "skipped torch.compile (3 rows): torch.compile on CPU" in table
    assert "skipped triton" in table


def _forward(suite, provider_name, case):
    inputs = suite.make_inputs(case)
    provider = next(p for p in suite.providers if p.name == provider_name)
    forward, _ = provider.build(case, inputs)
    with torch.no_grad():
        return forward(), inputs


@pytest.mark.parametrize("op, case_index, peer, to_ours", [
    ("pos_conv", 0, "transformers-conv", lambda out: out),
    ("feature_extractor", 0, "transformers-conv", lambda out: out),
    ("attention", 1, "sdpa-math", lambda out: out.transpose(1, 2)),  # SDPA's [B, H, N, D] layout
    ("attention", 1, "sdpa-flash", lambda out: out.transpose(1, 2)),
    ("contrastive_loss", 1, "transformers", lambda out: out),
])
def test_peer_providers_compute_the_same_op(op, case_index, peer, to_ours):
    # The peers must benchmark the same math as our op (same inputs), or the comparison means nothing.
    suite = make_suite(op, "cpu", ["float32"], quick=True)
    case = suite.cases[case_index]
    torch.manual_seed(1)
    ours, _ = _forward(suite, "eager", case)
    torch.manual_seed(1)
    theirs, _ = _forward(suite, peer, case)
    torch.testing.assert_close(to_ours(theirs), ours, rtol=1e-5, atol=1e-5)


def test_model_suite_inference_and_finetune_step():
    suite = make_suite("models", "cpu", ["float32"], quick=True)
    suite.cases = [c for c in suite.cases if c.params["model"] == "UniSpeechSat"]
    rows = harness.run_suite(suite, warmup=0, reps=1, providers=["ours-eager", "ours-triton", "hf-sdpa"])
    by = {(r.provider, r.mode): r for r in rows}
    for provider in ("ours-eager", "hf-sdpa"):
        for mode in ("inference", "finetune"):
            assert by[(provider, mode)].status == "ok", by[(provider, mode)].reason
            assert by[(provider, mode)].tflops > 0
    assert by[("ours-triton", "inference")].status == "skipped"


def test_cpu_peak_memory_in_a_fresh_subprocess():
    suite = make_suite("attention", "cpu", ["float32"], quick=False)
    suite.cases = [c for c in suite.cases if c.params["N"] == 128]
    suite.modes = ("fwd",)
    (row,) = harness.run_suite(suite, warmup=0, reps=1, providers=["sdpa-math"], cpu_memory=True)
    assert row.status == "ok" and row.mem_method == "rss subprocess", row.reason
    # the math backend materialises at least the [1, 12, 128, 128] fp32 score matrix
    scores_mb = 12 * 128 * 128 * 4 / 2**20
    assert scores_mb <= row.peak_mem_mb < 100 * scores_mb
    # without the option, CPU memory is not measured (n/a), and the row says so through mem_method
    (plain,) = harness.run_suite(suite, warmup=0, reps=1, providers=["sdpa-math"])
    assert plain.peak_mem_mb is None and plain.mem_method == ""


# ---------------------------------------------------------------------------------------------- files, compare, CLI
def _records():
    rows = harness.run_suite(_toy_suite([Provider("good", lambda c, i: ((lambda: i["x"].sum()), [i["x"]]))]))
    return report.to_records(rows)


def test_compare_flags_an_artificial_regression():
    new = _records()
    old = json.loads(json.dumps(new))
    old[0]["median_ms"] = new[0]["median_ms"] / 1.5  # the new run is 50% slower on this row
    old[1]["median_ms"] = new[1]["median_ms"] * 1.05  # and 5% faster on this one
    entries = report.compare(old, new, threshold=0.10)
    flagged = [e for e in entries if e["regression"]]
    assert [(e["provider"], e["mode"]) for e in flagged] == [("good", new[0]["mode"])]
    assert flagged[0]["ratio"] == pytest.approx(1.5)
    assert not report.compare(old, new, threshold=0.6)[0]["regression"]
    # a row that ran before and now errors is a regression too
    broken = json.loads(json.dumps(new))
    broken[2].update(status="error", reason="RuntimeError: boom", median_ms=None)
    entry = [e for e in report.compare(new, broken) if e["mode"] == new[2]["mode"]][0]
    assert entry["regression"] and "now error" in entry["note"]
    assert "REGRESSION" in report.format_comparison(entries, 0.10)


def test_cli_quick_writes_json_csv_png_and_compares(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["--quick", "--op", "attention", "--out", str(out), "--warmup", "0", "--reps", "1"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "== attention on cpu" in printed
    assert "skipped sdpa-cudnn" in printed and "runs only on CUDA tensors" in printed
    assert "skipped torch.compile" in printed
    records = report.load_records(out / "results.json")
    suite = make_suite("attention", "cpu", ["float32"], quick=True)
    assert len(records) == len(suite.cases) * len(suite.providers) * 3
    ok = [r for r in records if r["status"] == "ok"]
    assert {r["provider"] for r in ok} >= {"eager", "sdpa-math"}
    for key in ("device_name", "torch", "triton", "transformers", "git_commit", "date", "p20_ms", "p80_ms"):
        assert all(key in r for r in records)
    with open(out / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(records)
    assert float(csv_rows[0]["median_ms"]) == pytest.approx(records[0]["median_ms"])
    png = out / "attention_float32.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A stored run that was 10x faster on every row: the new run regresses and the exit code says so.
    old = [dict(r, median_ms=r["median_ms"] / 10 if r["median_ms"] else None) for r in records]
    old_path = tmp_path / "old.json"
    report.write_json(old, old_path)
    rc = cli.main(["--quick", "--op", "attention", "--provider", "eager", "--warmup", "0", "--reps", "1",
                   "--compare", str(old_path), "--threshold", "10"])
    printed = capsys.readouterr().out
    assert rc == 1
    assert "REGRESSION attention eager" in printed


def test_cli_parser_and_usage_errors(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="unispeech-fast")
    sub = parser.add_subparsers(dest="command")
    cli.add_parser(sub)
    args = parser.parse_args(["bench", "--quick", "--op", "pos_conv", "--op", "models", "--threshold", "5%"])
    assert args.func is cli.run and args.op == ["pos_conv", "models"] and args.threshold == 5.0
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--threshold", "fast"])
    assert "--threshold must be a percentage" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "rows"}')
    assert cli.main(["--quick", "--op", "attention", "--compare", str(bad)]) == 2
    assert "expected a JSON list of benchmark rows" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["--quick", "--device", "cuda"]) == 2
