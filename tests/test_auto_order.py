"""backend("auto")'s measured order: derived from benchmark rows, and the committed table is current."""

from __future__ import annotations

import os

import unispeech_fast._auto_order as committed
from unispeech_fast.bench import auto_order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(provider, shape, median, op="pos_conv", mode="fwd", kind="ours", status="ok", dtype="float32",
         device_name="cpu (x86_64, AVX512, 2 threads)"):
    return dict(op=op, provider=provider, kind=kind, shape=shape, dtype=dtype, mode=mode, device="cpu",
                device_name=device_name, status=status, median_ms=median)


def test_derive_orders_backends_by_measured_time():
    rows = [
        _row("eager", "T=1", 2.0), _row("cpp", "T=1", 1.0),
        _row("eager", "T=2", 4.0), _row("cpp", "T=2", 3.0),
        _row("cpp", "T=3", 100.0),                              # only one backend ran T=3: not compared
        _row("eager", "T=1", 1.0, mode="fwd_bwd"), _row("cpp", "T=1", 5.0, mode="fwd_bwd"),
        _row("transformers-conv", "T=1", 0.1, kind="peer"),      # peers never enter the order
        _row("triton", "T=1", 0.1, status="skipped"),            # nor rows that did not run
        _row("eager", "T=1", 1.0, op="attention"),               # a single backend gives no order
        _row("eager", "T=1", 1.0, mode="bwd"), _row("cpp", "T=1", 9.0, mode="bwd"),  # bwd alone is no call mode
        _row("eager", "T=1", 1.0, op="gumbel_quantizer", device_name="cpu (x86_64, 2 threads)"),  # no ISA: unused
        _row("cpp", "T=1", 2.0, op="gumbel_quantizer", device_name="cpu (x86_64, 2 threads)"),
        _row("eager", "T=1", 3.0, device_name="cpu (x86_64, AVX2, 2 threads)"),  # another CPU kind, its own key
        _row("cpp", "T=1", 2.0, device_name="cpu (x86_64, AVX2, 2 threads)"),
    ]
    orders = auto_order.derive(rows)
    assert orders == {
        ("cpu:AVX512", "pos_conv", "float32", "fwd"): ("cpp", "eager"),
        ("cpu:AVX512", "pos_conv", "float32", "fwd_bwd"): ("eager", "cpp"),
        ("cpu:AVX2", "pos_conv", "float32", "fwd"): ("cpp", "eager"),
    }


def test_render_gives_an_importable_table(tmp_path):
    orders = {("cuda", "attention", "float16", "fwd"): ("triton", "cuda", "eager")}
    text = auto_order.render(orders, ["benchmarks/results/x/results.json"])
    namespace: dict = {}
    exec(compile(text, "generated", "exec"), namespace)
    assert namespace["ORDERS"] == orders
    assert namespace["SOURCES"] == ("benchmarks/results/x/results.json",)


def test_cli_names_an_unreadable_file(tmp_path, capsys):
    bad = tmp_path / "results.json"
    bad.write_text("{not json")
    assert auto_order.main([str(bad)]) == 1
    assert str(bad) in capsys.readouterr().err
    assert auto_order.main([]) == 2


def test_committed_table_is_generated_from_its_sources(capsys, monkeypatch):
    assert committed.SOURCES and committed.ORDERS
    monkeypatch.chdir(ROOT)
    assert auto_order.main(list(committed.SOURCES)) == 0
    with open(os.path.join(ROOT, "unispeech_fast", "_auto_order.py"), encoding="utf-8") as fh:
        assert capsys.readouterr().out == fh.read(), "regenerate unispeech_fast/_auto_order.py"


def test_write_replaces_the_table_only_when_complete(tmp_path, monkeypatch, capsys):
    target = tmp_path / "_auto_order.py"
    target.write_text("old")
    monkeypatch.setattr(auto_order, "TABLE_PATH", str(target))
    monkeypatch.chdir(ROOT)
    assert auto_order.main(["--write", *committed.SOURCES]) == 0
    with open(os.path.join(ROOT, "unispeech_fast", "_auto_order.py"), encoding="utf-8") as fh:
        assert target.read_text() == fh.read()
    assert not (tmp_path / "_auto_order.py.tmp").exists()
