"""A minimal local Hugging Face Hub endpoint for tests (loopback only): the calls push_to_hub makes
with huggingface_hub's real client (create repo, YAML check, preupload, commit), recording the
committed files."""
import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Hub(BaseHTTPRequestHandler):
    def _send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        base = f"http://127.0.0.1:{self.server.server_port}"
        self.server.requests.append(self.path)
        if self.path == "/api/repos/create":
            req = json.loads(raw)
            return self._send(200, {"url": f"{base}/{req.get('organization') or 'user'}/{req['name']}"})
        if self.path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(raw)["files"]
            return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        if "/commit/" in self.path:
            repo = self.path.split("/api/models/")[1].split("/commit/")[0]
            for line in raw.decode().splitlines():
                op = json.loads(line)
                if op.get("key") == "file":
                    self.server.files[(repo, op["value"]["path"])] = base64.b64decode(op["value"]["content"])
            return self._send(200, {"commitUrl": f"{base}/{repo}/commit/{'1' * 40}", "commitOid": "1" * 40})
        return self._send(404, {"error": f"not served: {self.path}"})

    def do_GET(self):
        self.server.requests.append(self.path)
        return self._send(404, {"error": f"not served: {self.path}"})

    do_HEAD = do_GET


def start():
    """A running server on 127.0.0.1 with `.files` {(repo, path): bytes} and `.requests`."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    srv.files, srv.requests = {}, []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv
