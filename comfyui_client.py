"""A client for a real ComfyUI server: start one (its own throw-away ``--base-directory``, node packs linked in),
submit API-format workflows over HTTP (``POST /prompt``, ``GET /history``), collect the /ws messages, and turn a
UI-format workflow (what the frontend saves, e.g. example_workflows/*.json) into the API format.

Standard library only, and it imports neither ComfyUI nor torch: the node tests (tests/test_comfyui.py) and the
ComfyUI demo (scripts/comfyui_demo.py, run with ComfyUI's own python) both use it. Runs collect the /ws messages
(progress, executing, executed, execution_error, ...) with websocket-client if importable, else with
:class:`MiniWebSocket` below. Pair it with a ComfyUI installed by .ci/comfyui.sh:

    from flextok_kit.comfyui_client import ComfyServer
    with ComfyServer(launcher=os.environ["COMFYUI_HOME"] + "/bin/comfyui",
                     base_dir=tmp_path, packs={"my_pack": repo_root}) as srv:
        assert "MyNode" in srv.object_info()
        run = srv.run(workflow)             # POST /prompt, wait, GET /history/{id}
        assert run.status == "success", run.error
        paths = run.output_files()          # files under base_dir/output (and temp)

The server gets its own --base-directory, so custom_nodes/, models/, input/, output/,
temp/ and user/ all live in a throwaway folder; ComfyUI's install stays read-only.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # live messages over /ws: websocket-client if installed, else the small stdlib client below
    import websocket  # type: ignore  # package websocket-client
except ImportError:  # pragma: no cover - depends on the environment
    websocket = None

DONE_TYPES = ("execution_success", "execution_error", "execution_interrupted")


class MiniWebSocket:
    """Just enough of an RFC 6455 client (standard library only) to read ComfyUI's /ws: text and binary
    messages, fragmentation, ping/pong, close. ``recv()`` returns str (text) or bytes (binary)."""

    def __init__(self, url: str, timeout: float = 60):
        import base64
        parts = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        head, self._buf = head.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {head[:200]!r}")

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed by the server")
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        import struct
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else
                                         bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536 else
                                         bytes([0x80 | 127]) + struct.pack(">Q", n))
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def recv(self):
        import struct
        message, kind = b"", None
        while True:
            b0, b1 = self._read(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x9:  # ping
                self._send(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode == 0x8:
                raise ConnectionError("websocket closed by the server")
            if opcode in (0x1, 0x2):
                kind = opcode
            message += payload
            if b0 & 0x80:
                return message.decode() if kind == 0x1 else message

    def settimeout(self, timeout: float) -> None:
        self.sock.settimeout(timeout)

    def close(self) -> None:
        try:
            self._send(0x8, b"\x03\xe8")
        except OSError:
            pass
        self.sock.close()


def ws_connect(url: str, timeout: float = 60):
    """websocket-client's connection if that package is installed, else :class:`MiniWebSocket`."""
    if websocket is not None:
        return websocket.create_connection(url, timeout=timeout)
    return MiniWebSocket(url, timeout=timeout)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    prompt_id: str
    history: dict
    messages: list = field(default_factory=list)  # (type, data) tuples from /ws, if collected
    base_dir: Path | None = None

    @property
    def status(self) -> str:  # "success" | "error"
        return self.history.get("status", {}).get("status_str", "")

    @property
    def error(self) -> dict | None:
        for name, data in self.history.get("status", {}).get("messages", []):
            if name == "execution_error":
                return data
        return None

    @property
    def outputs(self) -> dict:
        return self.history.get("outputs", {})

    def of_type(self, msg_type: str) -> list:
        return [d for t, d in self.messages if t == msg_type]

    def output_files(self, kinds=("output", "temp")) -> list[Path]:
        files = []
        for node_out in self.outputs.values():
            for key in ("images", "gifs", "audio", "video", "3d"):
                for item in node_out.get(key, []) if isinstance(node_out.get(key), list) else []:
                    if isinstance(item, dict) and item.get("type") in kinds:
                        files.append(Path(self.base_dir, item["type"], item.get("subfolder", ""), item["filename"]))
        return files


class ComfyServer:
    def __init__(self, launcher: str | os.PathLike, base_dir: str | os.PathLike,
                 packs: dict[str, str | os.PathLike] | None = None,
                 extra_args: list[str] = (), env: dict | None = None,
                 host: str = "127.0.0.1", port: int | None = None):
        self.launcher = str(launcher)
        self.base_dir = Path(base_dir).resolve()
        self.packs = dict(packs or {})
        self.extra_args = list(extra_args)
        self.env = env
        self.host = host
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base_dir / "comfyui.log"

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 180) -> "ComfyServer":
        for sub in ("custom_nodes", "models", "input", "output", "temp", "user/default"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        for name, src in self.packs.items():
            link = self.base_dir / "custom_nodes" / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(Path(src).resolve(), target_is_directory=True)
        settings = self.base_dir / "user/default/comfy.settings.json"
        if not settings.exists():  # no first-run template dialog in browser checks
            settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
        self.port = self.port or free_port()
        cmd = [self.launcher, "--listen", self.host, "--port", str(self.port),
               "--base-directory", str(self.base_dir), *self.extra_args]
        env = dict(os.environ, **(self.env or {}))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.get("/system_stats")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"ComfyUI not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 20) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # ------------------------------------------------------------------ HTTP
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def request(self, method: str, path: str, body: Any = None, timeout: float = 60):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw.decode(errors="replace")

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw):
        return self.request("POST", path, body if body is not None else {}, **kw)

    def object_info(self, node_class: str | None = None) -> dict:
        path = "/object_info" + (f"/{urllib.parse.quote(node_class)}" if node_class else "")
        status, info = self.get(path)
        assert status == 200, (status, info)
        return info

    def queue(self, prompt: dict, client_id: str | None = None):
        """POST /prompt. Returns (http_status, body); 400 carries error + node_errors."""
        body = {"prompt": prompt}
        if client_id:
            body["client_id"] = client_id
        return self.post("/prompt", body)

    def history(self, prompt_id: str) -> dict | None:
        status, h = self.get(f"/history/{prompt_id}")
        return h.get(prompt_id) if status == 200 and h else None

    def wait_history(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.history(prompt_id)
            if h and h.get("status", {}).get("completed") is not None:
                return h
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout}s")

    def run(self, prompt: dict, timeout: float = 600, use_ws: bool = True) -> Run:
        """Queue a workflow and wait for it. Raises AssertionError if /prompt rejects it."""
        client_id = str(uuid.uuid4())
        ws = self.connect_ws(client_id, timeout) if use_ws else None
        try:
            status, resp = self.queue(prompt, client_id)
            if status != 200:
                raise AssertionError(f"/prompt rejected the workflow ({status}): {json.dumps(resp, indent=1)}")
            pid = resp["prompt_id"]
            messages = []
            if ws is not None:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    raw = ws.recv()
                    if isinstance(raw, bytes):  # binary preview frames
                        messages.append(("binary", len(raw)))
                        continue
                    msg = json.loads(raw)
                    data = msg.get("data") or {}
                    messages.append((msg.get("type"), data))
                    if msg.get("type") in DONE_TYPES and data.get("prompt_id") == pid:
                        break
            return Run(pid, self.wait_history(pid, timeout), messages, self.base_dir)
        finally:
            if ws is not None:
                ws.close()

    def connect_ws(self, client_id: str, timeout: float = 60):
        return ws_connect(f"ws://{self.host}:{self.port}/ws?clientId={client_id}", timeout)

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        self.post("/free", {"unload_models": unload_models, "free_memory": free_memory})

    def interrupt(self) -> None:
        self.post("/interrupt")


def write_safetensors(path: str | os.PathLike, tensors: dict[str, list[float]]) -> None:
    """Write float32 1-D tensors as .safetensors with the standard library (test fixtures)."""
    import struct
    header, blobs, offset = {}, [], 0
    for name, values in tensors.items():
        blob = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": [len(values)], "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


# ---------------------------------------------------------------------------------------------- UI -> API format
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# inputs the frontend adds to a node's prompt from widgets of its own (not in object_info, not in widgets_values):
# Preview as Text's display box; the server ignores them
FRONTEND_INPUTS = {"PreviewAny": {"preview": ""}}


def retarget_workflow(ui: dict, model: str | None = None, image: str | None = None) -> dict:
    """A copy of a UI-format workflow whose **Load FlexTok** nodes load ``model`` (a name under models/flextok/)
    and whose **Load Image** nodes load ``image`` (a file in input/); None keeps the workflow's value."""
    import copy
    ui = copy.deepcopy(ui)
    for node in ui["nodes"]:
        values = node.get("widgets_values")
        if model is not None and node["type"] == "FlexTokLoad":
            values[0] = model
        elif image is not None and node["type"] == "LoadImage":
            values[0] = image
    return ui


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """A UI-format workflow (what the frontend saves, e.g. example_workflows/*.json) -> the API-format prompt that
    POST /prompt takes, following the frontend's rules: widget inputs take their value from ``widgets_values`` in
    input order (an INT/COMBO with ``control_after_generate``, or an INT named seed/noise_seed without an explicit
    flag, is followed by its control value, which is skipped), linked inputs become ``[source id, output slot]``;
    notes are dropped; muted (mode 2) and bypassed (mode 4) nodes are not supported; frontend-only inputs
    (:data:`FRONTEND_INPUTS`) are added as the frontend adds them."""
    links = {link[0]: link for link in ui.get("links", [])}
    prompt = {}
    for node in ui["nodes"]:
        kind = node["type"]
        if kind in ("Note", "MarkdownNote"):
            continue
        if kind in VIRTUAL_NODES or node.get("mode", 0) in (2, 4):
            raise ValueError(f"node {node['id']} ({kind}): reroutes, primitives, muted or bypassed nodes "
                             "are not supported")
        if kind not in object_info:
            raise KeyError(f"node {node['id']}: type {kind!r} is not registered on the server")
        info = object_info[kind]
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info.get("input_order", {})
        names = list(order.get("required", [])) + list(order.get("optional", [])) if order else list(specs)
        values = list(node.get("widgets_values") or [])
        inputs, i = dict(FRONTEND_INPUTS.get(kind, {})), 0
        for name in names:
            spec = specs[name]
            kind_ = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            is_widget = (isinstance(kind_, list) or kind_ in WIDGET_TYPES) and not opts.get("forceInput")
            if not is_widget:
                continue
            if i >= len(values):
                raise ValueError(f"node {node['id']} ({kind}): no widget value for {name!r}")
            inputs[name] = values[i]
            i += 1
            control = opts.get("control_after_generate", kind_ == "INT" and name in ("seed", "noise_seed"))
            if control and (kind_ in ("INT", "COMBO") or isinstance(kind_, list)):
                i += 1
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return prompt
