"""A TLS upstream for the end-to-end test: answers 200 when a bearer token arrives, 401 otherwise,
and appends one line per request to a log file ("<host> <has-bearer>")."""
import http.server
import json
import ssl
import sys

port, cert, key, log_path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        auth = self.headers.get("Authorization", "")
        bearer = auth.startswith("Bearer ey")
        with open(log_path, "a") as log:
            log.write(f"{self.headers.get('Host')} {bearer}\n")
        body = json.dumps({"path": self.path, "bearer_received": bearer}).encode()
        self.send_response(200 if bearer else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print("upstream ready", flush=True)
server.serve_forever()
