"""A scripted chat-completions server on loopback (OpenAI's API as the API judge sees it), and what the
judge tests build around it: the key planted in the environment, the prompt template, a judge pointed at
the server, pairs whose right verdicts are known."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pipeline.evaluation.api_judge import ApiJudge, ApiJudgeConfig

SECRET = "sk-test-Zq8Xw3SECRETvalue"
KEY_ENV = "RAYDPO_TEST_JUDGE_KEY"
# One text per line, so that the fake server can read the pair back out of the request.
TEMPLATE = "Q: {prompt}\nA: {first}\nB: {second}\nWhich is better? End with 'Preferred: A' or 'Preferred: B'."


class FakeChatServer:
    """A chat-completions endpoint that prefers the text containing "good", answers a prompt containing
    "GARBAGE" with prose that holds no verdict, and plays `faults` (one per request, in arrival order; None
    answers normally) before answering normally. Counts requests in flight.

    Like OpenAI and `vllm serve`, it honours `response_format` (a JSON verdict) and `logprobs` (its tokens
    are the reply's words, with the label's alternatives at the verdict) unless `structured` is False."""

    def __init__(self):
        self.lock = threading.Lock()
        self.received: list[dict] = []
        self.faults: deque = deque()
        self.always: str | None = None  # a fixed reply text, e.g. a judge that always says A
        self.structured = True
        self.suffix = ""  # appended to a text verdict line, e.g. " (though B comes close)"
        self.label_logprobs = (-0.1, -2.5, -3.5)  # at the verdict: of the chosen label, then the other two
        self.delay_s = 0.0
        self.usage = {"prompt_tokens": 100, "completion_tokens": 10}
        self.in_flight = self.max_in_flight = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.httpd.fake = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.received)

    def choice(self, content: str) -> str | None:
        """The label this judge prefers ("A", "B", "Tie"), None for a GARBAGE prompt."""
        lines = {line[:2]: line[3:] for line in content.splitlines()}
        if "GARBAGE" in lines["Q:"]:
            return None
        a_good, b_good = "good" in lines["A:"], "good" in lines["B:"]
        return "A" if a_good and not b_good else "B" if b_good and not a_good else "Tie"

    def message(self, body: dict) -> tuple[str, dict | None]:
        """The reply text, and the logprobs field of the choice where asked for."""
        if self.always is not None:
            return self.always, None
        choice = self.choice(body["messages"][-1]["content"])
        if choice is None:
            return "Both texts have their charms and I would rather not choose.", None
        if self.structured and (body.get("response_format") or {}).get("type") == "json_schema":
            return json.dumps(
                {"comparison": f"Text {choice} is the better one.", "preferred": "tie" if choice == "Tie" else choice}
            ), None
        text = f"Text {choice} is the better one.\n**Preferred:** {choice}"
        logprobs = None
        if self.structured and body.get("logprobs"):
            tokens = re.findall(r"\s*\S+", text)
            content = [{"token": t, "logprob": 0.0, "top_logprobs": [{"token": t, "logprob": 0.0}]} for t in tokens]
            others = [label for label in ("A", "B", "Tie") if label != choice]
            content[-1]["top_logprobs"] = [
                {"token": f" {label}", "logprob": logprob}
                for label, logprob in zip((choice, *others), self.label_logprobs)
            ]
            content += [{"token": t, "logprob": 0.0, "top_logprobs": []} for t in re.findall(r"\s*\S+", self.suffix)]
            logprobs = {"content": content}
        return text + self.suffix, logprobs

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        fake: FakeChatServer = self.server.fake
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with fake.lock:
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
            fake.received.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            fault = fake.faults.popleft() if fake.faults else None
        try:
            time.sleep(fake.delay_s)
            if fault and fault[0] == "slow":
                time.sleep(fault[1])  # the client has given up by now
            if fault and fault[0] == "drop":
                self.close_connection = True
                return  # no response at all: the client sees the connection closed
            if fault and fault[0] == "status":
                _, status, headers = fault
                payload = {"error": {"message": f"scripted {status}"}}
            elif fault and fault[0] == "echo":
                # Some APIs quote the key they rejected: the judge must not pass it on.
                status, headers = fault[1], {}
                payload = {"error": {"message": f"bad request with {self.headers.get('Authorization')}"}}
            else:
                status, headers = 200, {}
                text, logprobs = fake.message(body)
                payload = {
                    "id": "x",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                            "logprobs": logprobs,
                        }
                    ],
                    "usage": fake.usage,
                }
        finally:
            # Out of flight before the reply is written, so that the client's next request never overlaps.
            with fake.lock:
                fake.in_flight -= 1
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


def make_judge(server: FakeChatServer, **overrides) -> ApiJudge:
    """An API judge pointed at `server`, its key read from KEY_ENV; `overrides` are ApiJudgeConfig fields."""
    settings = dict(
        base_url=server.url,
        model="judge-model",
        api_key_env=KEY_ENV,
        prompt_template=TEMPLATE,
        timeout_s=5.0,
        max_retries=3,
        max_concurrency=4,
    )  # generous: a loaded machine is no timeout
    settings.update(overrides)
    return ApiJudge(ApiJudgeConfig(**settings))


def pairs(n: int, *, offset: int = 0):
    """n pairs; the first text is the good one at odd i, so the right verdicts alternate B, A, B, ..."""
    prompts = [f"question {i + offset}" for i in range(n)]
    first = [f"{'good' if i % 2 else 'bad'} answer {i + offset}" for i in range(n)]
    second = [f"{'bad' if i % 2 else 'good'} answer {i + offset}" for i in range(n)]
    expected = ["A" if i % 2 else "B" for i in range(n)]
    return prompts, first, second, expected
