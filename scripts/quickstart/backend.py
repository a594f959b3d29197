"""The demo's "httpbin" app: answers every GET with 200 and a short text.

Started by ../../quickstart.sh as `python3 backend.py PORT`; only the server
Envoy talks to it (plain HTTP on loopback, behind the mTLS listener).
"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Envoy pools connections

    def do_GET(self):
        body = b"hello from the httpbin backend, reached over mTLS\n"
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):  # one line per request, to the log file
        sys.stderr.write("backend: " + (fmt % args) + "\n")


port = int(sys.argv[1])
print(f"backend listening on http://127.0.0.1:{port}", flush=True)
ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
