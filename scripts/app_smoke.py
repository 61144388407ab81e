"""qscope-train-app's three tools over HTTP on one device: starts the app on an SAE set, posts one analyze,
one compare and one steer request and a bad one, and prints one JSON line (seconds per tool, the bad
request's status and message). gpu_check.py runs it on the GPU with the demo's export.

Usage: python scripts/app_smoke.py --saes outputs/demo/export [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.error
import urllib.request

from qscope_train.analysis import app

TEXTS = [f"Shopping list: soap, salt. {i} times 12 is {12 * i}." for i in range(2, 10)]
CHATS = [f"user: What is {i} times 8? assistant: {i} times 8 is {8 * i}." for i in range(2, 10)]


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--saes", required=True)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    cfg = app.parse_options([f"saes={a.saes}", "port=0", f"device={a.device}"])
    server = app.make_server(app.load_analyzer(cfg), cfg)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api/"
    out = {"device": a.device}
    requests = {
        "analyze": {"text": TEXTS[0], "top": 5},
        "compare": {"a": "\n".join(TEXTS), "b": "\n".join(CHATS)},
        "steer": {"prompt": "The cat sat on the", "feature": 3, "strength": 2.0, "max_new_tokens": 8},
    }
    for tool, body in requests.items():
        t0 = time.perf_counter()
        status, res = post(url + tool, body)
        out[f"{tool}_s"] = round(time.perf_counter() - t0, 3)
        if status != 200:
            raise SystemExit(f"{tool}: HTTP {status}: {res}")
    status, res = post(url + "steer", {"prompt": "x y", "feature": 10**9})
    out["bad_request"] = [status, res.get("error", "")]
    server.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
