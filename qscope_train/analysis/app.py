"""qscope-train-app: analyze, compare and steer in a local web page, over any SAE set load_saes reads.

A standard-library HTTP server (no web framework: the whole app is this module and one page,
analysis/app.html) serves the page, three JSON endpoints over the analysis API, and the browse
stage's site under /browse/ when one is given, so that every feature links to its page. Requests
run one at a time (one model); a bad request gets HTTP 400 and a message naming the culprit, a
failure inside a tool HTTP 500 with its message, and the server keeps serving either way.

Options are key=value, as the trainer's command line takes them: qscope-train-app saes=<dir> ...
"""

from __future__ import annotations

import json
import mimetypes
import sys
import threading
import traceback
from dataclasses import dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote, urlsplit

from ..config import DType
from ..errors import InputError, QScopeError
from .analyze import analyze
from .compare import compare
from .model import Analyzer, sae_layers
from .steer import Edit, Positions, steer

MAX_TEXT_CHARS = 20_000  # one request's text, per field (a compare side: MAX_SIDE_CHARS)
MAX_SIDE_CHARS = 2_000_000
MAX_BODY_BYTES = 16 * 2**20
MAX_NEW_TOKENS = 256
MAX_COMPARE_TEXTS = 2_000  # per side
KINDS = {int: "an integer", float: "a number", str: "text", bool: "true or false"}


@dataclass
class AppConfig:
    saes: str = ""
    """SAE source: an export directory, a release directory or hub id, or a sparsify run (required)."""
    model: Optional[str] = None
    """Model hub id or directory; None: the `model` recorded in the export's layer<n>.json sidecars."""
    layers: Optional[str] = None
    """Comma-separated layers to load; None: every layer the source holds."""
    browse: Optional[str] = None
    """The browse stage's site (the directory holding index.html): features link to their pages there."""
    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0 serves other machines too)."""
    port: int = 7860
    """Port to listen on (0: any free port; the URL is printed)."""
    device: str = "cpu"
    """Device for the model and SAEs (cpu, cuda, cuda:1, ...)."""
    dtype: DType = DType.float32
    """The model's dtype (float32, bfloat16, float16); the SAEs stay fp32."""


def parse_options(argv: list[str]) -> AppConfig:
    """AppConfig from key=value words; an unknown key or a bad value names itself and the known keys."""
    known = {f.name: f for f in fields(AppConfig)}
    values: dict[str, Any] = {}
    for word in argv:
        key, eq, raw = word.partition("=")
        if not eq:
            raise InputError(f"option {word!r} is not key=value (keys: {', '.join(known)})")
        if key not in known:
            raise InputError(f"unknown option {key!r}; the options are {', '.join(known)}")
        kind = known[key].type
        try:
            if raw.lower() in ("null", "none") and "Optional" in str(kind):
                values[key] = None
            elif key == "port":
                values[key] = int(raw)
            elif key == "dtype":
                values[key] = DType(raw)
            else:
                values[key] = raw
        except ValueError as err:
            raise InputError(f"option {key}={raw!r}: {err}") from None
    cfg = AppConfig(**values)
    if not cfg.saes:
        raise InputError("saes=<directory, hub id or sparsify run> is required, e.g. saes=outputs/demo/export")
    if not 0 <= cfg.port < 65536:
        raise InputError(f"port must be in 0..65535, got {cfg.port}")
    if cfg.browse is not None and not (Path(cfg.browse) / "index.html").is_file():
        raise InputError(f"browse={cfg.browse!r} holds no index.html: give the browse stage's output directory")
    return cfg


def model_from_sidecars(saes: str) -> str:
    """The model an export's sidecars (layer<n>.json) record, when they agree."""
    found = set()
    for path in sorted(Path(saes).glob("layer*.json")):
        try:
            model = json.loads(path.read_text()).get("model")
        except (OSError, ValueError):
            continue
        if model:
            found.add(model)
    if len(found) != 1:
        seen = f"they name {sorted(found)}" if found else "none records one"
        raise InputError(f"give model=<hub id or directory>: {saes}'s layer<n>.json sidecars do not name one ({seen})")
    return found.pop()


def load_analyzer(cfg: AppConfig) -> Analyzer:
    layers = [int(n) for n in cfg.layers.split(",")] if cfg.layers else sae_layers(cfg.saes)
    model = cfg.model or model_from_sidecars(cfg.saes)
    return Analyzer.load(model, cfg.saes, layers, cfg.device, cfg.dtype)


# ----- requests ----------------------------------------------------------------------------------------


def _get(
    body: dict, name: str, kind: type, default: Any = None, low: Optional[float] = None, high=None, chars=MAX_TEXT_CHARS
) -> Any:
    """One field of a request, converted to `kind` and range-checked; a missing field is `default`."""
    value = body.get(name, default)
    if value is None or value == "":
        if default is None:
            raise InputError(f"{name} is required")
        value = default
    try:
        if kind is bool:
            if not isinstance(value, bool) and str(value).lower() not in ("true", "false"):
                raise ValueError
            value = value if isinstance(value, bool) else str(value).lower() == "true"
        else:
            value = kind(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be {KINDS.get(kind, kind.__name__)}, got {body.get(name)!r}") from None
    if kind is str and len(value) > chars:
        raise InputError(f"{name} is longer than {chars:,} characters")
    if low is not None and value < low or high is not None and value > high:
        raise InputError(f"{name} must be in {low}..{high}, got {value}")
    return value


def _layers(an: Analyzer, body: dict) -> Optional[list[int]]:
    """The request's layers ("all", one layer or a list); each checked against the loaded SAEs."""
    raw = body.get("layers", "all")
    if raw in (None, "", "all"):
        return None
    picked = raw if isinstance(raw, list) else [raw]
    try:
        numbers = [int(n) for n in picked]
    except (TypeError, ValueError):
        raise InputError(f"layers must be 'all' or layer numbers, got {raw!r}") from None
    return an.pick_layers(numbers)


def _texts(body: dict, name: str) -> list[str]:
    """A side of a comparison: one text per line (empty lines dropped)."""
    raw = _get(body, name, str, "", chars=MAX_SIDE_CHARS)
    texts = [t.strip() for t in raw.splitlines() if t.strip()]
    if len(texts) < 2:
        raise InputError(f"{name}: give at least two texts, one per line (got {len(texts)})")
    if len(texts) > MAX_COMPARE_TEXTS:
        raise InputError(f"{name}: at most {MAX_COMPARE_TEXTS:,} texts per side, got {len(texts):,}")
    return texts


def run_analyze(an: Analyzer, body: dict) -> dict:
    return analyze(an, _get(body, "text", str, ""), _get(body, "top", int, 5, 1, 50), _layers(an, body))


def run_compare(an: Analyzer, body: dict) -> dict:
    a, b = _texts(body, "a"), _texts(body, "b")
    top = _get(body, "top", int, 10, 1, 200)
    alpha = _get(body, "alpha", float, 0.05, 1e-9, 0.5)
    max_tokens = _get(body, "max_tokens", int, 64, 1, 4096)
    return compare(an, a, b, _layers(an, body), alpha=alpha, top=top, max_tokens=max_tokens)


def run_steer(an: Analyzer, body: dict) -> dict:
    layer = _get(body, "layer", int, an.layers[0])
    an.sae(layer)
    feature = _get(body, "feature", int)
    an.check_feature(layer, feature)
    mode = _get(body, "mode", str, "add")
    if mode not in ("add", "clamp"):
        raise InputError(f"mode must be add or clamp, got {mode!r}")
    value = _get(body, "strength", float, 0.0, -1e4, 1e4)
    positions = _get(body, "positions", str, "both")
    if positions not in {p.value for p in Positions}:
        raise InputError(f"positions must be prompt, generated or both, got {positions!r}")
    edit = (
        Edit(layer, feature, clamp=value, positions=positions)
        if mode == "clamp"
        else Edit(layer, feature, strength=value, relative=_get(body, "relative", bool, True), positions=positions)
    )
    return steer(
        an,
        _get(body, "prompt", str, ""),
        [edit],
        max_new_tokens=_get(body, "max_new_tokens", int, 24, 1, MAX_NEW_TOKENS),
        temperature=_get(body, "temperature", float, 0.0, 0.0, 10.0),
        seed=_get(body, "seed", int, 0, 0, 2**31 - 1),
    )


def info(an: Analyzer, cfg: AppConfig) -> dict:
    return {
        "model": an.lm.name,
        "saes": cfg.saes,
        "layers": {n: {"d_sae": s.d_sae, "k": s.k, "activation": s.activation.value} for n, s in an.saes.items()},
        "browse": cfg.browse is not None,
        "limits": {"max_new_tokens": MAX_NEW_TOKENS, "text_chars": MAX_TEXT_CHARS},
    }


TOOLS = {"/api/analyze": run_analyze, "/api/compare": run_compare, "/api/steer": run_steer}


def make_server(an: Analyzer, cfg: AppConfig) -> ThreadingHTTPServer:
    """The app's server, bound to cfg.host:cfg.port and not yet serving (serve_forever())."""
    page = files("qscope_train.analysis").joinpath("app.html").read_bytes()
    browse_root = Path(cfg.browse).resolve() if cfg.browse else None
    lock = threading.Lock()  # one model: one request at a time

    class Handler(BaseHTTPRequestHandler):
        server_version = "qscope-train-app"

        def log_message(self, format, *args):  # noqa: A002 (the base class's name)
            return  # quiet: errors are printed where they happen

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: Any) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = unquote(urlsplit(self.path).path)
            if path in ("/", "/index.html"):
                return self._send(200, page, "text/html; charset=utf-8")
            if path == "/api/info":
                return self._json(200, info(an, cfg))
            if path.startswith("/browse/") and browse_root is not None:
                target = (browse_root / path[len("/browse/") :]).resolve()
                if target.is_file() and target.is_relative_to(browse_root):
                    kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
                    return self._send(200, target.read_bytes(), kind)
            self._json(404, {"error": f"not found: {path}"})

        def do_POST(self) -> None:  # noqa: N802
            path = urlsplit(self.path).path
            tool = TOOLS.get(path)
            if tool is None:
                return self._json(404, {"error": f"no tool at {path}; the tools are {', '.join(TOOLS)}"})
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY_BYTES:
                    raise InputError(f"the request is {length:,} bytes; the app takes at most {MAX_BODY_BYTES:,}")
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise InputError("the request body must be a JSON object")
                with lock:
                    result = tool(an, body)
            except json.JSONDecodeError as err:
                return self._json(400, {"error": f"the request body is not JSON: {err}"})
            except QScopeError as err:
                return self._json(400, {"error": str(err)})
            except Exception as err:  # a tool's failure: report it, keep serving
                traceback.print_exc(file=sys.stderr)
                return self._json(500, {"error": f"{type(err).__name__}: {err}"})
            self._json(200, result)

    server = ThreadingHTTPServer((cfg.host, cfg.port), Handler)
    server.daemon_threads = True
    return server


USAGE = "usage: qscope-train-app saes=<dir|hub id|sparsify run> [key=value ...]\n\noptions:\n" + "\n".join(
    f"  {f.name}={'' if f.default is None else f.default!s}" for f in fields(AppConfig)
)


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE)
        for f in fields(AppConfig):
            print(f"  {f.name}: {_doc(f.name)}")
        return
    try:
        cfg = parse_options(argv)
        print(f"app: loading {cfg.model or 'the model named by the sidecars'} and the SAEs of {cfg.saes} ...")
        an = load_analyzer(cfg)
        server = make_server(an, cfg)
    except (QScopeError, OSError) as err:
        print(f"qscope-train-app: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    host, port = server.server_address[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    print(f"app: {an.lm.name}, layers {an.layers}: http://{shown}:{port}/  (Ctrl+C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _doc(name: str) -> str:
    """An option's line of documentation (the string under its field)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(AppConfig))
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == name:
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                return str(nxt.value.value)
    return ""


__all__ = ["AppConfig", "load_analyzer", "main", "make_server", "parse_options"]
