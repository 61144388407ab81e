import json
import sys
import types

from qscope_train.config import WandbConfig, WandbMode
from qscope_train.tracking import Tracker


def test_jsonl_log_and_wandb_steps_never_go_backwards(tmp_path, monkeypatch):
    calls = []
    run = types.SimpleNamespace(
        log=lambda data, step: calls.append((step, data)), finish=lambda: calls.append("finish")
    )
    fake = types.SimpleNamespace(init=lambda **kw: run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    t = Tracker(tmp_path, WandbConfig(mode=WandbMode.offline), "r", {})
    t.log("cache", 0, {1: {"kept": 10}}, split="train")
    t.log("cache", 0, {1: {"kept": 3}}, split="eval")
    t.log("fit", 0, {1: {"fvu": 0.9}})
    t.log("fit", 40, {1: {"fvu": 0.2}})
    t.log("evaluate", 0, {1: {"fvu": 0.25, "filters": {"kept": 3}}})
    t.close()
    assert [c[0] for c in calls[:-1]] == [0, 0, 0, 40, 40] and calls[-1] == "finish"
    assert calls[0][1] == {"cache/train/layer1/kept": 10} and calls[1][1] == {"cache/eval/layer1/kept": 3}
    assert calls[4][1] == {"evaluate/layer1/fvu": 0.25}
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in lines] == [
        ("cache", 0),
        ("cache", 0),
        ("fit", 0),
        ("fit", 40),
        ("evaluate", 0),
    ]
    assert lines[1]["split"] == "eval" and lines[3]["layers"]["1"]["fvu"] == 0.2
