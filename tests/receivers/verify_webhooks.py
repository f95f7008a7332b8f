"""A webhook receiver that checks Standard Webhooks signatures with two verifiers no one on
this project wrote: PyPI `standardwebhooks` and `svix`. Listens on 127.0.0.1 (port printed on
the first line), answers 204 when both accept a request and 401 otherwise, and prints one JSON
line per request. Usage: verify_webhooks.py <whsec_secret>"""

import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

import standardwebhooks
import svix.webhooks

SECRET = sys.argv[1]


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        headers = {k.lower(): v for k, v in self.headers.items()}
        results = {}
        for name, verify in (
            ("standardwebhooks", lambda: standardwebhooks.Webhook(SECRET).verify(body, headers)),
            ("svix", lambda: svix.webhooks.Webhook(SECRET).verify(body, headers)),
        ):
            try:
                verify()
                results[name] = True
            except Exception as error:  # each verifier has its own error type
                results[name] = f"{type(error).__name__}: {error}"
        ok = all(v is True for v in results.values())
        print(json.dumps({"id": headers.get("webhook-id"), "results": results}), flush=True)
        self.send_response(204 if ok else 401)
        self.end_headers()

    def log_message(self, *args):
        pass


server = HTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
