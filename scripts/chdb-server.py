#!/usr/bin/env python3
"""A ClickHouse HTTP interface over chDB (an in-process ClickHouse), for Keel's tests.

Serves the part of ClickHouse's HTTP protocol Keel's client uses, backed by a chDB session whose
data lives in one directory, so the tests can check Keel against current ClickHouse semantics
(DateTime64, LowCardinality, TTL, ReplacingMergeTree's is_deleted) where only Debian's old
server can be installed.

  chdb-server.py --port 18130 --path DIR

  GET  /ping                          "Ok."
  GET  /?query=SQL                    the result (TabSeparated unless the SQL names a FORMAT)
  POST /  (body: SQL)                 the same
  POST /?query=INSERT ... FORMAT F    the body is the data; other URL parameters are settings
  errors                              HTTP 500, the message, X-ClickHouse-Exception-Code

Requests are served one at a time (a chDB session is not shared between threads), one per
connection. Compressed
bodies (decompress=1), sessions and query parameters are not supported.
"""

import argparse
import os
import re
import sys
import tempfile
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qsl, urlparse

from chdb import session as chdb_session

INSERT = re.compile(r"^\s*(INSERT\s+INTO\s+.+?)\s+FORMAT\s+(\w+)\s*;?\s*$", re.I | re.S)
CODE = re.compile(r"Code: (\d+)")
# URL parameters that are not settings.
NOT_SETTINGS = {"query", "database", "default_format", "user", "password", "query_id"}
SAFE_SETTING = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def settings_clause(params):
    pairs = []
    for key, value in params.items():
        if key in NOT_SETTINGS or not SAFE_SETTING.match(key):
            continue
        pairs.append("%s = '%s'" % (key, value.replace("\\", "\\\\").replace("'", "\\'")))
    return " SETTINGS " + ", ".join(pairs) if pairs else ""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    session = None
    scratch = None

    def log_message(self, fmt, *args):  # quiet: the tests print what matters
        pass

    def reply(self, status, text, code=None):
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        if code is not None:
            self.send_header("X-ClickHouse-Exception-Code", code)
        # One request per connection: requests are served one at a time, so a client keeping an
        # idle connection open would hold up every other client.
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def handle_query(self, body):
        url = urlparse(self.path)
        if url.path == "/ping":
            return self.reply(200, "Ok.\n")
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        sql = params.get("query")
        data = None
        if sql is None:
            sql = body.decode()
        elif body:
            data = body
        if not sql.strip():
            return self.reply(400, "Code: 62. DB::Exception: Empty query", "62")
        fmt = params.get("default_format", "TabSeparated")
        try:
            insert = INSERT.match(sql)
            if data is not None and insert:
                with tempfile.NamedTemporaryFile(dir=self.scratch, delete=False) as f:
                    f.write(data)
                    path = f.name
                try:
                    statement = "%s FROM INFILE '%s'%s FORMAT %s" % (
                        insert.group(1),
                        path,
                        settings_clause(params),
                        insert.group(2),
                    )
                    self.session.query(statement, fmt)
                finally:
                    os.unlink(path)
                return self.reply(200, "")
            if data is not None:
                return self.reply(400, "Code: 62. DB::Exception: data sent with a statement that is not INSERT ... FORMAT", "62")
            result = self.session.query(sql, fmt)
            return self.reply(200, str(result) if result is not None else "")
        except Exception as error:  # chDB raises its own error type with ClickHouse's message
            message = str(error)
            found = CODE.search(message)
            return self.reply(500, message + "\n", found.group(1) if found else "1000")

    def do_GET(self):
        self.handle_query(b"")

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
            body = bytes(body)
        else:
            body = self.rfile.read(length)
        self.handle_query(body)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=18130)
    parser.add_argument("--path", required=True)
    args = parser.parse_args()
    os.makedirs(args.path, exist_ok=True)
    Handler.session = chdb_session.Session(os.path.join(args.path, "data"))
    Handler.scratch = os.path.join(args.path, "scratch")
    os.makedirs(Handler.scratch, exist_ok=True)
    server = HTTPServer(("127.0.0.1", args.port), Handler)
    print("chdb-server listening on 127.0.0.1:%d" % args.port, file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
