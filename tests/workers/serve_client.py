"""A client of tp-serve while one of its hosts is lost (tests/test_multihost.py): with the official openai client,
one streaming and one plain completion in flight; "STREAMING" on stdout once tokens flow (the test then kills the
other host's rank); then a new request and /health right after the in-flight ones end. Prints REPORT {json}.

    python serve_client.py URL MODEL"""

import json
import sys
import threading
import time
import urllib.error
import urllib.request

import openai

url, model = sys.argv[1], sys.argv[2]
report = {}


def health() -> int:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


deadline = time.time() + 180
while True:
    try:
        if health() == 200:
            break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit("tp-serve did not become healthy")
    time.sleep(0.5)

client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
long = dict(model=model, max_tokens=3000, temperature=0, extra_body={"ignore_eos": True})
flowing = threading.Event()


def streaming():
    chunks = 0
    try:
        for _ in client.completions.create(prompt="Hello there", stream=True, **long):
            chunks += 1
            if chunks == 3:
                flowing.set()
        report["stream"] = {"ended": "normally", "chunks": chunks}
    except openai.APIError as e:  # an error event in the stream, or a dropped connection
        report["stream"] = {"error": type(e).__name__, "body": e.body, "chunks": chunks}
    finally:
        flowing.set()


def plain():
    try:
        client.completions.create(prompt="Good morning", **long)
        report["plain"] = {"ended": "normally"}
    except openai.APIStatusError as e:
        report["plain"] = {"status": e.status_code, "body": e.body}
    except openai.APIError as e:
        report["plain"] = {"error": type(e).__name__}


threads = [threading.Thread(target=streaming), threading.Thread(target=plain)]
for t in threads:
    t.start()
flowing.wait()
print("STREAMING", flush=True)
for t in threads:
    t.join()
try:
    client.completions.create(prompt="Again", model=model, max_tokens=4)
    report["after"] = {"ended": "normally"}
except openai.APIStatusError as e:
    report["after"] = {"status": e.status_code, "body": e.body}
except openai.APIError as e:
    report["after"] = {"error": type(e).__name__}
try:
    report["health"] = health()
except OSError as e:
    report["health"] = str(e)
print("REPORT " + json.dumps(report), flush=True)
